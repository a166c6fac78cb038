"""Procedural synthetic fundus corpus with known ground truth (docs/data.md, "The synthetic corpus").

``SyntheticFundus(CorpusSpec(...))`` is a grain ``RandomAccessDataSource``: every example is a pure
function of ``(spec, index)``. An example is sampled in two stages from
``np.random.default_rng([spec.seed, index])``: first the anatomy, the findings with their lesion
geometry and the texts (``record``), then, continuing the same generator, the rendering details
(vessel tree, texture) and the image (``__getitem__``). So ``record(i)`` equals ``self[i]`` minus
``'image'`` and costs no rendering.

Modalities (``CorpusSpec.modalities``, for KeepFIT V2's multi-modal expert set): CFP (colour fundus
photograph, the default), FFA (late-phase fluorescein angiogram: grey, bright vessels, leakage as
bright blobs, blocking lesions dark) and OCT (horizontal B-scan through the fovea: layered bands over
a bright RPE and a textured choroid). All three render the same sampled eye, as ``uint8 [S, S, 3]``
(grey replicated for FFA/OCT). An example's modality, and for an FFA/OCT expert example its caption
(which names the modality and only the findings it shows, see ``_MODALITY_SIGNS``), come from a
generator of their own, ``default_rng([seed, index, _MODALITY_STREAM])``: the eye, its labels and
reports are the same whatever the modality, and a CFP-only corpus is bit-identical to one built
before the modalities existed.

Segmentation masks (``SyntheticFundus.masks`` / ``item_with_masks``, CFP only): one binary channel
per ``MASK_CLASSES`` entry, the pixels where the image shows that structure. The CFP renderer draws
them itself while it renders, on layers of their own at the image's resolution, from the geometry it
draws into the image; random drawing calls (haemorrhage outlines, vessel trees, new vessels, pigment
spicules) are replayed on a mask layer with a copy of the renderer's generator, so the masks cost the
image's stream nothing and the image is bit-identical with or without them. A hard-edged structure
is its exact pixels; a soft-edged one (disc, cup, atrophy, cotton-wool spots, drusen) the pixels its
paste covers at least half. What is painted over leaves its channel (a vessel under a haemorrhage,
anything under a hard exudate or under a cotton-wool spot or druse at least half opaque, the atrophy
under the disc); what shows through the multiplied vessel/dark-lesion layer stays (a vessel on the
disc is in both channels). A lesion channel is all zero when the example lacks that finding. The
vessel layer's slight blur (images of 160 px and more), the cataract haze and the quality attributes
(blur, noise, exposure) do not change the masks; they are cut to the field of view (where it is at
least half open) and mirrored with a left eye.

Geometry is sampled in a canonical right-eye frame in normalised coordinates ``u in [-1, 1]``
(pixel = ``(u + 1) * S / 2``; the field of view has radius ~0.94; the optic disc is on the right,
i.e. nasal side, temporal is ``-x``); left eyes are rendered mirrored. All sizes are fractions of
the image size, so any ``image_size >= 32`` works.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from retina_jax.data.knowledge import (
    ATTRIBUTES, CATEGORY_DESCRIPTIONS, CONDITION_FINDINGS, CONDITION_NAMES_ZH, CONDITIONS, DR_GRADE_CATEGORIES,
    DR_GRADE_NAMES_EN, DR_GRADE_NAMES_ZH, FINDING_INDEX, FINDING_SYNONYMS_EN, FINDING_SYNONYMS_ZH,
    FINDINGS,
)

__all__ = ['CorpusSpec', 'MASK_CLASSES', 'MODALITIES', 'SyntheticFundus', 'dr_grade_from_lesions']

FOV_RADIUS = 0.94
MODALITIES = ('CFP', 'FFA', 'OCT')
# Third seed word of an example's modality generator: the modality and its caption come from a stream
# of their own, so adding modalities leaves every other draw (and a CFP-only corpus) unchanged.
_MODALITY_STREAM = 0x4D4F44
# Channels of the CFP segmentation masks, in order: the findings the renderer draws as a region of their
# own (FINDINGS names), then the anatomy every eye has. Not here: tessellation (a diffuse choroidal
# pattern over the whole fundus), cataract haze (global), arterial narrowing and av nicking (they change
# the vessels, whose channel shows them), enlarged cup (the 'optic cup' channel, in every eye). The
# peripapillary atrophy channel is its crescent outside the disc, which the renderer paints over it.
MASK_CLASSES = ('microaneurysm', 'haemorrhage', 'hard exudate', 'cotton-wool spot', 'neovascularization', 'drusen',
                'geographic atrophy', 'peripapillary atrophy', 'bone-spicule pigment', 'macular hole', 'laser scar',
                'vessels', 'optic disc', 'optic cup')


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    seed: int = 0
    size: int = 10_000                 # number of examples (len of the source)
    image_size: int = 512              # square output, any size >= 32 works
    conditions: tuple[str, ...] = CONDITIONS   # primary conditions drawn, uniformly unless weights given
    condition_weights: tuple[float, ...] | None = None
    comorbidity_prob: float = 0.15     # chance of a second condition
    attribute_prob: float = 0.2        # chance of a quality attribute (drawn visibly)
    expert_fraction: float = 0.3       # fraction of examples with an MM-Retinal-style expert caption
    difficulty: float = 0.0            # 0 = large, high-contrast lesions; 1 = small, subtle
    single_condition: bool = False     # exactly one condition per image, no comorbidity
    modalities: tuple[str, ...] = ('CFP',)     # imaging modalities drawn per example (MODALITIES)
    modality_weights: tuple[float, ...] | None = None   # uniform when None or () (configs write ())

    def __post_init__(self):
        if self.image_size < 32:
            raise ValueError(f'image_size must be >= 32, got {self.image_size}')
        if self.size < 0:
            raise ValueError(f'size must be >= 0, got {self.size}')
        unknown = [c for c in self.conditions if c not in CONDITIONS]
        if unknown or not self.conditions:
            raise ValueError(f'conditions must be a non-empty subset of {CONDITIONS}, got {self.conditions}')
        if self.condition_weights is not None and len(self.condition_weights) != len(self.conditions):
            raise ValueError('condition_weights must have one weight per condition')
        if not 0.0 <= self.difficulty <= 1.0:
            raise ValueError(f'difficulty must be in [0, 1], got {self.difficulty}')
        mods = (self.modalities,) if isinstance(self.modalities, str) else tuple(self.modalities)
        if not mods or any(m not in MODALITIES for m in mods) or len(set(mods)) != len(mods):
            raise ValueError(f'modalities must be a non-empty tuple of distinct names from {MODALITIES}, got {self.modalities!r}')
        object.__setattr__(self, 'modalities', mods)
        if self.modality_weights is not None:
            w = tuple(float(v) for v in self.modality_weights) or None
            if w is not None and len(w) != len(mods):
                raise ValueError(f'modality_weights must have one weight per modality ({len(mods)}), got {self.modality_weights!r}')
            if w is not None and (not all(math.isfinite(v) and v >= 0 for v in w) or sum(w) <= 0):
                raise ValueError(f'modality_weights must be finite, >= 0 and not all 0, got {self.modality_weights!r}')
            object.__setattr__(self, 'modality_weights', w)


def dr_grade_from_lesions(n_ma: int, n_haem: int, haem_quadrants: int, n_exudate: int, n_cws: int,
                          venous_beading: bool, neovascularization: bool) -> int:
    """Simplified international clinical DR scale (4-2-1 rule reduced to haemorrhage counts)."""
    if neovascularization:
        return 4
    if (n_haem >= 20 and haem_quadrants == 4) or venous_beading:
        return 3
    if n_haem > 0 or n_exudate > 0 or n_cws > 0:
        return 2
    if n_ma > 0:
        return 1
    return 0


# --------------------------------------------------------------------------------------------------
# sampling helpers (canonical right-eye frame)

def _u(rng, lo, hi, n=None):
    return rng.uniform(lo, hi, n)


def _ri(rng, lo, hi):
    """Integer in [lo, hi] inclusive."""
    return int(rng.integers(lo, hi + 1))


def _scatter(rng, n, rmin, rmax, disc, center=(0.0, 0.0), ang=(0.0, 2 * math.pi)):
    """n points uniform in an annulus sector around center, inside the FOV and off the disc."""
    out = np.zeros((0, 2))
    for _ in range(8):
        m = max(4 * n, 8)
        a = rng.uniform(ang[0], ang[1], m)
        r = np.sqrt(rng.uniform(rmin ** 2, rmax ** 2, m))
        p = np.stack([center[0] + r * np.cos(a), center[1] + r * np.sin(a)], 1)
        ok = (np.hypot(p[:, 0], p[:, 1]) < FOV_RADIUS - 0.06) & \
             (np.hypot(p[:, 0] - disc[0], p[:, 1] - disc[1]) > disc[2] * 1.5)
        out = np.concatenate([out, p[ok]])
        if len(out) >= n:
            break
    return out[:n]


def _quadrants(pts, fovea):
    if len(pts) == 0:
        return 0
    q = (pts[:, 0] < fovea[0]).astype(int) * 2 + (pts[:, 1] < fovea[1]).astype(int)
    return len(np.unique(q))


# --------------------------------------------------------------------------------------------------
# texts

_QTY_FEW = ('a few', 'several', 'scattered', 'some')
_QTY_MANY = ('multiple', 'numerous', 'many', 'extensive')


def _cap(s):
    return s[:1].upper() + s[1:]


def _join_en(items, rng):
    if len(items) == 1:
        return items[0]
    conj = ' and ' if rng.random() < 0.7 else ', as well as '
    return ', '.join(items[:-1]) + conj + items[-1]


def _finding_phrase_en(f, syn, p, rng):
    d = p['lesions']
    if f == 'microaneurysm':
        n = len(d['ma'])
        return f"{rng.choice(_QTY_MANY if n >= 10 else _QTY_FEW)} {syn}" + \
            (' in the posterior pole' if rng.random() < 0.5 else '')
    if f == 'haemorrhage':
        n = len(d['haem'])
        q = _quadrants(d['haem'][:, :2], p['fovea'])
        loc = ' in all four quadrants' if q == 4 else rng.choice(['', ' in the posterior pole', f' in {q} quadrant' + ('s' if q > 1 else '')])
        kind = rng.choice(['', 'dot and blot ', 'flame-shaped and blot ']) if n >= 3 else ''
        count = f' (about {n})' if rng.random() < 0.4 else ''
        return f"{rng.choice(_QTY_MANY if n >= 10 else _QTY_FEW)} {kind}{syn}{count}{loc}"
    if f == 'hard exudate':
        ring = d['exudate_ring']
        return f"{syn} " + (rng.choice(['arranged in a circinate ring near the macula', 'forming a ring near the fovea'])
                            if ring else rng.choice(['clustered near the macula', 'in clusters at the posterior pole']))
    if f == 'cotton-wool spot':
        n = len(d['cws'])
        return f"{rng.choice(_QTY_MANY if n >= 5 else _QTY_FEW)} {syn}" + rng.choice(['', ' along the vascular arcades'])
    if f == 'neovascularization':
        return f"{syn} " + ('at the optic disc' if d['nv_at_disc'] else 'elsewhere along the vascular arcades')
    if f == 'drusen':
        size = d['drusen_size']
        n = len(d['drusen'])
        return f"{rng.choice(_QTY_MANY if n >= 15 else _QTY_FEW)} {size} {syn}" + \
            rng.choice([' at the macula', ' centred on the fovea', ' in the macular area'])
    if f == 'geographic atrophy':
        return f"{syn} " + rng.choice(['involving the macula', 'at the posterior pole'])
    if f == 'peripapillary atrophy':
        return f"{syn} " + rng.choice(['on the temporal side of the disc', 'around the optic disc'])
    if f == 'tessellation':
        return f"{syn}" + rng.choice(['', ' with visible choroidal vessels'])
    if f == 'bone-spicule pigment':
        return f"{syn} " + rng.choice(['in the mid-periphery', 'in the peripheral retina'])
    if f == 'macular hole':
        return f"a {syn} " + rng.choice(['at the fovea', 'at the centre of the macula'])
    if f == 'arterial narrowing':
        return rng.choice(['generalised ', 'diffuse ', '']) + syn
    if f == 'av nicking':
        return f"{syn}" + rng.choice(['', ' at arteriovenous crossings'])
    if f == 'cataract haze':
        return f"{syn} " + rng.choice(['reducing image clarity', 'obscuring fine retinal details', 'lowering the contrast'])
    if f == 'laser scar':
        return f"{syn} " + rng.choice(['in the mid-periphery', 'from panretinal photocoagulation'])
    raise KeyError(f)


_ZH_LOC = {
    'microaneurysm': ('后极部', ''), 'haemorrhage': ('后极部', '视网膜', ''), 'hard exudate': ('黄斑区附近', ''),
    'cotton-wool spot': ('血管弓附近', ''), 'neovascularization': ('',), 'drusen': ('黄斑区', ''),
    'geographic atrophy': ('黄斑区',), 'peripapillary atrophy': ('视盘颞侧',), 'tessellation': ('',),
    'bone-spicule pigment': ('周边部', '中周部'), 'macular hole': ('黄斑中心',), 'arterial narrowing': ('',),
    'av nicking': ('',), 'cataract haze': ('',), 'laser scar': ('中周部',),
}


def _finding_phrase_zh(f, syn, p, rng):
    d = p['lesions']
    loc = rng.choice(_ZH_LOC[f])
    if f == 'haemorrhage':
        q = _quadrants(d['haem'][:, :2], p['fovea'])
        if q == 4:
            loc = '四个象限'
        return f"{loc}可见{rng.choice(['多处', '散在', ''])}{syn}"
    if f == 'neovascularization':
        loc = '视盘' if d['nv_at_disc'] else '血管弓附近'
    if f == 'drusen':
        size = {'small': '小', 'medium': '中等大小', 'large': '大'}[d['drusen_size']]
        return f"{loc}可见{size}{syn}"
    return f"{loc}{rng.choice(['可见', '见'])}{syn}"


def _write_texts(p, rng):
    """English + Chinese reports and the expert caption from the sampled findings."""
    eye = p['eye']
    present = [f for f in FINDINGS[1:] if f in p['findings']]
    absent = [f for f in FINDINGS[1:] if f not in p['findings']]
    cdr = p['cdr']
    cups = 'enlarged cup' in p['findings']
    conds = p['conditions']

    # --- English
    others = [f for f in present if f != 'enlarged cup']
    order = rng.permutation(len(others))
    phrases = [_finding_phrase_en(others[i], rng.choice(FINDING_SYNONYMS_EN[others[i]]), p, rng) for i in order]
    opening = rng.choice([f'{_cap(eye)} eye:', f'Fundus photograph of the {eye} eye.', f'Colour fundus photograph, {eye} eye.',
                          f'{_cap(eye)} eye fundus examination.'])
    of = rng.choice(['of ', ''])
    if cups:
        disc = rng.choice([f'The optic disc shows {rng.choice(FINDING_SYNONYMS_EN["enlarged cup"])}, cup-to-disc ratio {of}{cdr:.1f}.',
                           f'{_cap(rng.choice(FINDING_SYNONYMS_EN["enlarged cup"]))} with a cup-to-disc ratio {of}{cdr:.1f}.'])
    else:
        disc = rng.choice([f'The optic disc is pink and well defined, cup-to-disc ratio {of}{cdr:.1f}.',
                           f'Optic disc with a cup-to-disc ratio {of}{cdr:.1f}.', f'Cup-to-disc ratio {of}{cdr:.1f}.'])
    sents = []
    if phrases:
        if rng.random() < 0.5:
            sents.append(rng.choice(['Findings include ', 'There are ', 'The fundus shows ']) + _join_en(phrases, rng) + '.')
        else:
            for ph in phrases:
                sents.append(rng.choice(['{} noted.', '{} observed.', '{}.', '{} seen.']).format(_cap(ph)))
    body = [disc] + sents if rng.random() < 0.5 else sents + [disc]
    if not present:
        body.insert(0, rng.choice(['Normal fundus.', 'The retina appears healthy.', 'No abnormality detected.']))
        body.append(rng.choice(['The macula and retinal vessels appear normal.', 'Macula and vessels are unremarkable.', '']))
    n_neg = 0
    if absent and rng.random() < (0.9 if not present else 0.7):
        n_neg = min(len(absent), _ri(rng, 1, 3))
    negs = [absent[i] for i in sorted(rng.choice(len(absent), n_neg, replace=False))] if n_neg else []
    neg_en = []
    for f in negs:
        syn = rng.choice(FINDING_SYNONYMS_EN[f])
        neg_en.append(rng.choice(['No {}.', 'There is no evidence of {}.', 'No {} seen.', 'Absence of {}.', 'The fundus is without {}.']).format(syn))
    if present:
        names = [DR_GRADE_NAMES_EN[p['dr_grade']] if c == 'diabetic retinopathy' else c for c in conds]
        impression = rng.choice(['Impression: {}.', 'Diagnosis: {}.', 'Findings consistent with {}.']).format(' and '.join(names))
    else:
        impression = rng.choice(['Impression: normal fundus.', 'Diagnosis: normal.', 'Conclusion: healthy retina.'])
    report_en = ' '.join(s for s in [opening] + body + neg_en + [impression] if s)

    # --- Chinese
    eye_zh = '右眼' if eye == 'right' else '左眼'
    opening = rng.choice([f'{eye_zh}眼底彩照：', f'{eye_zh}：', f'眼别：{eye_zh}。'])
    if cups:
        disc = f'视盘{rng.choice(FINDING_SYNONYMS_ZH["enlarged cup"])}，杯盘比{cdr:.1f}。'
    else:
        disc = rng.choice([f'视盘边界清楚，色淡红，杯盘比{cdr:.1f}。', f'视盘杯盘比{cdr:.1f}。', f'杯盘比{cdr:.1f}，视盘色泽正常。'])
    zh = [_finding_phrase_zh(others[i], rng.choice(FINDING_SYNONYMS_ZH[others[i]]), p, rng) for i in order]
    body = ('，'.join(zh) + '。') if zh else ''
    parts = [disc, body] if rng.random() < 0.5 else [body, disc]
    if not present:
        parts.insert(0, rng.choice(['眼底未见明显异常。', '视网膜平伏，黄斑中心凹反光可见。']))
    neg_zh = ''
    if negs:
        neg_zh = '，'.join(rng.choice(['未见{}', '无{}', '没有{}']).format(rng.choice(FINDING_SYNONYMS_ZH[f])) for f in negs) + '。'
    if present:
        names = [DR_GRADE_NAMES_ZH[p['dr_grade']] if c == 'diabetic retinopathy' else CONDITION_NAMES_ZH[c] for c in conds]
        impression = rng.choice(['诊断：{}。', '印象：{}。', '考虑{}。']).format('合并'.join(names))
    else:
        impression = rng.choice(['诊断：正常眼底。', '印象：眼底正常。'])
    report_zh = opening + ''.join(parts) + neg_zh + impression

    # --- expert caption (MM-Retinal style)
    caption = ''
    if p['is_expert']:
        if present:
            names = [DR_GRADE_NAMES_EN[p['dr_grade']] if c == 'diabetic retinopathy' else c for c in conds]
            items = [FINDING_SYNONYMS_EN[f][0] for f in present]
            caption = (f"{rng.choice(['Colour fundus photograph', 'Fundus image', 'Retinal photograph'])} of the {eye} eye showing "
                       f"{_join_en(items, rng)}, consistent with {' and '.join(names)}.")
            if cups or rng.random() < 0.3:
                caption += f' The cup-to-disc ratio is about {cdr:.1f}.'
        else:
            caption = rng.choice([f'Normal colour fundus photograph of the {eye} eye with a healthy optic disc, macula and retinal vessels.',
                                  f'Healthy {eye} fundus without lesions; the cup-to-disc ratio is about {cdr:.1f}.'])
    return str(report_en), str(report_zh), str(caption)


# --------------------------------------------------------------------------------------------------
# modalities: what FFA and OCT show, and their expert captions

# Which findings FFA and an OCT B-scan show, and how an expert caption words them (alternatives, one
# drawn per caption); () = not visible in that modality. Labels and reports stay the eye's ground
# truth whatever the modality; only the caption is restricted to this table.
#   finding              FFA (late-phase angiogram, grey)                 OCT (horizontal B-scan through the fovea)
#   microaneurysm        bright pinpoint dots                             -
#   haemorrhage          dark blocking patches                            dark intraretinal cysts + thickening (oedema)
#   hard exudate         fuzzy bright leakage around the exudates         hyperreflective dots in the outer plexiform /
#                                                                         nuclear layers with a shadow below [slab]
#   cotton-wool spot     dark patches of capillary non-perfusion (*)      -
#   neovascularization   fine bright vessels with profuse fuzzy leakage   -
#   drusen               faint bright dots (staining)                     dome-shaped RPE elevations [slab]
#   geographic atrophy   bright window defect                             RPE / outer-retina loss, bright choroid below
#   enlarged cup         - (disc fluoresces evenly)                       thin nerve fibre and ganglion cell layers,
#                                                                         thinnest on the disc side
#   peripapillary atr.   bright peripapillary window defect               - (outside the scan)
#   tessellation         bright choroidal vessel pattern                  thin choroid, steeply curved profile
#   bone-spicule pigm.   dark blocking spicules                           -
#   macular hole         bright window defect at the fovea                full-thickness gap at the fovea, cystic rims
#   arterial narrowing   thin arteries (the shared vessel geometry)       -
#   av nicking           vein interrupted at the crossing                 -
#   cataract haze        blurred, veiled image                            weak, blurred signal
#   laser scar           bright-rimmed spots with dark centres            - (peripheral)
# [slab]: a B-scan cuts only the drusen / exudates within _OCT_SLAB of its line (plus their radius);
# when none is cut the finding is not visible. (*) Cotton-wool spots are ischaemic, so an angiogram
# shows them dark (non-perfusion), not as leakage.
_MODALITY_SIGNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    'microaneurysm': (('pinpoint hyperfluorescent microaneurysms', 'multiple hyperfluorescent dots of microaneurysms'), ()),
    'haemorrhage': (('hypofluorescent blocking from retinal haemorrhages', 'haemorrhages blocking the fluorescence'),
                    ('cystoid intraretinal fluid with retinal thickening', 'intraretinal cysts of macular oedema')),
    'hard exudate': (('fuzzy late leakage at the macula', 'focal leakage near the macula'),
                     ('hyperreflective foci of hard exudates in the outer retina', 'hard exudates as hyperreflective dots with shadowing')),
    'cotton-wool spot': (('patches of capillary non-perfusion at cotton-wool spots',
                          'hypofluorescent areas of capillary non-perfusion'), ()),
    'neovascularization': (('profuse leakage from new vessels', 'leaking neovascularization'), ()),
    'drusen': (('faint hyperfluorescent staining of drusen', 'small hyperfluorescent drusen at the macula'),
               ('dome-shaped elevations of the RPE from drusen', 'drusen elevating the retinal pigment epithelium')),
    'geographic atrophy': (('a well-demarcated hyperfluorescent window defect of geographic atrophy',
                            'a window defect from geographic atrophy'),
                           ('loss of the RPE and outer retina with choroidal hypertransmission (geographic atrophy)',
                            'geographic atrophy with RPE loss and increased signal transmission into the choroid')),
    'enlarged cup': ((), ('thinning of the nerve fibre and ganglion cell layers towards the disc',
                          'a thin nerve fibre layer on the disc side, as in increased cupping')),
    'peripapillary atrophy': (('a peripapillary window defect of peripapillary atrophy', 'hyperfluorescence of peripapillary atrophy'), ()),
    'tessellation': (('prominent choroidal vessels of a tessellated fundus', 'a visible choroidal vessel pattern (tessellation)'),
                     ('a thin choroid with a steeply curved posterior profile', 'marked choroidal thinning and posterior curvature')),
    'bone-spicule pigment': (('hypofluorescent blocking by bone-spicule pigment in the periphery',
                              'dark bone-spicule pigment blocking the fluorescence'), ()),
    'macular hole': (('a foveal window defect from a macular hole', 'a round hyperfluorescent spot of a macular hole at the fovea'),
                     ('a full-thickness macular hole at the fovea', 'a full-thickness macular hole with cystic edges')),
    'arterial narrowing': (('narrowed arteries', 'attenuated arterioles'), ()),
    'av nicking': (('arteriovenous nicking at the crossings', 'av nicking'), ()),
    'cataract haze': (('a veiled, blurred angiogram from hazy media', 'a hazy image from lens opacity'),
                      ('weak, blurred signal from hazy media', 'reduced signal strength from lens opacity')),
    'laser scar': (('laser scars with hyperfluorescent rims', 'photocoagulation scars with staining edges'), ()),
}
assert set(_MODALITY_SIGNS) == set(FINDINGS[1:])

_OCT_HALF_WIDTH = 0.45    # the B-scan spans fovea x +- this (normalised units): temporal macula to the disc margin
_OCT_SLAB = 0.06          # a B-scan cuts dot lesions within this distance of its line (plus their radius)


def _oct_cut(pts: np.ndarray, p: dict) -> np.ndarray:
    """The rows of (x, y, r) lesions the foveal B-scan cuts."""
    fx, fy = p['fovea']
    ok = (np.abs(pts[:, 1] - fy) < _OCT_SLAB + pts[:, 2]) & (np.abs(pts[:, 0] - fx) < _OCT_HALF_WIDTH - pts[:, 2])
    return pts[ok]


def _visible_findings(p: dict, modality: str) -> list[str]:
    """Findings of the example that `modality` shows (FINDINGS order)."""
    present = [f for f in FINDINGS[1:] if f in p['findings']]
    if modality == 'CFP':
        return present
    col = MODALITIES.index(modality) - 1
    vis = [f for f in present if _MODALITY_SIGNS[f][col]]
    if modality == 'OCT':
        L = p['lesions']
        vis = [f for f in vis if not (f == 'drusen' and not len(_oct_cut(L['drusen'], p)))
               and not (f == 'hard exudate' and not len(_oct_cut(L['exudates'], p)))]
    return vis


_CAPTION_OPENINGS = {
    'FFA': ('Fluorescein angiography of the {eye} eye showing', 'Fundus fluorescein angiogram of the {eye} eye showing',
            'Fluorescein angiogram (FFA) of the {eye} eye demonstrating', 'Late-phase fluorescein angiography, {eye} eye, showing'),
    'OCT': ('OCT B-scan through the fovea of the {eye} eye showing', 'Horizontal OCT B-scan through the fovea, {eye} eye, showing',
            'Optical coherence tomography (OCT) of the {eye} macula showing', 'Foveal OCT scan of the {eye} eye demonstrating'),
}
_CAPTION_NORMAL = {
    'FFA': ('Normal fluorescein angiogram of the {eye} eye: the retinal vessels fill evenly without leakage or blockage.',
            'Fluorescein angiography of the {eye} eye within normal limits, with a normal foveal avascular zone and no leakage.'),
    'OCT': ('Normal OCT B-scan through the fovea of the {eye} eye with a preserved foveal pit and intact retinal layers.',
            'OCT of the {eye} macula within normal limits: normal foveal contour, continuous outer retinal bands and RPE.'),
}


def _modality_caption(p: dict, modality: str, rng) -> str:
    """MM-Retinal-style expert caption of an FFA / OCT image: names the modality and only the findings
    it shows (_MODALITY_SIGNS), and the conditions those findings belong to."""
    eye = p['eye']
    vis = _visible_findings(p, modality)
    if not vis:
        return str(rng.choice(_CAPTION_NORMAL[modality])).format(eye=eye)
    col = MODALITIES.index(modality) - 1
    order = rng.permutation(len(vis))
    phrases = [str(rng.choice(_MODALITY_SIGNS[vis[i]][col])) for i in order]
    names = []
    for c in p['conditions']:
        core, opt = CONDITION_FINDINGS[c]
        if set(core + opt) & set(vis):
            # an angiogram grades DR (new vessels, non-perfusion); a B-scan does not
            names.append(DR_GRADE_NAMES_EN[p['dr_grade']] if c == 'diabetic retinopathy' and modality == 'FFA' else c)
    caption = f"{str(rng.choice(_CAPTION_OPENINGS[modality])).format(eye=eye)} {_join_en(phrases, rng)}"
    return caption + (f", consistent with {' and '.join(names)}." if names else '.')


def _draw_modality(spec: CorpusSpec, index: int, p: dict) -> None:
    """Sets p['modality'] (and the caption of an FFA / OCT expert example) from the example's own
    modality generator; the default CFP-only corpus draws nothing."""
    if spec.modalities == ('CFP',):
        p['modality'] = 'CFP'
        return
    rng = np.random.default_rng([spec.seed, index, _MODALITY_STREAM])
    mods = spec.modalities
    w = np.asarray(spec.modality_weights or [1.0] * len(mods), float)
    p['modality'] = mods[int(rng.choice(len(mods), p=w / w.sum()))] if len(mods) > 1 else mods[0]
    if p['modality'] != 'CFP' and p['is_expert']:
        p['caption'] = _modality_caption(p, p['modality'], rng)


# --------------------------------------------------------------------------------------------------
# sampling

def _sample(spec: CorpusSpec, rng: np.random.Generator) -> dict:
    d = float(spec.difficulty)
    big = 1.0 - 0.45 * d                      # lesion size scale
    p: dict = {}
    p['eye'] = 'right' if rng.random() < 0.5 else 'left'
    w = np.asarray(spec.condition_weights if spec.condition_weights is not None else [1.0] * len(spec.conditions), float)
    primary = spec.conditions[int(rng.choice(len(spec.conditions), p=w / w.sum()))]
    conds = [primary]
    if not spec.single_condition and primary != 'normal' and rng.random() < spec.comorbidity_prob:
        pool = [c for c in spec.conditions if c not in ('normal', primary)] or [c for c in CONDITIONS if c not in ('normal', primary)]
        conds.append(pool[int(rng.integers(len(pool)))])
    p['conditions'] = conds

    # anatomy
    disc = (0.47 + _u(rng, -0.03, 0.03), _u(rng, -0.05, 0.03), _u(rng, 0.10, 0.125))
    fovea = (-0.06 + _u(rng, -0.03, 0.03), 0.03 + _u(rng, -0.03, 0.03))
    p['disc'], p['fovea'] = disc, fovea
    findings: set[str] = set()
    L: dict = {'ma': np.zeros((0, 3)), 'haem': np.zeros((0, 5)), 'exudates': np.zeros((0, 3)), 'exudate_ring': False,
               'cws': np.zeros((0, 3)), 'nv': [], 'nv_at_disc': False, 'beading': False, 'drusen': np.zeros((0, 3)),
               'drusen_size': 'medium', 'ga': None, 'spicules': np.zeros((0, 3)), 'hole': None, 'scars': np.zeros((0, 3)),
               'nicks': 0, 'haze': 0.0, 'narrow': 1.0}
    cdr = _u(rng, 0.2, 0.4)
    dr_grade = 0

    def abdhaem(n, flame_only=False, quadrants4=False):
        if quadrants4:
            per = max(5, n // 4)
            pts = np.concatenate([_scatter(rng, per, 0.15, 0.85, disc, fovea, (k * math.pi / 2, (k + 1) * math.pi / 2)) for k in range(4)])
        else:
            pts = _scatter(rng, n, 0.12, 0.8, disc, fovea)
        m = len(pts)
        size = _u(rng, 0.022, 0.042, m) * big
        kind = np.full(m, 2.0) if flame_only else rng.integers(0, 3, m).astype(float)
        asp = _u(rng, 0.6, 1.0, m)
        L['haem'] = np.concatenate([L['haem'], np.concatenate([pts, size[:, None], kind[:, None], asp[:, None]], 1)])
        findings.add('haemorrhage')

    def abdcws(n):
        pts = _scatter(rng, n, 0.2, 0.5, disc, fovea)
        L['cws'] = np.concatenate([L['cws'], np.concatenate([pts, (_u(rng, 0.03, 0.05, len(pts)) * big)[:, None]], 1)])
        findings.add('cotton-wool spot')

    # diabetic retinopathy first: its grade follows its own lesions (a comorbidity may add more)
    for c in sorted(conds, key=lambda c: c != 'diabetic retinopathy'):
        if c == 'diabetic retinopathy':
            probs = np.array([0.1, 0.35, 0.3, 0.25]) * (1 - d) + np.array([0.35, 0.35, 0.2, 0.1]) * d
            g = 1 + int(rng.choice(4, p=probs))
            n_ma = _ri(rng, 6, 14) if g == 1 else _ri(rng, 8, 20)
            pts = _scatter(rng, n_ma, 0.08, 0.7, disc, fovea)
            L['ma'] = np.concatenate([pts, (_u(rng, 0.008, 0.013, len(pts)) * (1 - 0.3 * d))[:, None]], 1)
            findings.add('microaneurysm')
            if g >= 2:
                if g == 2:
                    abdhaem(_ri(rng, 3, 8))
                elif g == 3:
                    abdhaem(_ri(rng, 20, 30), quadrants4=True)
                    L['beading'] = bool(rng.random() < 0.5)
                else:
                    abdhaem(_ri(rng, 6, 20))
                if rng.random() < {2: 0.8, 3: 0.85, 4: 0.7}[g]:
                    findings.add('hard exudate')
                    ring = bool(rng.random() < 0.5)
                    L['exudate_ring'] = ring
                    ex = []
                    for _ in range(_ri(rng, 1, 2 if ring else 3)):
                        a = _u(rng, 0, 2 * math.pi)
                        rr = _u(rng, 0.12, 0.3)
                        cx, cy = fovea[0] + rr * math.cos(a), fovea[1] + rr * math.sin(a)
                        if ring:
                            k = _ri(rng, 10, 18)
                            rad = _u(rng, 0.045, 0.08) * big
                            t = rng.uniform(0, 2 * math.pi, k)
                            q = np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], 1) + rng.normal(0, 0.008, (k, 2))
                        else:
                            k = _ri(rng, 8, 16)
                            q = np.array([cx, cy]) + rng.normal(0, 0.035, (k, 2))
                        ex.append(np.concatenate([q, (_u(rng, 0.008, 0.016, k) * (1 - 0.35 * d))[:, None]], 1))
                    L['exudates'] = np.concatenate(ex)
                if rng.random() < {2: 0.3, 3: 0.7, 4: 0.5}[g]:
                    abdcws(_ri(rng, 1, 5))
                if g == 4:
                    findings.add('neovascularization')
                    L['nv_at_disc'] = bool(rng.random() < 0.6)
                    tufts = []
                    for _ in range(_ri(rng, 1, 3)):
                        if L['nv_at_disc']:
                            a = _u(rng, 0, 2 * math.pi)
                            rr = _u(rng, 0, 0.8) * disc[2]
                            tufts.append((disc[0] + rr * math.cos(a), disc[1] + rr * math.sin(a)))
                        else:
                            tufts.append(tuple(_scatter(rng, 1, 0.3, 0.6, disc, fovea)[0]))
                    L['nv'] = tufts
                    if rng.random() < 0.35:
                        findings.add('laser scar')
                        pts = _scatter(rng, _ri(rng, 30, 60), 0.5, 0.85, disc, (0.0, 0.0))
                        L['scars'] = np.concatenate([pts, (_u(rng, 0.02, 0.03, len(pts)) * big)[:, None]], 1)
            dr_grade = dr_grade_from_lesions(len(L['ma']), len(L['haem']), _quadrants(L['haem'][:, :2], fovea),
                                             len(L['exudates']), len(L['cws']), L['beading'], 'neovascularization' in findings)
            assert dr_grade == g, (dr_grade, g)
        elif c == 'glaucoma':
            cdr = _u(rng, 0.72 - 0.12 * d, 0.9 - 0.15 * d)
            findings.add('enlarged cup')
        elif c == 'age-related macular degeneration':
            findings.add('drusen')
            size = str(rng.choice(['small', 'medium', 'large'], p=np.array([0.0, 0.4, 0.6]) * (1 - d) + np.array([0.4, 0.4, 0.2]) * d))
            L['drusen_size'] = size
            n = int(_ri(rng, 15, 35) * (1 - 0.4 * d))
            rad = {'small': (0.008, 0.014), 'medium': (0.015, 0.024), 'large': (0.024, 0.038)}[size]
            pts = np.array(fovea) + rng.normal(0, 0.11, (n, 2))
            L['drusen'] = np.concatenate([pts, _u(rng, *rad, n)[:, None]], 1)
            if rng.random() < 0.3:
                findings.add('geographic atrophy')
                L['ga'] = (fovea[0] + _u(rng, -0.03, 0.03), fovea[1] + _u(rng, -0.03, 0.03), _u(rng, 0.07, 0.13) * big)
        elif c == 'cataract':
            findings.add('cataract haze')
            L['haze'] = _u(rng, 0.5, 0.62) * (1 - 0.45 * d)
        elif c == 'pathologic myopia':
            findings.update(('tessellation', 'peripapillary atrophy'))
            L['ppa'] = _u(rng, 1.35, 1.65)
            L['tess'] = _u(rng, 0.75, 1.0) * (1 - 0.5 * d)
        elif c == 'retinitis pigmentosa':
            findings.update(('bone-spicule pigment', 'arterial narrowing'))
            n = int(_ri(rng, 30, 60) * (1 - 0.4 * d))
            pts = _scatter(rng, n, 0.5, 0.88, disc, (0.0, 0.0))
            L['spicules'] = np.concatenate([pts, (_u(rng, 0.018, 0.035, len(pts)) * big)[:, None]], 1)
            L['narrow'] = min(L['narrow'], 0.55)
        elif c == 'macular hole':
            findings.add('macular hole')
            L['hole'] = _u(rng, 0.035, 0.05) * (1 - 0.3 * d)
        elif c == 'hypertensive retinopathy':
            findings.update(('arterial narrowing', 'av nicking'))
            L['narrow'] = min(L['narrow'], 0.5)
            L['nicks'] = _ri(rng, 3, 6)
            if rng.random() < 0.4:
                abdhaem(_ri(rng, 3, 8), flame_only=True)
            if rng.random() < 0.35:
                abdcws(_ri(rng, 1, 4))
    p['lesions'] = L
    p['findings'] = findings
    p['cdr'] = round(float(cdr), 2)
    p['dr_grade'] = dr_grade

    # attributes
    attrs: list[str] = []
    if rng.random() < spec.attribute_prob:
        attrs.append(ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))])
        if rng.random() < 0.2:
            second = [a for a in ATTRIBUTES if a not in attrs and {a, attrs[0]} != {'underexposed', 'overexposed'}]
            attrs.append(second[int(rng.integers(len(second)))])
    p['atributes'] = [a for a in ATTRIBUTES if a in attrs]
    p['is_expert'] = bool(rng.random() < spec.expert_fraction)

    # categories (FLAIR style): conditions, DR grade, findings
    cats = [c for c in conds]
    if 'diabetic retinopathy' in conds:
        cats.append(DR_GRADE_CATEGORIES[dr_grade])
    if conds == ['normal'] and rng.random() < 0.5:
        cats.append('no diabetic retinopathy')
    cats += [f for f in FINDINGS[1:] if f in findings and f not in cats]
    p['categories'] = cats
    p['report_en'], p['report_zh'], p['caption'] = _write_texts(p, rng)
    return p


# --------------------------------------------------------------------------------------------------
# rendering

@functools.lru_cache(maxsize=16)
def _grid(S: int):
    c = ((np.arange(S, dtype=np.float32) + 0.5) / S) * 2 - 1
    r2 = c[None, :] ** 2 + c[:, None] ** 2
    return c, r2


@functools.lru_cache(maxsize=16)
def _fov_mask(S: int, mode: str = 'RGB') -> Image.Image:
    c, r2 = _grid(S)
    edge = 2.0 / S * 1.2
    m = np.clip((FOV_RADIUS - np.sqrt(r2)) / edge + 0.5, 0, 1)
    return Image.fromarray((m * 255).astype(np.uint8)).convert(mode)


def _resize_f(a: np.ndarray, S: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a.astype(np.float32), 'F').resize((S, S), Image.BICUBIC))


class _Canvas:
    """Maps normalised coordinates to pixels of an image of size S (or a scaled layer)."""

    def __init__(self, S, scale=1.0):
        self.s = max(8, int(round(S * scale)))
        self.h = self.s / 2.0

    def xy(self, x, y):
        return ((x + 1) * self.h, (y + 1) * self.h)

    def box(self, x, y, rx, ry=None):
        ry = rx if ry is None else ry
        h = self.h
        # at least ~1 px so tiny lesions stay visible at small sizes
        rxp, ryp = max(rx * h, 0.7), max(ry * h, 0.7)
        cx, cy = (x + 1) * h, (y + 1) * h
        return (cx - rxp, cy - ryp, cx + rxp, cy + ryp)


def _soft_paste(img, S, scale, blur, color, draw_fn, masks: _MaskLayers | None = None, name: str = '',
                covers: bool = False):
    """Draw an L mask at `scale` resolution, blur it (normalised units), upsample and paste `color`.
    With `masks`, the drawn shapes at full opacity, softened and upsampled alike, mark layer `name`
    where they cover at least half a pixel: the structure's outline as the image shows it, whatever
    its opacity (every `draw_fn` that has a mask layer fills with a value > 0); with `covers`, the
    paste also hides what was drawn before wherever it is at least half opaque."""
    cv = _Canvas(S, scale)
    m = Image.new('L', (cv.s, cv.s), 0)
    draw_fn(ImageDraw.Draw(m), cv)
    layers = [m] if masks is None else [m, m.point(lambda v: 255 if v else 0)]
    if blur > 0:
        layers = [a.filter(ImageFilter.GaussianBlur(max(0.5, blur * cv.h))) for a in layers]
    if cv.s != S:
        layers = [a.resize((S, S), Image.BILINEAR) for a in layers]
    img.paste(tuple(int(v) for v in color), None, layers[0])
    if masks is not None:
        masks.mark(name, layers[1])
        if covers:
            masks.cover(name, layers[0])


class _MaskLayers:
    """One binary layer per MASK_CLASSES entry at the image's resolution, drawn on by the CFP renderer."""

    def __init__(self, S):
        self.S = S
        self.cv = _Canvas(S)
        self._layers = {name: Image.new('L', (S, S), 0) for name in MASK_CLASSES}
        self._draws = {name: ImageDraw.Draw(m) for name, m in self._layers.items()}

    def draw(self, name: str) -> ImageDraw.ImageDraw:
        return self._draws[name]

    def ellipses(self, name: str, boxes):
        """Ellipses (x, y, rx[, ry]) in normalised coordinates, as `_Canvas.box` takes them."""
        for b in boxes:
            self._draws[name].ellipse(self.cv.box(*b), fill=1)

    def mark(self, name: str, coverage: Image.Image):
        """Marks the pixels `coverage` (L, 255 = fully covered) covers at least half."""
        self._layers[name].paste(1, None, coverage.point(lambda v: 255 if v >= 128 else 0))

    def clip(self, name: str, within: str):
        """Keeps layer `name` only where layer `within` is drawn."""
        self._layers[name].paste(0, None, self._layers[within].point(lambda v: 0 if v else 255))

    def cover(self, name: str, alpha: Image.Image | None = None):
        """Structure `name` was painted over everything drawn before it where `alpha` (L; default: its
        own layer, opaque) is at least half: erases those pixels from every other layer (the layers of
        structures drawn later are still empty)."""
        if alpha is None:
            hidden = self._layers[name].point(lambda v: 255 if v else 0)
        else:
            hidden = alpha.point(lambda v: 255 if v >= 128 else 0)
        for other, layer in self._layers.items():
            if other != name:
                layer.paste(0, None, hidden)

    def stack(self, names):
        """`names` were drawn in this order on one layer, each replacing what it covers: each keeps only
        the pixels no later one took."""
        for k, top in enumerate(names):
            hidden = self._layers[top].point(lambda v: 255 if v else 0)
            for below in names[:k]:
                self._layers[below].paste(0, None, hidden)

    def array(self, eye: str) -> np.ndarray:
        """uint8 [S, S, len(MASK_CLASSES)] of 0/1, cut to the field of view, mirrored for a left eye."""
        fov = np.asarray(_fov_mask(self.S, 'L')) >= 128          # the pixels _quality keeps at least half of
        a = np.stack([(np.asarray(self._layers[name]) > 0) & fov for name in MASK_CLASSES], -1).astype(np.uint8)
        return np.ascontiguousarray(a[:, ::-1] if eye == 'left' else a)


