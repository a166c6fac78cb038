"""Expert-knowledge label extraction (docs/methods.md, "ViLReF": labels read from the report; docs/labels.md).

Each report becomes a multi-hot vector over ``knowledge.FINDINGS`` ('normal' is its own class, index 0)
through an expert-authored dictionary per language, kept as data in ``knowledge/labels_{en,zh}.json``.

Matching. Every dictionary entry is located in the text, case-insensitively (abbreviations such as
'MA', 'DR' or 'PRP' case-sensitively); the longest matches win and never overlap, so 'retinal
haemorrhages' is one mention, a generic '渗出' cannot take part of '软性渗出斑', and '不伴有' is a
negation rather than '伴有' a termination. Entries made of Latin letters are word-bounded (a finding
term may take a plural 's'/'es'); Chinese has no word boundaries, so its entries are substrings.
English terms also match in their other spelling (haemorrhage/hemorrhage, neovascularisation/
neovascularization, ...). A term written with '…' matches with modifiers in the gap: up to 6
characters without punctuation in Chinese ('视杯…扩大' in '视杯明显扩大', '黄斑…裂孔' in
'黄斑区可见全层裂孔'), up to 3 words in English ('disc … cupped'); its mention stands where its
second part does, so a negation in the gap ('黄斑区未见裂孔') precedes it.

Context (ConText, Harkema et al. 2009, as medspaCy implements it; NegEx before it). Triggers have a
direction: a pre-trigger ('no', '未见', 'suspicious for', 'history of') reaches forward to the end of
its sentence or to a termination ('but', '但', and in Chinese '，'); a post-trigger ('absent', 'not
seen', '（-）', 'cannot be excluded') reaches back to the start of its clause (a comma also ends it).
Pseudo-triggers ('not only', 'no change', '无明显变化') are matched so that the shorter trigger inside
them is not, and do nothing. Each mention is then
- negated ('no drusen', 'microaneurysms absent', '出血（-）');
- uncertain ('possible drusen', '疑似新生血管'): what it gives is `uncertain`, 'positive' (the
  default, as CheXpert's U-Ones), 'negative' or 'drop';
- historical ('history of retinal haemorrhage'), hypothetical ('rule out diabetic retinopathy',
  '建议排除') or about someone else ('family history of macular degeneration'): dropped. A laser
  scar is exempt from 'historical' (a scar is what a past treatment leaves);
- otherwise affirmed.

Measurements: a cup-to-disc ratio in any of its spellings ('C/D 0.7', 'CDR 0.3', 'cup-to-disc ratio
of 0.65', '杯盘比约0.7', '视杯/视盘=0.4') is an 'enlarged cup' mention, affirmed when the value is at
least `cup_disc_threshold` (default 0.6), else negated.

Implied findings: diabetic retinopathy named or staged implies microaneurysms (the lesion that
defines its mildest stage, present at every stage); proliferative diabetic retinopathy also implies
neovascularization (the lesion that defines it). Nothing else is implied: a named glaucoma does not
state a cup, a named retinitis pigmentosa no pigment.

Labels: a finding is positive when at least one of its mentions counts as positive. 'normal' is set
when nothing is positive and the report denies at least one finding or holds a normal cue ('no
abnormality detected', '眼底未见明显异常'; the cue check ignores negation, because the cues contain
negation words): CheXpert's "No Finding" rule. Anything else gets the all-zero vector and counts as
unlabelled.

Per-eye reports: with ``eye='right'`` or ``'left'`` (the image's eye, when the dataset says it), a
report split into sections by eye markers ('OD:', 'Left eye', '右眼', '双眼', ...) is read without
the other eye's sections; text before the first marker and both-eye sections count for either eye.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import ClassVar, Iterable, NamedTuple

import numpy as np

from retina_jax.data.knowledge import FINDING_INDEX, FINDINGS, read_json_file

__all__ = ['EYES', 'LANGUAGES', 'UNCERTAIN', 'LabelExtractor', 'Mention', 'label_names', 'log_coverage']

LANGUAGES: tuple[str, ...] = ('en', 'zh')
UNCERTAIN: tuple[str, ...] = ('positive', 'negative', 'drop')
EYES: tuple[str, ...] = ('right', 'left')
_DIR = os.path.join(os.path.dirname(__file__), 'knowledge')
_LATIN = r'[A-Za-z]'
_GAP = '…'
# Trigger categories: (JSON field stem, what a mention in its scope becomes).
_CATEGORIES = {'negation': 'negated', 'uncertain': 'uncertain', 'historical': 'historical',
               'hypothetical': 'hypothetical', 'experiencer': 'other person'}
_TRIGGER_FIELDS = ('negation_pre', 'negation_post', 'uncertain_pre', 'uncertain_post', 'historical_pre',
                   'hypothetical_pre', 'experiencer_pre', 'pseudo', 'terminations', 'clause_breaks')
_LIST_FIELDS = ('normal_cues', 'cup_disc_markers', *_TRIGGER_FIELDS)
# Item kinds besides finding names.
_SENTENCE, _CUP = '<sentence end>', '<cup/disc>'
_SENTENCE_END = re.compile(r'\.(?!\d)|[;!?\n。；！？]')   # a '.' inside a number ('0.8') ends nothing


class Mention(NamedTuple):
    """A finding (or an implying diagnosis) as the report states it."""
    finding: str   # a FINDINGS name, or an `implications` key
    text: str
    status: str    # 'affirmed', 'negated', 'uncertain', 'historical', 'hypothetical' or 'other person'


def _bounded(entry: str, pattern: str, plural: bool, lead: bool = True) -> str:
    """`pattern` for `entry`, word-bounded on the sides where the entry is made of Latin letters
    (`lead=False`: the caller checks the leading side)."""
    head = f'(?<!{_LATIN})' if lead and re.match(_LATIN, entry) else ''
    tail = (('(?:e?s)?' if plural else '') + f'(?!{_LATIN})') if re.search(f'{_LATIN}$', entry) else ''
    return head + pattern + tail


def _entry_pattern(entry: str, chinese: bool, plural: bool, lead: bool = True) -> str:
    if _GAP not in entry:
        return _bounded(entry, re.escape(entry), plural, lead)
    head, tail = (part.strip() for part in entry.split(_GAP, 1))
    gap = r'[^。；;，,：:、！!？?\n.\d]{0,6}?' if chinese else r"(?:\s+[A-Za-z][\w'/-]*){0,3}?\s+"
    return _bounded(entry, f'(?P<head>{re.escape(head)}){gap}(?P<tail>{re.escape(tail)})', plural, lead)


def _alternation(entries: Iterable[str], chinese: bool, plural: bool = False, flags=re.IGNORECASE) -> re.Pattern:
    """One alternation, longest entry first, so a match is the longest entry at its position. The
    leading word-boundary check and a look-ahead on the possible first characters are factored out
    of the alternatives: repeated per alternative they made matching ~10x slower."""
    entries = sorted(set(entries), key=len, reverse=True)
    parts = []
    for bounded in (True, False):
        group = [e for e in entries if bool(re.match(_LATIN, e)) == bounded]
        if not group:
            continue
        firsts = {c for e in group for c in ({e[0].lower(), e[0].upper()} if flags & re.IGNORECASE else {e[0]})}
        alts = '|'.join(_entry_pattern(e, chinese, plural, lead=False) for e in group)
        first = '[' + ''.join(re.escape(c) for c in sorted(firsts)) + ']'
        parts.append((f'(?<!{_LATIN})' if bounded else '') + f'(?={first})(?:{alts})')
    return re.compile('|'.join(parts), flags)


def _spellings(entry: str, variants: list[tuple[str, str]]) -> set[str]:
    """`entry` in every combination of its spelling variants (both directions of each pair)."""
    out = {entry}
    for a, b in variants:
        out |= {e.replace(a, b) for e in out} | {e.replace(b, a) for e in out}
    return out


def _strings(value) -> tuple[str, ...] | None:
    """Lowercased entries of a non-empty list of non-empty strings, else None."""
    if isinstance(value, list) and value and all(isinstance(s, str) and s for s in value):
        return tuple(s.lower() for s in value)
    return None


def label_names() -> tuple[str, ...]:
    """The report stream's label classes, in multi-hot order: the extractor's classes, which
    `LabelExtractor.load` requires to be the corpus's findings (the 'given' labels) in order. Real
    datasets' given labels (LMDB, JSONL) are mapped onto the same list."""
    return tuple(LabelExtractor.classes)


