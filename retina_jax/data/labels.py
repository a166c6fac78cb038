"""Expert-knowledge label extraction (docs/methods.md, "ViLReF": labels read from the report).

Each report becomes a multi-hot vector over ``knowledge.FINDINGS`` ('normal' is its own class, index 0)
through an expert-authored dictionary per language, kept as data in ``knowledge/labels_{en,zh}.json``:
synonyms per finding, normal cues, NegEx-style negation cues and the words/punctuation that end a
negation's scope.

Matching: the text is lowercased and every dictionary entry (finding terms, negation cues, scope
breaks) is located; the longest matches win and never overlap, so 'retinal haemorrhages' is one
mention, a generic '渗出' cannot take part of '软性渗出斑', and '不伴有' is a cue rather than '伴有' a
scope break. English entries are word-bounded (a finding term may take a plural 's'/'es'); Chinese
has no word boundaries, so entries are plain substrings. A mention is negated when a negation cue
precedes it with no scope break in between. A finding is positive if at least one mention is not
negated. 'normal' is set iff nothing is positive and a normal cue occurs; the cue check ignores
negation because cues such as 'no abnormality detected' and '未见明显异常' contain negation words.
Anything else gets the all-zero vector and counts as unlabelled.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import ClassVar, Iterable

import numpy as np

from retina_jax.data.knowledge import FINDING_INDEX, FINDINGS, read_json_file

__all__ = ['LANGUAGES', 'LabelExtractor', 'log_coverage']

LANGUAGES: tuple[str, ...] = ('en', 'zh')
_DIR = os.path.join(os.path.dirname(__file__), 'knowledge')
_LETTER = r'[^\W\d_]'                          # any Unicode letter
_NEG, _BREAK = '<negation>', '<scope break>'   # token kinds next to the finding names
_LIST_FIELDS = ('normal_cues', 'negation_cues', 'scope_breaks')


def _pattern(entries: Iterable[str], bounded: bool, plural: bool = False) -> re.Pattern:
    """One alternation with the longest entry first, so a match is the longest entry at its position.

    ``bounded``: no letter may touch the match (English), but only on sides where the entry itself
    ends in a letter, so that punctuation such as '.' still matches right after a word. The leading
    check is factored out of the alternation: repeated per alternative it made English matching
    ~7x slower."""
    entries = sorted(set(entries), key=len, reverse=True)
    tail = ('(?:e?s)?' if plural else '') + f'(?!{_LETTER})'
    alts = [re.escape(e) + (tail if bounded and e[-1].isalpha() else '') for e in entries]
    lead = [bounded and e[0].isalpha() for e in entries]
    words = '|'.join(a for a, w in zip(alts, lead) if w)
    rest = '|'.join(a for a, w in zip(alts, lead) if not w)
    return re.compile('|'.join(filter(None, (words and f'(?<!{_LETTER})(?:{words})', rest))))


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
    """Dictionary labeller for one language; build it with ``load``. Picklable (compiled patterns
    pickle), so data-loader workers can carry it."""
    language: str
    terms: dict[str, tuple[str, ...]]
    normal_cues: tuple[str, ...]
    negation_cues: tuple[str, ...]
    scope_breaks: tuple[str, ...]
    classes: ClassVar[tuple[str, ...]] = FINDINGS

    def __post_init__(self):
        en = self.language == 'en'
        kinds = {**self.terms, _NEG: self.negation_cues, _BREAK: self.scope_breaks}
        self._patterns = [(k, _pattern(v, en, plural=en and k in self.terms)) for k, v in kinds.items()]
        self._normal = _pattern(self.normal_cues, en)

    @classmethod
    def load(cls, language: str, path: str | None = None) -> LabelExtractor:
        """Read and validate ``knowledge/labels_{language}.json`` (or ``path``)."""
        if language not in LANGUAGES:
            raise ValueError(f'unknown label language {language!r}; expected one of {LANGUAGES}')
        path = path or os.path.join(_DIR, f'labels_{language}.json')
        data = read_json_file(path, 'label dictionary')
        if not isinstance(data, dict):
            raise ValueError(f'{path}: expected a JSON object')
        missing = [k for k in ('language', 'classes', 'terms', *_LIST_FIELDS) if k not in data]
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
        bad = [f'terms.{f}' for f, v in terms.items() if v is None] + [k for k, v in lists.items() if v is None]
        if bad:
            raise ValueError(f'{path}: field(s) {bad} must be non-empty lists of non-empty strings')
        return cls(language, terms, **lists)

    def matches(self, text: str) -> list[tuple[str, str, bool]]:
        """(finding, matched text, negated) for every finding mention, in reading order."""
        text = text.lower()
        found = sorted(((m.start(), m.end(), kind) for kind, rx in self._patterns for m in rx.finditer(text)),
                       key=lambda t: (t[0] - t[1], t[0]))   # longest first, then leftmost
        taken = bytearray(len(text))
        kept = []
        for s, e, kind in found:
            if not any(taken[s:e]):
                taken[s:e] = b'\1' * (e - s)
                kept.append((s, e, kind))
        out, negating = [], False
        for s, e, kind in sorted(kept):
            if kind == _BREAK:
                negating = False
            elif kind == _NEG:
                negating = True
            else:
                out.append((kind, text[s:e], negating))
        return out

    def _vector(self, text: str, mentions: list[tuple[str, str, bool]]) -> np.ndarray:
        y = np.zeros(len(self.classes), np.uint8)
        for finding, _, negated in mentions:
            if not negated:
                y[FINDING_INDEX[finding]] = 1
        if not y.any() and self._normal.search(text.lower()):
            y[0] = 1
        return y

    def extract(self, text: str) -> np.ndarray:
        """uint8 [C] multi-hot labels of one report (all zero when it is unlabelled)."""
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
            stats['negated'] += sum(negated for *_, negated in mentions)
            for i in np.flatnonzero(y):
                stats['per_class'][self.classes[i]] += 1
        stats['unlabelled_fraction'] = stats['unlabelled'] / max(stats['reports'], 1)
        return stats


def log_coverage(stats: dict, name: str) -> str:
    """One line for the training log, e.g. 'labels (zh) of 2048 reports: 0 unlabelled (0.0%), ...'."""
    n = max(stats['reports'], 1)
    rarest = sorted((count, name) for name, count in stats['per_class'].items() if name != 'normal')[:3]
    return (f"labels ({name}) of {stats['reports']} reports: {stats['unlabelled']} unlabelled "
            f"({stats['unlabelled_fraction']:.1%}), normal {stats['normal'] / n:.1%}, "
            f"{stats['negated']} negated mentions, rarest: " + ', '.join(f'{name} {count}' for count, name in rarest))