def _fork(rng: np.random.Generator) -> np.random.Generator:
    """A generator in `rng`'s current state: a random drawing call replayed with it on a mask layer draws
    the same geometry as the call the renderer makes with `rng`, and leaves the renderer's stream alone."""
    return copy.deepcopy(rng)


def _grow(rng, starts, ang0, turn, length, noise, n):
    """Vectorised vessel branches: returns points [K, n, 2] and heading angles [K, n]."""
    k = len(starts)
    s = np.linspace(0.0, 1.0, n - 1)
    ang = ang0[:, None] + turn[:, None] * s[None, :] + np.cumsum(rng.normal(0, noise, (k, n - 1)), 1)
    step = (length / (n - 1))[:, None]
    d = np.stack([np.cos(ang) * step, np.sin(ang) * step], -1)
    pts = np.concatenate([starts[:, None, :], starts[:, None, :] + np.cumsum(d, 1)], 1)
    ang = np.concatenate([ang, ang[:, -1:]], 1)
    return pts, ang


def _vessel_tree(rng, disc, narrow):
    """Returns a list of (points [n,2], width0, is_artery) in normalised coordinates."""
    dx, dy, dr = disc
    deg = math.pi / 180
    starts, ang0, turn, length, width, art = [], [], [], [], [], []

    def add(a0, t, ln, w, is_art, jitter=0.25):
        starts.append((dx + _u(rng, -jitter, jitter) * dr, dy + _u(rng, -jitter, jitter) * dr))
        ang0.append(a0)
        turn.append(t)
        length.append(ln)
        width.append(w)
        art.append(is_art)

    wv, wa = 0.022, 0.016 * narrow
    for sgn in (-1, 1):                               # superior (-1) / inferior (+1)
        a = sgn * _u(rng, 92, 108) * deg
        t = sgn * _u(rng, 65, 95) * deg
        ln = _u(rng, 1.15, 1.4)
        add(a, t, ln, wv, False)
        add(a + _u(rng, -12, 12) * deg, t + _u(rng, -12, 12) * deg, ln * _u(rng, 0.9, 1.05), wa, True)
        a = sgn * _u(rng, 35, 70) * deg                # nasal
        add(a, _u(rng, -25, 25) * deg, _u(rng, 0.5, 0.65), wv * 0.8, False)
        add(a + _u(rng, -12, 12) * deg, _u(rng, -25, 25) * deg, _u(rng, 0.5, 0.65), wa * 0.8, True)
    for is_art in (False, True):                      # small macular branches
        add(math.pi + _u(rng, -18, 18) * deg, _u(rng, -20, 20) * deg, _u(rng, 0.25, 0.35), 0.008, is_art)
    n = 22
    P, A = _grow(rng, np.array(starts), np.array(ang0), np.array(turn), np.array(length), 0.06, n)
    W = np.array(width)
    ART = np.array(art)
    out = [(P[i], W[i], bool(ART[i])) for i in range(len(P))]
    # children on the 8 big vessels, grandchildren on children
    parents, pw, part = P[:8], W[:8], ART[:8]
    for level, (nch, wf, lrange, nn, noise) in enumerate(((3, 0.68, (0.3, 0.55), 14, 0.05), (1, 0.62, (0.12, 0.25), 8, 0.06))):
        k = len(parents) * nch
        pi = np.repeat(np.arange(len(parents)), nch)
        ti = rng.integers(int(0.2 * parents.shape[1]), int(0.85 * parents.shape[1]), k)
        st = parents[pi, ti]
        pang = np.arctan2(parents[pi, ti + 1, 1] - parents[pi, ti - 1, 1], parents[pi, ti + 1, 0] - parents[pi, ti - 1, 0])
        side = np.where(rng.random(k) < 0.5, -1.0, 1.0)
        a0 = pang + side * rng.uniform(25, 60, k) * deg
        cw = pw[pi] * (1 - 0.55 * ti / parents.shape[1]) * wf
        CP, _ = _grow(rng, st, a0, rng.uniform(-45, 45, k) * deg, rng.uniform(*lrange, k), noise, nn)
        out += [(CP[i], cw[i], bool(part[pi[i]])) for i in range(k)]
        parents, pw, part = CP, cw, part[pi]
    return out