@dataclasses.dataclass
class LabelExtractor:
    """Dictionary labeller with ConText for one language; build it with ``load``. Picklable
    (compiled patterns pickle), so data-loader workers can carry it."""
    language: str
    terms: dict[str, tuple[str, ...]]
    implications: dict[str, tuple[str, ...]]        # diagnosis -> the findings it implies
    implication_terms: dict[str, tuple[str, ...]]
    abbreviations: dict[str, tuple[str, ...]]       # finding or diagnosis -> case-sensitive tokens
    triggers: dict[str, tuple[str, ...]]            # _TRIGGER_FIELDS -> entries
    normal_cues: tuple[str, ...]
    cup_disc_markers: tuple[str, ...]
    eye_markers: dict[str, tuple[str, ...]]
    spelling_variants: tuple[tuple[str, str], ...] = ()
    historical_exempt: tuple[str, ...] = ()
    uncertain: str = 'positive'
    cup_disc_threshold: float = 0.6
    classes: ClassVar[tuple[str, ...]] = FINDINGS

    def __post_init__(self):
        if self.uncertain not in UNCERTAIN:
            raise ValueError(f'uncertain={self.uncertain!r}; expected one of {UNCERTAIN}')
        if not 0.0 < self.cup_disc_threshold <= 1.0:
            raise ValueError(f'cup_disc_threshold={self.cup_disc_threshold}; expected a ratio in (0, 1]')
        zh = self.language == 'zh'
        kinds: dict[str, tuple] = {}
        for name, entries in {**self.terms, **self.implication_terms}.items():
            spelled = {s for e in entries for s in _spellings(e, self.spelling_variants)}
            kinds[name] = (_alternation([e for e in spelled if _GAP not in e], zh, plural=not zh),
                           [re.compile(_entry_pattern(e, zh, not zh), re.IGNORECASE) for e in sorted(spelled) if _GAP in e])
        self._terms = kinds
        self._abbreviations = {name: _alternation(tokens, zh, plural=False, flags=0)
                               for name, tokens in self.abbreviations.items()}
        # A trigger listed both before and after ('不除外', '可能') reaches both ways: its own kind.
        fields = dict(self.triggers)
        for category in _CATEGORIES:
            pre, post = set(fields.get(f'{category}_pre', ())), set(fields.get(f'{category}_post', ()))
            if pre & post:
                fields[f'{category}_pre'], fields[f'{category}_post'] = tuple(pre - post), tuple(post - pre)
                fields[f'{category}_both'] = tuple(pre & post)
        self._triggers = {field: _alternation(entries, zh) for field, entries in fields.items() if entries}
        markers = '|'.join(_bounded(m, re.escape(m), False) for m in sorted(self.cup_disc_markers, key=len, reverse=True))
        # A marker, then up to 24 characters that are neither digits nor clause punctuation ('ratio of',
        # ' = ', 'ratio approximately', '约为'), then the value.
        self._cup = re.compile(rf'(?:{markers})[^\d。；;，,\n]{{0,24}}?(?P<value>0?\.\d+|1(?:\.0+)?)(?!\d)',
                               re.IGNORECASE)
        self._normal = _alternation(self.normal_cues, zh)
        self._eyes = [(eye, _alternation(entries, zh)) for eye, entries in self.eye_markers.items()]

    @classmethod
    def load(cls, language: str, path: str | None = None, uncertain: str = 'positive',
             cup_disc_threshold: float = 0.6) -> LabelExtractor:
        """Read and validate ``knowledge/labels_{language}.json`` (or ``path``)."""
        if language not in LANGUAGES:
            raise ValueError(f'unknown label language {language!r}; expected one of {LANGUAGES}')
        path = path or os.path.join(_DIR, f'labels_{language}.json')
        data = read_json_file(path, 'label dictionary')
        if not isinstance(data, dict):
            raise ValueError(f'{path}: expected a JSON object')
        missing = [k for k in ('language', 'classes', 'terms', 'implications', 'abbreviations', 'eye_markers',
                               *_LIST_FIELDS) if k not in data]
        if missing:
            raise ValueError(f'{path}: missing field(s) {missing}')
        if data['language'] != language:
            raise ValueError(f"{path}: field 'language' is {data['language']!r}, expected {language!r}")
        if data['classes'] != list(FINDINGS):
            raise ValueError(f"{path}: field 'classes' must list knowledge.FINDINGS in order: {list(FINDINGS)}")
        raw = data['terms']
        if not isinstance(raw, dict) or set(raw) != set(FINDINGS[1:]):
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"{path}: field 'terms' must map each finding except 'normal' to synonyms; got {got}")
        terms = {f: _strings(raw[f]) for f in FINDINGS[1:]}
        lists = {k: _strings(data[k]) for k in _LIST_FIELDS}
        bad = [f'terms.{f}' for f, v in terms.items() if v is None]
        # pseudo-triggers, clause breaks and the English-only fields may be empty lists
        bad += [k for k, v in lists.items() if v is None and not (k in ('pseudo', 'clause_breaks') and data[k] == [])]
        implications, implication_terms = {}, {}
        for name, spec in (data['implications'] or {}).items():
            implied = spec.get('implies') if isinstance(spec, dict) else None
            if not (isinstance(implied, list) and implied and set(implied) <= set(FINDINGS[1:])) \
                    or _strings(spec.get('terms')) is None:
                bad.append(f'implications.{name}')
                continue
            implications[name], implication_terms[name] = tuple(implied), _strings(spec['terms'])
        abbreviations = {}
        for name, tokens in (data['abbreviations'] or {}).items():
            if name not in terms and name not in implications or not (
                    isinstance(tokens, list) and tokens and all(isinstance(t, str) and t for t in tokens)):
                bad.append(f'abbreviations.{name}')
            else:
                abbreviations[name] = tuple(tokens)
        eyes = data['eye_markers']
        if not isinstance(eyes, dict) or set(eyes) != {'right', 'left', 'both'} or any(_strings(v) is None for v in eyes.values()):
            bad.append('eye_markers')
        exempt = data.get('historical_exempt', [])
        if not (isinstance(exempt, list) and set(exempt) <= set(FINDINGS[1:])):
            bad.append('historical_exempt')
        variants = data.get('spelling_variants', [])
        if not (isinstance(variants, list) and all(isinstance(v, list) and len(v) == 2 and all(isinstance(s, str) and s for s in v)
                                                   for v in variants)):
            bad.append('spelling_variants')
        if bad:
            raise ValueError(f'{path}: field(s) {bad} must be non-empty lists of non-empty strings (implications: '
                             f'{{"implies": [findings], "terms": [...]}}; abbreviations: a finding or implication)')
        return cls(language, terms, implications, implication_terms, abbreviations,
                   {k: lists[k] or () for k in _TRIGGER_FIELDS}, lists['normal_cues'], lists['cup_disc_markers'],
                   {eye: _strings(v) for eye, v in eyes.items()}, tuple(map(tuple, variants)), tuple(exempt),
                   uncertain, cup_disc_threshold)

    # ---------------------------------------------------------------------------------- matching
    def _items(self, text: str) -> list[tuple[int, int, str, object]]:
        """(start, end, kind, payload) of every kept match, in reading order."""
        found = []
        for name, (plain, _) in self._terms.items():
            found += [(m.start(), m.end(), name, None) for m in plain.finditer(text)]
        for name, rx in self._abbreviations.items():
            found += [(m.start(), m.end(), name, None) for m in rx.finditer(text)]
        for field, rx in self._triggers.items():
            found += [(m.start(), m.end(), field, None) for m in rx.finditer(text)]
        found += [(m.start(), m.end(), _CUP, float(m.group('value'))) for m in self._cup.finditer(text)]
        found += [(m.start(), m.end(), _SENTENCE, None) for m in _SENTENCE_END.finditer(text)]
        # Longest first, then leftmost; sentence ends are single characters that nothing else may
        # cover except a trigger or term that contains them ('（-）').
        found.sort(key=lambda t: (t[0] - t[1], t[0]))
        taken = bytearray(len(text))
        kept = []
        for s, e, kind, payload in found:
            if not any(taken[s:e]):
                taken[s:e] = b'\1' * (e - s)
                kept.append((s, e, kind, payload))
        # Terms with a gap: only where their two parts are free; the mention stands at the second part.
        for name, (_, gapped) in self._terms.items():
            for m in (m for rx in gapped for m in rx.finditer(text)):
                head, tail = m.span('head'), (m.start('tail'), m.end())
                if not any(taken[slice(*head)]) and not any(taken[slice(*tail)]):
                    taken[slice(*tail)] = b'\1' * (tail[1] - tail[0])
                    kept.append((tail[0], tail[1], name, m.group(0)))
        return sorted(kept)

    def matches(self, text: str) -> list[Mention]:
        """Every finding and diagnosis mention, in reading order, with its ConText status."""
        items = self._items(text)
        out = []
        for i, (s, e, kind, payload) in enumerate(items):
            if kind not in self._terms and kind != _CUP:   # abbreviations name a term's finding or diagnosis
                continue
            scope = self._pre(items, i) | self._post(items, i)
            mention = payload if isinstance(payload, str) else text[s:e]
            if kind == _CUP:
                affirmed = payload >= self.cup_disc_threshold
                status = _status(scope) if affirmed else 'negated'
                out.append(Mention('enlarged cup', mention, status))
            else:
                out.append(Mention(kind, mention, _status(scope)))
        return out

    @staticmethod
    def _pre(items, i) -> set[str]:
        """Categories of the pre-triggers whose scope reaches item i."""
        out = set()
        for s, e, kind, _ in reversed(items[:i]):
            if kind in (_SENTENCE, 'terminations'):
                break
            if kind.endswith(('_pre', '_both')):
                out.add(kind.rsplit('_', 1)[0])
        return out

    @staticmethod
    def _post(items, i) -> set[str]:
        out = set()
        for s, e, kind, _ in items[i + 1:]:
            if kind in (_SENTENCE, 'terminations', 'clause_breaks'):
                break
            if kind.endswith(('_post', '_both')):
                out.add(kind.rsplit('_', 1)[0])
        return out

    def _vector(self, text: str, mentions: list[Mention]) -> np.ndarray:
        y = np.zeros(len(self.classes), np.uint8)
        denied = False
        for m in mentions:
            status = m.status
            if status == 'historical' and m.finding in self.historical_exempt:
                status = 'affirmed'
            if status == 'uncertain':
                status = {'positive': 'affirmed', 'negative': 'negated', 'drop': 'dropped'}[self.uncertain]
            if status == 'affirmed':
                for finding in self.implications.get(m.finding, (m.finding,)):
                    y[FINDING_INDEX[finding]] = 1
            denied |= status == 'negated'
        if not y.any() and (denied or self._normal.search(text)):
            y[0] = 1
        return y

    def section(self, text: str, eye: str) -> str:
        """`text` without the sections about the other eye (module docstring)."""
        if eye not in EYES:
            raise ValueError(f'eye={eye!r}; expected one of {EYES}')
        marks = sorted((m.start(), which) for which, rx in self._eyes for m in rx.finditer(text))
        if not marks:
            return text
        keep = [text[:marks[0][0]]]
        for (start, which), (end, _) in zip(marks, marks[1:] + [(len(text), None)]):
            if which in (eye, 'both'):
                keep.append(text[start:end])
        return '\n'.join(keep)

    def extract(self, text: str, eye: str | None = None) -> np.ndarray:
        """uint8 [C] multi-hot labels of one report (all zero when it is unlabelled); `eye`
        ('right'/'left'): the image's eye, for reports with a section per eye."""
        if eye is not None:
            text = self.section(text, eye)
        return self._vector(text, self.matches(text))

    def extract_many(self, texts: Iterable[str]) -> np.ndarray:
        rows = [self.extract(t) for t in texts]
        return np.stack(rows) if rows else np.zeros((0, len(self.classes)), np.uint8)

    def coverage(self, texts: Iterable[str]) -> dict:
        """How well the dictionary covers a set of reports (logged when a dataset is built)."""
        stats = {'reports': 0, 'unlabelled': 0, 'normal': 0, 'negated': 0, 'per_class': dict.fromkeys(self.classes, 0)}
        for text in texts:
            mentions = self.matches(text)
            y = self._vector(text, mentions)
            stats['reports'] += 1
            stats['unlabelled'] += int(not y.any())
            stats['normal'] += int(y[0])
            stats['negated'] += sum(m.status == 'negated' for m in mentions)
            for i in np.flatnonzero(y):
                stats['per_class'][self.classes[i]] += 1
        stats['unlabelled_fraction'] = stats['unlabelled'] / max(stats['reports'], 1)
        return stats


def _status(categories: set[str]) -> str:
    """A mention's status from the categories of the triggers in whose scope it stands."""
    for category in ('experiencer', 'hypothetical', 'negation', 'historical', 'uncertain'):
        if category in categories:
            return _CATEGORIES[category]
    return 'affirmed'


def log_coverage(stats: dict, name: str) -> str:
    """One line for the training log, e.g. 'labels (zh) of 2048 reports: 0 unlabelled (0.0%), ...'."""
    n = max(stats['reports'], 1)
    rarest = sorted((count, name) for name, count in stats['per_class'].items() if name != 'normal')[:3]
    return (f"labels ({name}) of {stats['reports']} reports: {stats['unlabelled']} unlabelled "
            f"({stats['unlabelled_fraction']:.1%}), normal {stats['normal'] / n:.1%}, "
            f"{stats['negated']} negated mentions, rarest: " + ', '.join(f'{name} {count}' for count, name in rarest))
