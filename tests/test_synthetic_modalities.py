"""Tests of the synthetic corpus's FFA and OCT modalities (docs/data.md, "The synthetic corpus";
docs/methods.md, "KeepFIT V2")."""
import copy
import hashlib
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from retina_jax.data import knowledge as K
from retina_jax.data import synthetic as syn
from retina_jax.data.gallery import make_gallery
from retina_jax.data.synthetic import MODALITIES, CorpusSpec, SyntheticFundus


def _digest(ex: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(ex):
        v = ex[k]
        h.update(k.encode())
        if isinstance(v, np.ndarray):
            h.update(f'{v.dtype}{v.shape}'.encode())
            h.update(np.ascontiguousarray(v).tobytes())
        else:
            h.update(json.dumps(v, ensure_ascii=False, sort_keys=True).encode())
    return h.hexdigest()


def _records_digest(ds, n):
    h = hashlib.sha256()
    for i in range(n):
        h.update(_digest(ds.record(i)).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------- default unchanged

# Digests computed with the code before the modalities existed (numpy 2.4.6, Pillow 13.0.0): trained
# demos and recorded figures rely on a CFP-only corpus staying bit-identical.
_PINS = [
    (dict(seed=0, size=300, image_size=64), 'b464d72bcdeaf285',
     {0: '371bb35236d9e344', 1: '4e115244a64e57f4', 2: '3bb3030018e3913c', 3: '31acb949f248661a',
      5: '7da94df5c566cc1b', 8: 'af746216a232644c', 13: '32fb1272ae9f7def', 21: 'f336c35a0583812d'}),
    (dict(seed=3, size=300, image_size=224, expert_fraction=1.0, difficulty=0.6, attribute_prob=0.8), 'fb9983e1220e42f5',
     {0: 'ca2ab1874769f069', 1: '7849800fe0b41ea7', 2: '0e95647d2184b572', 3: '68c60e48ff2895c3',
      5: 'd1ec890fc6ccc061', 8: '07484d7bafd0033f', 13: '6ea3d2e4f9f67694', 21: 'bd3e5b080d3be440'}),
    (dict(), None, {0: 'c8b34d8d6d9a8d68', 7: 'efb1ae475082e0ac'}),   # the full default spec, 512 px
]


@pytest.mark.parametrize('kw,records,images', _PINS)
def test_default_cfp_corpus_is_bit_identical(kw, records, images):
    for spec in (CorpusSpec(**kw), CorpusSpec(**kw, modalities=('CFP',), modality_weights=(1.0,))):
        ds = SyntheticFundus(spec)
        if records:
            assert _records_digest(ds, 300) == records
        for i, want in images.items():
            assert _digest(ds[i])[:16] == want, i


def test_mixed_corpus_keeps_each_eye():
    """The modality has its own generator: in a mixed corpus an example is the same eye (labels,
    reports, CFP image) as in the CFP-only corpus; an FFA/OCT example differs in modality and caption."""
    base = SyntheticFundus(CorpusSpec(seed=5, size=60, image_size=48, expert_fraction=1.0))
    mixed = SyntheticFundus(CorpusSpec(seed=5, size=60, image_size=48, expert_fraction=1.0, modalities=MODALITIES))
    seen = set()
    for i in range(60):
        a, b = base.record(i), mixed.record(i)
        seen.add(b['modality'])
        for k in a:
            if k == 'labels':
                assert np.array_equal(a[k], b[k])
            elif k not in ('modality', 'caption') or b['modality'] == 'CFP':
                assert a[k] == b[k], (i, k)
        if b['modality'] == 'CFP' and i < 10:
            assert np.array_equal(base[i]['image'], mixed[i]['image'])
    assert seen == set(MODALITIES)


# ---------------------------------------------------------------------------------------- spec

def test_modality_frequencies_follow_weights():
    n, w = 900, (0.2, 0.5, 0.3)
    ds = SyntheticFundus(CorpusSpec(seed=1, size=n, modalities=MODALITIES, modality_weights=w))
    counts = np.array([sum(ds.record(i)['modality'] == m for i in range(n)) for m in MODALITIES])
    expected = n * np.array(w)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 13.8, (counts, chi2)          # chi-square, 2 dof, p = 0.001
    # None and () both mean uniform; a zero weight is never drawn
    for weights in (None, ()):
        ds = SyntheticFundus(CorpusSpec(seed=2, size=300, modalities=('FFA', 'OCT'), modality_weights=weights))
        k = sum(ds.record(i)['modality'] == 'FFA' for i in range(300))
        assert 120 < k < 180, k
    ds = SyntheticFundus(CorpusSpec(seed=2, size=100, modalities=MODALITIES, modality_weights=(0, 1, 0)))
    assert {ds.record(i)['modality'] for i in range(100)} == {'FFA'}
    assert CorpusSpec(modality_weights=()) == CorpusSpec()
    assert CorpusSpec(modalities=['OCT']).modalities == ('OCT',) == CorpusSpec(modalities='OCT').modalities


@pytest.mark.parametrize('kw,field', [
    (dict(modalities=()), 'modalities'), (dict(modalities=('CFP', 'MRI')), 'modalities'),
    (dict(modalities=('FFA', 'FFA')), 'modalities'), (dict(modalities=('CFP', 'FFA'), modality_weights=(1.0,)), 'modality_weights'),
    (dict(modalities=('CFP', 'FFA'), modality_weights=(1.0, -1.0)), 'modality_weights'),
    (dict(modalities=('CFP', 'FFA'), modality_weights=(0.0, 0.0)), 'modality_weights'),
    (dict(modalities=('CFP', 'FFA'), modality_weights=(1.0, float('nan'))), 'modality_weights'),
])
def test_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        CorpusSpec(**kw)


# ---------------------------------------------------------------------------------------- images

def _spec(modality, **kw):
    kw = {'seed': 4, 'size': 40, 'image_size': 128, 'attribute_prob': 0.0, 'modalities': (modality,), **kw}
    return CorpusSpec(**kw)


def test_grey_three_channels_and_mirror():
    for m in ('FFA', 'OCT'):
        ds = SyntheticFundus(_spec(m, image_size=64, attribute_prob=1.0, size=12))
        for i in range(12):
            a = ds[i]['image']
            assert a.shape == (64, 64, 3) and a.dtype == np.uint8
            assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
        # a left eye is the right eye mirrored, pixel for pixel
        p, rng = ds._sample(3)
        right, left = dict(p, eye='right'), dict(p, eye='left')
        render = syn._RENDERERS[m]
        assert np.array_equal(render(ds.spec, left, copy.deepcopy(rng)), render(ds.spec, right, copy.deepcopy(rng))[:, ::-1])


def test_ffa_vessels_are_bright(monkeypatch):
    trees = []

    def capture(*args):
        trees.append(real(*args))
        return trees[-1]

    real = syn._vessel_tree
    monkeypatch.setattr(syn, '_vessel_tree', capture)
    S = 128
    ds = SyntheticFundus(_spec('FFA', conditions=('normal',), size=6))
    c, r2 = syn._grid(S)
    for i in range(6):
        ex = ds[i]
        p, _ = ds._sample(i)
        m = Image.new('L', (S, S), 0)
        md = ImageDraw.Draw(m)
        for pts, w0, _ in trees[-1]:
            syn._draw_polyline(md, syn._Canvas(S), pts, w0, 255)
        vessel = np.asarray(m) > 0
        near = np.asarray(m.filter(ImageFilter.MaxFilter(7))) > 0
        dx, dy, dr = p['disc']
        away = ((c[None, :] - dx) ** 2 + (c[:, None] - dy) ** 2 > (2 * dr) ** 2) & (r2 < 0.8 ** 2)
        if ex['eye'] == 'left':
            vessel, near, away = vessel[:, ::-1], near[:, ::-1], away[:, ::-1]
        g = ex['image'][..., 0].astype(float)
        on, off = g[vessel & away].mean(), g[~near & away].mean()
        assert on > 2 * off and on - off > 60, (i, on, off)


def test_oct_band_structure():
    S = 160
    ds = SyntheticFundus(_spec('OCT', conditions=('normal',), size=6, image_size=S))
    for i in range(6):
        g = ds[i]['image'][..., 0].astype(float)
        prof = g.mean(1)
        peak = int(prof.argmax())
        assert 0.45 * S < peak < 0.8 * S, peak                  # bright RPE band in the lower middle
        assert prof[: S // 4].mean() < 0.15 * prof.max()         # dark vitreous above the retina
        # flatten on each column's RPE (its brightest smoothed row); walking up from the RPE, the
        # bands alternate bright (RPE) / dark (outer nuclear) / bright (outer plexiform) / dark
        # (inner nuclear) / bright (inner plexiform, ganglion cell, nerve fibre)
        sm = np.asarray(Image.fromarray(g.astype(np.uint8)).filter(ImageFilter.BoxBlur(1)), float)
        rpe = sm.argmax(0)
        k = int(0.19 * S)                                                    # about the retina's thickness
        keep = (rpe > k) & (np.abs(np.arange(S) - S // 2) > S // 8)         # off the foveal pit
        flat = np.stack([g[rpe[j] - k:rpe[j] + 1, j] for j in np.flatnonzero(keep)]).mean(0)[::-1]
        lo, hi, state, changes = 0.3 * flat.max(), 0.4 * flat.max(), 'bright', 0
        for v in flat:
            if (state == 'bright' and v < lo) or (state == 'dark' and v > hi):
                state, changes = ('dark' if state == 'bright' else 'bright'), changes + 1
        assert changes >= 4, (i, np.round(flat).astype(int).tolist())


def test_macular_hole_visible():
    """OCT: the same example with and without its hole differs only around the fovea, where the
    hole is a full-thickness dark gap. FFA: a bright window defect at the fovea."""
    S = 128
    spec = _spec('OCT', conditions=('macular hole',), single_condition=True, size=4)
    ds = SyntheticFundus(spec)
    for i in range(4):
        p, rng = ds._sample(i)
        assert p['lesions']['hole'] is not None
        hole = syn._render_oct(spec, p, copy.deepcopy(rng))
        assert np.array_equal(hole, ds[i]['image'])
        q = dict(p, lesions=dict(p['lesions'], hole=None))
        none = syn._render_oct(spec, q, copy.deepcopy(rng))
        far = np.abs(np.arange(S) - S / 2) > 0.35 * S
        assert np.array_equal(hole[:, far], none[:, far])
        h, n = hole[..., 0].astype(float), none[..., 0].astype(float)
        centre = slice(S // 2 - 2, S // 2 + 2)
        prof = np.convolve(n[:, centre].mean(1), np.ones(3) / 3, 'same')
        rpe = int(prof.argmax())
        floor = int(np.argmax(prof > 22))                  # the intact fovea's floor: outer retina from here to the RPE
        assert rpe - floor > 6
        rows = slice(floor, rpe - 3)
        assert h[rows, centre].mean() < 0.5 * n[rows, centre].mean(), i          # gap vs the intact fovea
        side = np.r_[S // 2 - 30:S // 2 - 22, S // 2 + 22:S // 2 + 30]
        assert h[rows, centre].mean() < 0.5 * h[rows][:, side].mean(), i        # gap vs neighbouring columns
        # FFA of the same eye: bright spot at the fovea
        fspec = _spec('FFA', conditions=('macular hole',), single_condition=True, size=4)
        a = syn._render_ffa(fspec, p, copy.deepcopy(rng))[..., 0].astype(float)
        b = syn._render_ffa(fspec, q, copy.deepcopy(rng))[..., 0].astype(float)
        fx, fy = p['fovea']
        x = int((fx + 1) * S / 2) if p['eye'] == 'right' else S - 1 - int((fx + 1) * S / 2)
        y = int((fy + 1) * S / 2)
        assert a[y - 1:y + 2, x - 1:x + 2].mean() > b[y - 1:y + 2, x - 1:x + 2].mean() + 60


# ---------------------------------------------------------------------------------------- captions

def test_captions_name_modality_and_only_visible_findings():
    n = 400
    base = SyntheticFundus(CorpusSpec(seed=9, size=n, expert_fraction=1.0))
    ds = SyntheticFundus(CorpusSpec(seed=9, size=n, expert_fraction=1.0, modalities=MODALITIES))
    names = {'FFA': 'fluorescein', 'OCT': 'oct'}
    normal = {m: 0 for m in names}
    for i in range(n):
        r = ds.record(i)
        cap = r['caption'].lower()
        if r['modality'] == 'CFP':
            assert r['caption'] == base.record(i)['caption']
            continue
        m = r['modality']
        assert names[m] in cap and r['eye'] in cap, r['caption']
        p, _ = ds._sample(i)
        vis = syn._visible_findings(p, m)
        col = MODALITIES.index(m) - 1
        for f in vis:
            assert any(s.lower() in cap for s in syn._MODALITY_SIGNS[f][col]), (f, r['caption'])
        for f in set(K.FINDINGS[1:]) - set(vis):
            assert not any(s.lower() in cap for s in K.FINDING_SYNONYMS_EN[f]), (f, r['caption'])
        if not vis:
            normal[m] += 1
            assert r['caption'] in [t.format(eye=r['eye']) for t in syn._CAPTION_NORMAL[m]]
    assert all(normal.values()), normal
    # non-expert examples have no caption in any modality
    ds = SyntheticFundus(CorpusSpec(seed=9, size=40, expert_fraction=0.0, modalities=MODALITIES))
    assert all(ds.record(i)['caption'] == '' for i in range(40))


def test_oct_dot_lesions_visible_only_when_cut():
    """A B-scan shows drusen only where it cuts them: visibility and caption follow the geometry."""
    ds = SyntheticFundus(CorpusSpec(seed=0, size=100, image_size=96, conditions=('age-related macular degeneration',),
                                    single_condition=True, expert_fraction=1.0, attribute_prob=0.0, modalities=('OCT',)))
    i = next(i for i in range(100) if ds._sample(i)[0]['lesions']['ga'] is None)
    p, rng = ds._sample(i)
    assert len(syn._oct_cut(p['lesions']['drusen'], p)) and syn._visible_findings(p, 'OCT') == ['drusen']
    assert 'drusen' in ds.record(i)['caption']
    off = p['lesions']['drusen'].copy()
    off[:, 1] = p['fovea'][1] + 0.4                                       # the same drusen, off the scan line
    q = dict(p, lesions=dict(p['lesions'], drusen=off))
    assert not len(syn._oct_cut(off, q)) and syn._visible_findings(q, 'OCT') == []
    assert 'drusen' not in syn._modality_caption(q, 'OCT', np.random.default_rng(0))
    # and the RPE is flat where the drusen were: the image equals the one without drusen
    r = dict(p, lesions=dict(p['lesions'], drusen=np.zeros((0, 3))))
    flat = syn._render_oct(ds.spec, r, copy.deepcopy(rng))
    assert np.array_equal(syn._render_oct(ds.spec, q, copy.deepcopy(rng)), flat)
    assert not np.array_equal(ds[i]['image'], flat)


# ---------------------------------------------------------------------------------------- gallery

def test_gallery_row_per_modality():
    sheet = make_gallery(2, seed=1, image_size=48, modality_rows=MODALITIES, expert_fraction=1.0)
    one = make_gallery(2, seed=1, image_size=48, modality_rows=('CFP',), expert_fraction=1.0)
    assert sheet.size[0] == one.size[0] and sheet.size[1] > 2.5 * one.size[1]