def _draw_polyline(draw, cv, pts, w0, color, taper=0.55):
    n = len(pts)
    xy = (pts + 1) * cv.h
    wpx = w0 * cv.h * (1 - taper * np.arange(n) / (n - 1))
    iw = np.maximum(1, np.rint(wpx)).astype(int)
    cuts = [0] + [i for i in range(1, n) if iw[i] != iw[i - 1]] + [n - 1]
    xyl = xy.tolist()
    for a, b in zip(cuts[:-1], cuts[1:]):
        if b > a:
            draw.line([tuple(v) for v in xyl[a:b + 1]], fill=color, width=int(iw[a]))


def _ell_poly(cv, rng, x, y, rx, ry, ang, jitter, n=12):
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    rad = 1 + rng.uniform(-jitter, jitter, n)
    ex, ey = rx * rad * np.cos(t), ry * rad * np.sin(t)
    ca, sa = math.cos(ang), math.sin(ang)
    px = (x + ex * ca - ey * sa + 1) * cv.h
    py = (y + ex * sa + ey * ca + 1) * cv.h
    return list(zip(px.tolist(), py.tolist()))


def _choroidal_vessels(rng, S):
    """Large choroidal vessels seen through a thin RPE (tessellation): [S, S] float in [0, 1], 1 on a vessel."""
    tc = _Canvas(S, 0.25)
    tm = Image.new('L', (tc.s, tc.s), 0)
    td = ImageDraw.Draw(tm)
    k = 70
    st = rng.uniform(-0.95, 0.95, (k, 2))
    P, _ = _grow(rng, st, rng.uniform(0, 2 * math.pi, k), rng.uniform(-1, 1, k), rng.uniform(0.25, 0.5, k), 0.35, 6)
    for i in range(k):
        td.line([tuple(v) for v in ((P[i] + 1) * tc.h).tolist()], fill=255, width=max(1, int(_u(rng, 0.04, 0.07) * tc.h)))
    tm = tm.filter(ImageFilter.GaussianBlur(max(0.8, 0.02 * tc.h)))
    return np.asarray(tm.resize((S, S), Image.BILINEAR), np.float32) / 255.0


def _draw_vessels(md, cv, rng, tree, L, vein_c, art_c, gap_c):
    """The vessel tree with venous beading and AV nicks; `gap_c` is the layer's no-vessel value, which
    hides the vein on either side of a nicking artery."""
    for pts, w0, is_art in sorted(tree, key=lambda t: t[2]):      # veins first, arteries on top
        _draw_polyline(md, cv, pts, w0, art_c if is_art else vein_c)
    veins = [t for t in tree if not t[2] and t[1] > 0.012]
    if L['beading']:
        for pts, w0, _ in veins[:4]:
            for i in range(4, len(pts) - 4, 3):
                md.ellipse(cv.box(pts[i, 0], pts[i, 1], w0 * 0.9), fill=vein_c)
    for j in range(L['nicks']):
        pts, w0, _ = veins[j % len(veins)]
        i = int(rng.integers(5, len(pts) - 5))
        x, y = pts[i]
        md.ellipse(cv.box(x, y, w0 * 1.8), fill=gap_c)
        a = math.atan2(pts[i + 1, 1] - pts[i - 1, 1], pts[i + 1, 0] - pts[i - 1, 0]) + math.pi / 2 + _u(rng, -0.4, 0.4)
        ln = w0 * 3.5
        md.line([cv.xy(x - ln * math.cos(a), y - ln * math.sin(a)), cv.xy(x + ln * math.cos(a), y + ln * math.sin(a))],
                fill=art_c, width=max(1, int(round(0.6 * w0 * cv.h))))


def _draw_haem(md, cv, rng, h, disc, col):
    """One haemorrhage (x, y, r, kind, aspect): 0 dot, 1 blot, 2 flame (along the nerve fibres, radial from the disc)."""
    x, y, r, kind, asp = h
    if kind == 2:
        a = math.atan2(y - disc[1], x - disc[0]) + _u(rng, -0.3, 0.3)
        md.polygon(_ell_poly(cv, rng, x, y, r * 1.7, r * 0.45, a, 0.1), fill=col)
    elif kind == 1:                                     # blot: irregular
        md.polygon(_ell_poly(cv, rng, x, y, r, r * asp, _u(rng, 0, math.pi), 0.25), fill=col)
    else:
        md.ellipse(cv.box(x, y, r * 0.6), fill=col)


def _draw_nv(md, cv, rng, tufts, col):
    """Neovascularization: 9 fine tortuous vessels from each tuft centre."""
    for cx, cy in tufts:
        k = 9
        st = np.array([cx, cy]) + rng.normal(0, 0.02, (k, 2))
        P, _ = _grow(rng, st, rng.uniform(0, 2 * math.pi, k), rng.uniform(-3, 3, k), rng.uniform(0.08, 0.16, k), 0.7, 9)
        for i in range(k):
            md.line([tuple(v) for v in ((P[i] + 1) * cv.h).tolist()], fill=col, width=max(1, int(round(0.005 * cv.h))))


def _draw_spicules(md, cv, rng, spicules, col):
    """Bone-spicule pigment: 3-5 thin arms from each centre."""
    for x, y, r in spicules:
        n_arm = _ri(rng, 3, 5)
        a = rng.uniform(0, 2 * math.pi, n_arm)
        ln = r * rng.uniform(0.6, 1.2, n_arm)
        wpx = max(1, int(round(0.007 * cv.h)))
        for j in range(n_arm):
            md.line([cv.xy(x, y), cv.xy(x + ln[j] * math.cos(a[j]), y + ln[j] * math.sin(a[j]))], fill=col, width=wpx)


def _haze(img, S, amount, colour):
    """Media haze (cataract): detail lost, then veiled by `colour`."""
    k = max(2, S // 40)
    blurred = img.reduce(k).filter(ImageFilter.GaussianBlur(0.8)).resize((S, S), Image.BILINEAR)
    return Image.blend(blurred, Image.new(img.mode, (S, S), colour), amount)


def _quality(img, attrs, rng, S, fov=True):
    """Quality attributes (blur, exposure, noise) on an RGB or L image, then the field-of-view mask
    (`fov`; an OCT B-scan has none). Returns a uint8 array."""
    if 'blurred' in attrs:
        img = img.filter(ImageFilter.GaussianBlur(S * _u(rng, 0.006, 0.012)))
    if 'underexposed' in attrs or 'overexposed' in attrs:
        x = np.arange(256) / 255.0
        if 'underexposed' in attrs:
            lut = 255 * _u(rng, 0.4, 0.55) * x ** _u(rng, 1.2, 1.5)
        else:
            lut = 255 * np.minimum(1, _u(rng, 1.5, 1.9) * x ** _u(rng, 0.65, 0.8) + 0.08)
        img = img.point(np.clip(lut, 0, 255).astype(np.uint8).tolist() * len(img.getbands()))
    if fov:
        img = ImageChops.multiply(img, _fov_mask(S, img.mode))
    a = np.asarray(img)
    if 'noisy' in attrs:
        noise = rng.standard_normal(a.shape, dtype=np.float32) * _u(rng, 10, 18)
        a = np.clip(a + noise, 0, 255).astype(np.uint8)
        if fov:
            a = np.asarray(ImageChops.multiply(Image.fromarray(a), _fov_mask(S, img.mode)))
    return a


def _mul(f):
    return tuple(int(max(0, min(255, round(v * 255)))) for v in f)


def _frame(spec: CorpusSpec, p: dict):
    """What every fundus renderer starts from: size, difficulty, lesions, disc, fovea, grid, canvas."""
    S = spec.image_size
    return S, float(spec.difficulty), p['lesions'], p['disc'], p['fovea'], _grid(S), _Canvas(S)


def _render(spec: CorpusSpec, p: dict, rng: np.random.Generator, masks: _MaskLayers | None = None) -> np.ndarray:
    """Colour fundus photograph; with `masks`, also draws each MASK_CLASSES structure on its layer (the
    image is the same either way: nothing drawn on a mask layer touches `rng`)."""
    S, d, L, (dx, dy, dr), (fx, fy), (c, r2), cv = _frame(spec, p)

    # ---- background: colour * vignette * texture * macula (* tessellation)
    base = np.array([_u(rng, 195, 228), _u(rng, 78, 108), _u(rng, 30, 55)], np.float32)
    if 'tessellation' in p['findings']:
        base *= np.array([1.04, 1.08, 1.1], np.float32)
    low = _resize_f(rng.uniform(0.85, 1.15, (5, 5)), 24) * rng.uniform(0.95, 1.05, (24, 24))
    shade = _resize_f(low, S) * (1 - _u(rng, 0.3, 0.5) * r2)
    sig = _u(rng, 0.13, 0.18)
    gx = np.exp(-(c - fx) ** 2 / (2 * sig ** 2))
    gy = np.exp(-(c - fy) ** 2 / (2 * sig ** 2))
    shade *= 1 - _u(rng, 0.25, 0.38) * np.outer(gy, gx)
    bg = shade[:, :, None] * base
    if 'tessellation' in p['findings']:
        lines = _choroidal_vessels(rng, S)
        kk = L['tess'] * np.array([0.42, 0.55, 0.4], np.float32)
        bg *= 1 - (1 - lines)[:, :, None] * kk
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))

    # ---- soft structures under the vessels: GA, PPA, disc, cup
    if L['ga'] is not None:
        gxx, gyy, grr = L['ga']
        blobs = [(gxx + _u(rng, -0.4, 0.4) * grr, gyy + _u(rng, -0.4, 0.4) * grr, grr * _u(rng, 0.6, 1.0)) for _ in range(3)]
        _soft_paste(img, S, 0.5, 0.006, (232, 180, 130), lambda dd, cc: [dd.ellipse(cc.box(*b), fill=235) for b in blobs],
                    masks, 'geographic atrophy')
    ppa = L.get('ppa')
    disc_rx = dr * (0.82 if ppa else 1.0)
    if ppa:
        _soft_paste(img, S, 0.5, 0.004, (232, 222, 200),
                    lambda dd, cc: dd.ellipse(cc.box(dx - 0.3 * dr * ppa, dy, dr * ppa * 0.85, dr * 1.15), fill=235),
                    masks, 'peripapillary atrophy')
    waxy = 'bone-spicule pigment' in p['findings']
    disc_col = (250, 212, 160) if waxy else (242, 150 + _u(rng, -10, 10), 100 + _u(rng, -10, 10))
    cup_r = p['cdr'] * dr
    cup_off = -0.12 * dr * (1 - p['cdr'])
    # The opaque disc hides the peripapillary atrophy under it (a crescent shows); the disc keeps the cup
    # drawn on it, which is cut to the disc where a large cup's outline rounds a pixel past it.
    _soft_paste(img, S, 1.0, 0.006, disc_col, lambda dd, cc: dd.ellipse(cc.box(dx, dy, disc_rx, dr * 1.08), fill=255),
                masks, 'optic disc', covers=True)
    _soft_paste(img, S, 1.0, 0.005, (255, 238, 205),
                lambda dd, cc: dd.ellipse(cc.box(dx + cup_off, dy, cup_r * disc_rx / dr, cup_r * 1.08), fill=235),
                masks, 'optic cup')
    if masks is not None:
        masks.clip('optic cup', 'optic disc')

    # ---- multiplicative layer: vessels and dark lesions
    M = Image.new('RGB', (S, S), (255, 255, 255))
    md = ImageDraw.Draw(M)
    vein_c = _mul((0.56 + _u(rng, -0.04, 0.04), 0.34, 0.42))
    art_c = _mul((0.8 + _u(rng, -0.04, 0.04), 0.6, 0.66) if L['narrow'] >= 1 else (0.88, 0.72, 0.76))
    tree = _vessel_tree(rng, p['disc'], L['narrow'])
    if masks is not None:
        _draw_vessels(masks.draw('vessels'), cv, _fork(rng), tree, L, 1, 1, 0)
    _draw_vessels(md, cv, rng, tree, L, vein_c, art_c, (255, 255, 255))
    contrast = 1 - 0.5 * d
    haem_c = np.array([0.6, 0.18, 0.2])
    for x, y, r in L['ma']:
        md.ellipse(cv.box(x, y, r), fill=_mul(1 - (1 - haem_c * _u(rng, 0.9, 1.1)) * contrast))
    if masks is not None:
        masks.ellipses('microaneurysm', L['ma'])
    for h in L['haem']:
        col = _mul(1 - (1 - haem_c * _u(rng, 0.85, 1.15)) * contrast)
        if masks is not None:
            _draw_haem(masks.draw('haemorrhage'), cv, _fork(rng), h, p['disc'], 1)
        _draw_haem(md, cv, rng, h, p['disc'], col)
    if masks is not None:
        _draw_nv(masks.draw('neovascularization'), cv, _fork(rng), L['nv'], 1)
    _draw_nv(md, cv, rng, L['nv'], _mul((0.62, 0.35, 0.45)))
    if masks is not None:
        _draw_spicules(masks.draw('bone-spicule pigment'), cv, _fork(rng), L['spicules'], 1)
    _draw_spicules(md, cv, rng, L['spicules'], _mul(np.array([0.22, 0.2, 0.26]) * (1 + d)))
    scar_c = _mul((0.42, 0.33, 0.32))
    for x, y, r in L['scars']:
        md.ellipse(cv.box(x, y, r), fill=scar_c)
    if L['hole'] is not None:
        md.ellipse(cv.box(fx, fy, L['hole']), fill=_mul(1 - (1 - np.array([0.42, 0.3, 0.36])) * contrast))
    if masks is not None:
        masks.ellipses('laser scar', L['scars'])
        if L['hole'] is not None:
            masks.ellipses('macular hole', [(fx, fy, L['hole'])])
        # one layer, each draw replacing what it covers; the layer multiplies the soft structures below,
        # which show through it (a vessel on the disc is both)
        masks.stack(('vessels', 'microaneurysm', 'haemorrhage', 'neovascularization', 'bone-spicule pigment',
                     'laser scar', 'macular hole'))
    if S >= 160:
        M = M.filter(ImageFilter.GaussianBlur(0.45 * S / 512 + 0.25))
    img = ImageChops.multiply(img, M)

    # ---- bright lesions over the vessels
    draw = ImageDraw.Draw(img)
    for x, y, r in L['scars']:
        draw.ellipse(cv.box(x, y, r * 0.5), fill=(205, 170, 125))
    if masks is not None and len(L['scars']):
        centres = Image.new('L', (S, S), 0)
        cd = ImageDraw.Draw(centres)
        for x, y, r in L['scars']:
            cd.ellipse(cv.box(x, y, r * 0.5), fill=255)
        masks.mark('laser scar', centres)       # a centre's outline may round a pixel past its scar's
        masks.cover('laser scar', centres)
    if len(L['cws']):
        blobs = [(x + _u(rng, -0.3, 0.3) * r, y + _u(rng, -0.3, 0.3) * r, r * _u(rng, 0.5, 0.9), r * _u(rng, 0.4, 0.8))
                 for x, y, r in L['cws'] for _ in range(3)]
        _soft_paste(img, S, 0.5, 0.008, (242, 238, 222), lambda dd, cc: [dd.ellipse(cc.box(*b), fill=int(225 * contrast + 30)) for b in blobs],
                    masks, 'cotton-wool spot', covers=True)
    if len(L['drusen']):
        vals = rng.integers(190, 256, len(L['drusen'])) * contrast
        _soft_paste(img, S, 1.0, 0.006, (238, 206, 112),
                    lambda dd, cc: [dd.ellipse(cc.box(x, y, r), fill=int(v)) for (x, y, r), v in zip(L['drusen'], vals)],
                    masks, 'drusen', covers=True)
    if len(L['exudates']):
        for x, y, r in L['exudates']:
            g = _u(rng, -15, 10)
            col = (248, 228 + g, 110 + 2 * g) if d < 0.5 else (236, 205 + g, 120 + g)
            box = cv.box(x, y, r, r * _u(rng, 0.7, 1.0))
            draw.ellipse(box, fill=tuple(int(v) for v in col))
            if masks is not None:
                masks.draw('hard exudate').ellipse(box, fill=1)
        if masks is not None:
            masks.cover('hard exudate')
    if L['hole'] is None:
        _soft_paste(img, S, 0.5, 0.006, (255, 236, 210), lambda dd, cc: dd.ellipse(cc.box(fx, fy, 0.012), fill=140))

    # ---- global effects: cataract haze, then quality attributes
    if L['haze'] > 0:
        img = _haze(img, S, L['haze'], (200, 168, 140))
    a = _quality(img, p['atributes'], rng, S)
    if p['eye'] == 'left':
        a = a[:, ::-1]
    return np.ascontiguousarray(a)


def _grey_rgb(a: np.ndarray, eye: str) -> np.ndarray:
    """Grey [S, S] -> mirrored for a left eye, replicated into 3 channels (the pipeline's image layout)."""
    if eye == 'left':
        a = a[:, ::-1]
    return np.ascontiguousarray(np.repeat(a[:, :, None], 3, 2))


def _render_ffa(spec: CorpusSpec, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Late-phase fluorescein angiogram (grey): what each finding looks like is in _MODALITY_SIGNS."""
    S, d, L, (dx, dy, dr), (fx, fy), (c, r2), cv = _frame(spec, p)
    contrast = 1 - 0.5 * d

    # ---- background: dim mottled choroidal flush, darker macula, dark foveal avascular zone
    low = _resize_f(rng.uniform(0.7, 1.3, (7, 7)), 28) * rng.uniform(0.9, 1.1, (28, 28))
    shade = _resize_f(low, S) * (1 - _u(rng, 0.35, 0.5) * r2)
    sig = _u(rng, 0.12, 0.16)
    dxf, dyf = (c - fx) ** 2, (c - fy) ** 2
    shade *= 1 - _u(rng, 0.2, 0.3) * np.outer(np.exp(-dyf / (2 * sig ** 2)), np.exp(-dxf / (2 * sig ** 2))) \
        - _u(rng, 0.3, 0.45) * np.outer(np.exp(-dyf / (2 * 0.03 ** 2)), np.exp(-dxf / (2 * 0.03 ** 2)))
    bg = shade * _u(rng, 55, 75)
    if 'tessellation' in p['findings']:
        bg *= 1 + _choroidal_vessels(rng, S) * 0.8 * L['tess']
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))

    # ---- window defects and staining under the vessels: GA, PPA, disc, macular hole, drusen
    if L['ga'] is not None:
        gxx, gyy, grr = L['ga']
        blobs = [(gxx + _u(rng, -0.4, 0.4) * grr, gyy + _u(rng, -0.4, 0.4) * grr, grr * _u(rng, 0.6, 1.0)) for _ in range(3)]
        _soft_paste(img, S, 0.5, 0.005, (215,), lambda dd, cc: [dd.ellipse(cc.box(*b), fill=int(200 * contrast + 30)) for b in blobs])
    ppa = L.get('ppa')
    disc_rx = dr * (0.82 if ppa else 1.0)
    if ppa:
        _soft_paste(img, S, 0.5, 0.004, (165,),
                    lambda dd, cc: dd.ellipse(cc.box(dx - 0.3 * dr * ppa, dy, dr * ppa * 0.85, dr * 1.15), fill=220))
    _soft_paste(img, S, 1.0, 0.008, (_u(rng, 165, 195),), lambda dd, cc: dd.ellipse(cc.box(dx, dy, disc_rx, dr * 1.08), fill=255))
    if L['hole'] is not None:
        _soft_paste(img, S, 1.0, 0.004, (200,), lambda dd, cc: dd.ellipse(cc.box(fx, fy, L['hole']), fill=int(200 * contrast + 40)))
    if len(L['drusen']):
        vals = rng.integers(110, 170, len(L['drusen'])) * contrast
        _soft_paste(img, S, 1.0, 0.005, (170,),
                    lambda dd, cc: [dd.ellipse(cc.box(x, y, r), fill=int(v)) for (x, y, r), v in zip(L['drusen'], vals)])

    # ---- hyperfluorescent vessels (the CFP tree geometry), new vessels; the brighter of layer and image
    V = Image.new('L', (S, S), 0)
    vd = ImageDraw.Draw(V)
    vein_c, art_c = int(_u(rng, 205, 230)), int(_u(rng, 190, 215))
    _draw_vessels(vd, cv, rng, _vessel_tree(rng, p['disc'], L['narrow']), L, vein_c, art_c, 0)
    _draw_nv(vd, cv, rng, L['nv'], 230)
    if S >= 160:
        V = V.filter(ImageFilter.GaussianBlur(0.45 * S / 512 + 0.25))
    img = ImageChops.lighter(img, V)

    # ---- blocked fluorescence (multiplicative): haemorrhages, non-perfusion, pigment, scar centres
    D = Image.new('L', (S, S), 255)
    bd = ImageDraw.Draw(D)
    for h in L['haem']:
        _draw_haem(bd, cv, rng, h, p['disc'], int(255 * (1 - 0.8 * contrast * _u(rng, 0.85, 1.05))))
    _draw_spicules(bd, cv, rng, L['spicules'], int(255 * (1 - 0.8 * contrast)))
    for x, y, r in L['scars']:
        bd.ellipse(cv.box(x, y, r * 0.6), fill=70)
    if len(L['cws']):
        blobs = [(x, y, r * 1.3) for x, y, r in L['cws']]
        _soft_paste(D, S, 0.5, 0.01, (int(255 * (1 - 0.65 * contrast)),), lambda dd, cc: [dd.ellipse(cc.box(*b), fill=230) for b in blobs])
    if S >= 160:
        D = D.filter(ImageFilter.GaussianBlur(0.45 * S / 512 + 0.25))
    img = ImageChops.multiply(img, D)

    # ---- hyperfluorescent lesions on top: microaneurysms, leakage (new vessels, macular), scar rims
    draw = ImageDraw.Draw(img)
    for x, y, r in L['ma']:
        draw.ellipse(cv.box(x, y, r), fill=int(255 - 45 * (1 - contrast) - _u(rng, 0, 20)))
    for x, y, r in L['scars']:
        draw.ellipse(cv.box(x, y, r * 0.95), outline=int(190 * contrast + 40), width=max(1, int(round(0.25 * r * cv.h))))
    if L['nv']:
        tufts = [(x, y, _u(rng, 0.045, 0.07)) for x, y in L['nv']]
        _soft_paste(img, S, 0.5, 0.025, (240,), lambda dd, cc: [dd.ellipse(cc.box(*t), fill=int(210 * contrast + 30)) for t in tufts])
    if len(L['exudates']):
        _soft_paste(img, S, 0.5, 0.02, (215,), lambda dd, cc: [dd.ellipse(cc.box(x, y, r * 2.5), fill=int(120 * contrast))
                                                                for x, y, r in L['exudates']])

    # ---- media haze, quality attributes, field of view
    if L['haze'] > 0:
        img = _haze(img, S, L['haze'], 95)
    return _grey_rgb(_quality(img, p['atributes'], rng, S), p['eye'])


# OCT bands from the retinal surface down: (name, reflectivity). Below them: Bruch's membrane, the
# textured choroid and the sclera; above: the vitreous. Indices are those of `lay` in _render_oct.
_OCT_BANDS = (('vitreous', 0.03), ('nerve fibre', 0.78), ('ganglion cell', 0.42), ('inner plexiform', 0.58),
              ('inner nuclear', 0.2), ('outer plexiform', 0.55), ('outer nuclear', 0.1), ('external limiting membrane', 0.38),
              ('myoid', 0.12), ('ellipsoid zone', 0.82), ('interdigitation', 0.32), ('RPE', 0.97), ('drusen', 0.45),
              ('Bruch', 0.7), ('choroid', 0.0), ('sclera', 0.0))
_OCT_LEVELS = np.array([r for _, r in _OCT_BANDS], np.float32)
_INL, _ONL, _ELM, _RPE, _DRUSEN, _CHOROID, _SCLERA = 4, 6, 7, 11, 12, 14, 15


def _oct_blob(R, cx, cy, rx, ry, value, shadow=1.0):
    """Fills an ellipse (pixel units) of R with `value`; `shadow` < 1 darkens the columns below it."""
    S = R.shape[0]
    c0, c1 = max(0, int(cx - rx)), min(S, int(math.ceil(cx + rx)) + 1)
    r0, r1 = max(0, int(cy - ry)), min(S, int(math.ceil(cy + ry)) + 1)
    if c0 >= c1 or r0 >= r1:
        return
    jj = (np.arange(c0, c1) + 0.5 - cx) / rx
    ii = (np.arange(r0, r1) + 0.5 - cy) / ry
    m = ii[:, None] ** 2 + jj[None, :] ** 2 < 1
    R[r0:r1, c0:c1][m] = value
    if shadow < 1:
        R[r1:, c0:c1] *= shadow


def _render_oct(spec: CorpusSpec, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Horizontal OCT B-scan through the fovea (grey, depth down the rows), in the canonical right-eye
    frame (disc side on the right), mirrored for a left eye. Column j images fundus x = fovea x +
    _OCT_HALF_WIDTH * (2 (j + 0.5) / S - 1); depths are fractions of the image height."""
    S, d, L, (dx, dy, dr), (fx, fy), _, _ = _frame(spec, p)
    F = p['findings']
    contrast = 1 - 0.5 * d
    W = _OCT_HALF_WIDTH
    xs = ((np.arange(S, dtype=np.float32) + 0.5) / S * 2 - 1) * W      # fundus x - fovea x per column (nasal > 0)
    z = ((np.arange(S, dtype=np.float32) + 0.5) / S)[:, None]           # depth per row
    u = xs / W
    # anatomy, texture and speckle are drawn before any lesion, so a lesion that draws nothing (the
    # macular hole, drusen) changes only its own pixels: the tests render an eye with and without one
    zc, curv, tilt = _u(rng, 0.6, 0.64), _u(rng, 0.03, 0.07), _u(rng, -0.03, 0.03)
    sig_pit = _u(rng, 0.045, 0.06)
    th = rng.uniform(0.9, 1.1, 6).astype(np.float32)
    ch = _u(rng, 0.07, 0.1)
    tex = _resize_f(rng.uniform(0, 1, (6, 20)), S)
    speckle = rng.standard_normal((S, S), dtype=np.float32)
    gain = _u(rng, 0.92, 1.08)
    if 'tessellation' in F:                      # pathologic myopia: deeper, steeply curved globe, thin choroid
        zc, curv, ch = zc + 0.05 * L['tess'], curv + 0.15 * L['tess'], ch * (1 - 0.75 * L['tess'])

    # ---- per-column band thicknesses
    pit = np.exp(-xs ** 2 / (2 * sig_pit ** 2))
    to_disc = np.clip(xs / max(dx - dr - fx, 0.2), 0, 1)
    rnfl = (0.006 + 0.004 * np.clip(-u, 0, 1) + 0.03 * to_disc ** 1.5) * th[0]
    gcl = 0.026 * th[1] * (1 + 0.3 * to_disc)
    cup = min(1.0, max(0.0, (p['cdr'] - 0.4) / 0.45))     # glaucoma: nerve fibre / ganglion cell loss, worst disc side
    if cup > 0:
        loss = cup * (0.55 + 0.45 * to_disc)
        rnfl, gcl = rnfl * (1 - 0.75 * loss), gcl * (1 - 0.55 * loss)
    inl, onl = np.full(S, 0.022 * th[3], np.float32), 0.05 * th[4] + 0.025 * pit
    depth_pit = 0.97
    if 'haemorrhage' in F:                       # macular oedema: thickened, shallower fovea (cysts below)
        sw = 0.035 * contrast * np.exp(-xs ** 2 / (2 * 0.1 ** 2))
        inl, onl, depth_pit = inl + 0.3 * sw, onl + 0.7 * sw, 0.6
    if L['hole'] is not None:                    # raised, thickened hole edges
        rim = 0.05 * contrast * np.exp(-(xs / 0.08) ** 2)
        inl, onl, depth_pit = inl + 0.4 * rim, onl + 0.6 * rim, 0.5
    inner = 1 - depth_pit * pit
    ga_w = np.zeros(S, np.float32)
    if L['ga'] is not None:                      # columns where the scan crosses the atrophy (soft edge)
        gxx, gyy, grr = L['ga']
        hc = math.sqrt(max(grr ** 2 - (gyy - fy) ** 2, (0.5 * grr) ** 2))
        ga_w = np.clip((hc - np.abs(xs - (gxx - fx))) / 0.012 + 0.5, 0, 1) * (0.6 + 0.4 * contrast)
        onl = onl * (1 - 0.5 * ga_w)
    bump = np.zeros(S, np.float32)
    for x, y, r in _oct_cut(L['drusen'], p):     # drusen: domes between the RPE and Bruch's membrane
        bump = np.maximum(bump, 0.8 * r * np.sqrt(np.clip(1 - ((xs - (x - fx)) / (1.4 * r)) ** 2, 0, 1)))
    tops = [rnfl * inner, gcl * inner, 0.02 * th[2] * inner, inl * inner, 0.014 * th[5] * inner, onl,
            np.full(S, 0.004), np.full(S, 0.009), np.full(S, 0.007), np.full(S, 0.007), np.full(S, 0.013), bump]
    zb = zc - curv * u ** 2 + tilt * u                                   # Bruch's membrane
    B = np.stack([zb - np.sum(tops[k:], 0) for k in range(len(tops))] + [zb, zb + 0.003, zb + 0.003 + ch]).astype(np.float32)
    lay = np.zeros((S, S), np.int8)
    for b in B:
        lay += z >= b[None, :]
    R = _OCT_LEVELS[lay]

    # ---- choroid (texture in flattened depth, vessel lumens dark, fading) and sclera
    dch = (z - B[-2][None, :]) / ch
    idx = np.clip((dch * (S - 1)).astype(np.int32), 0, S - 1)
    T = tex[idx, np.arange(S)[None, :]]
    chor = 0.6 * (0.3 + 0.7 * np.clip((T - 0.3) / 0.4, 0, 1)) * (1 - 0.4 * np.clip(dch, 0, 1))
    R = np.where(lay == _CHOROID, chor, R)
    R = np.where(lay == _SCLERA, 0.22 * np.exp(-(z - B[-1][None, :]) / 0.12), R)
    if ga_w.any():                               # RPE / outer retina lost, light reaches the choroid
        R = np.where((lay >= _ELM) & (lay <= _RPE), R * (1 - ga_w) + 0.08 * ga_w, R)
        R = np.where(lay > _DRUSEN, np.minimum(1, R * (1 + ga_w)), R)

    # ---- holes, cysts and dots (pixel units)
    px = S / (2 * W)                             # pixels per normalised fundus unit, across

    def col(x):                                  # pixel column of fundus x - fovea x
        return (x + W) * px

    def mid(k, j):                               # pixel row at the middle of band k in column j
        return 0.5 * (B[k - 1, j] + B[k, j]) * S
    if L['hole'] is not None:
        hr = L['hole'] * (0.6 + 0.4 * contrast)
        t = np.clip((z - B[0][None, :]) / (B[_RPE - 1] - B[0])[None, :], 0, 1)
        R = np.where((lay >= 1) & (lay < _RPE) & (np.abs(xs)[None, :] < hr * (0.5 + 0.6 * t)), _OCT_LEVELS[0], R)
        for sgn in (-1, 1):
            for off, k in ((0.022, _INL), (0.045, _ONL), (0.03, _ONL)):
                j = int(np.clip(col(sgn * (hr + off)), 0, S - 1))
                _oct_blob(R, col(sgn * (hr + off)), mid(k, j), 0.014 * px, 0.35 * (B[k, j] - B[k - 1, j]) * S + 0.5, 0.05)
        j = S // 2                              # operculum floating above the hole
        _oct_blob(R, col(0.0), (B[0, j] - 0.04) * S, hr * px * 0.7, 0.006 * S + 0.5, 0.5)
    if 'haemorrhage' in F:
        for _ in range(min(10, 3 + len(L['haem']) // 3)):
            x, k = _u(rng, -0.18, 0.18), (_INL, _ONL)[int(rng.integers(2))]
            j = int(np.clip(col(x), 0, S - 1))
            h = (B[k, j] - B[k - 1, j]) * S
            _oct_blob(R, col(x), mid(k, j), _u(rng, 0.01, 0.028) * px, h * _u(rng, 0.3, 0.45) + 0.5, 0.05)
    for x, y, r in _oct_cut(L['exudates'], p):
        j = int(np.clip(col(x - fx), 0, S - 1))
        _oct_blob(R, col(x - fx), B[_ONL - 1, j] * S + _u(rng, -1, 2), max(0.8, 0.8 * r * px), max(0.8, 0.6 * r * px),
                  0.95 * contrast + 0.3 * (1 - contrast), shadow=0.55)

    # ---- optics: soft band edges, speckle, media haze; quality attributes; mirror for a left eye
    img = Image.fromarray(np.clip(R * (255 * gain), 0, 255).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(max(0.4, 0.5 * S / 256)))
    a = np.asarray(img, np.float32) * np.exp(0.4 * speckle - 0.08) + 5 * np.abs(speckle)
    if L['haze'] > 0:
        hazy = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.004 * S + 0.5))
        a = np.asarray(hazy, np.float32) * (1 - 0.6 * L['haze']) + 12 * L['haze']
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return _grey_rgb(_quality(img, p['atributes'], rng, S, fov=False), p['eye'])


_RENDERERS = {'CFP': _render, 'FFA': _render_ffa, 'OCT': _render_oct}


# --------------------------------------------------------------------------------------------------

class SyntheticFundus:
    """grain RandomAccessDataSource over the synthetic corpus (picklable, thread/process safe)."""

    def __init__(self, spec: CorpusSpec = CorpusSpec()):
        self.spec = spec

    def __len__(self) -> int:
        return self.spec.size

    def __repr__(self):
        return f'SyntheticFundus({self.spec!r})'

    def _check(self, index) -> int:
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f'index must be an int, got {type(index).__name__}')
        index = int(index)
        if not 0 <= index < self.spec.size:
            raise IndexError(f'index {index} out of range [0, {self.spec.size})')
        return index

    def _sample(self, index: int):
        rng = np.random.default_rng([self.spec.seed, index])
        p = _sample(self.spec, rng)
        _draw_modality(self.spec, index, p)
        return p, rng

    @staticmethod
    def _to_record(index, p) -> dict:
        labels = np.zeros(len(FINDINGS), np.uint8)
        for f in p['findings']:
            labels[FINDING_INDEX[f]] = 1
        if not p['findings']:
            labels[0] = 1
        conds = [c for c in p['conditions'] if c != 'normal'] or ['normal']
        return {
            'index': index, 'eye': p['eye'], 'conditions': conds, 'labels': labels, 'dr_grade': int(p['dr_grade']),
            'categories': list(p['categories']), 'atributes': list(p['atributes']), 'report_en': p['report_en'],
            'report_zh': p['report_zh'], 'caption': p['caption'], 'is_expert': p['is_expert'], 'modality': p['modality'],
            'cup_to_disc': float(p['cdr']),
        }

    def record(self, index: int) -> dict:
        index = self._check(index)
        p, _ = self._sample(index)
        return self._to_record(index, p)

    def __getitem__(self, index: int) -> dict:
        index = self._check(index)
        p, rng = self._sample(index)
        out = self._to_record(index, p)
        out['image'] = _RENDERERS[p['modality']](self.spec, p, rng)
        return out

    def item_with_masks(self, index: int) -> dict:
        """`self[index]` plus 'masks': uint8 [S, S, len(MASK_CLASSES)] of 0/1 (module docstring), from
        the one rendering that draws the image. CFP examples only: FFA and OCT draw their own geometry
        (an angiogram's own vessel tree, a cross-section), for which no masks are drawn."""
        index = self._check(index)
        p, rng = self._sample(index)
        if p['modality'] != 'CFP':
            raise ValueError(f'{self!r}: example {index} is a {p["modality"]} image; segmentation masks '
                             f'are drawn for CFP examples only')
        out = self._to_record(index, p)
        layers = _MaskLayers(self.spec.image_size)
        out['image'] = _render(self.spec, p, rng, layers)
        out['masks'] = layers.array(p['eye'])
        return out

    def masks(self, index: int) -> np.ndarray:
        """uint8 [S, S, len(MASK_CLASSES)] segmentation masks of CFP example `index` (see item_with_masks)."""
        return self.item_with_masks(index)['masks']


assert all(c in CATEGORY_DESCRIPTIONS for c in CONDITIONS + DR_GRADE_CATEGORIES + FINDINGS)
assert set(MASK_CLASSES[:-3]) <= set(FINDINGS)
