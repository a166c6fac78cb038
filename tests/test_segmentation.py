"""Segmentation transfer (docs/methods.md, "ViLReF"): the synthetic corpus's lesion/anatomy masks
(docs/data.md, "The synthetic corpus"), the U-Net decoder on every image tower, Dice/IoU and the transfer protocol."""
import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from retina_jax.data import knowledge as K
from retina_jax.data import synthetic as syn
from retina_jax.data import transforms
from retina_jax.data.synthetic import MASK_CLASSES, CorpusSpec, SyntheticFundus
from retina_jax.evals.segmentation_transfer import (evaluate_segmentation, segmentation_metrics, segmentation_transfer,
                                           soft_dice_loss, synthetic_segmentation_data, train_segmentation)
from retina_jax.models.bert import BertConfig
from retina_jax.models.clip_resnet import clip_resnet_tiny
from retina_jax.models.resnet import ResNet, resnet_tiny
from retina_jax.models.unet_decoder import SegmentationModel
from retina_jax.models.two_tower import TwoTower
from retina_jax.models.vit import vit_b16, vit_tiny

S = 128           # below 160 the renderer does not blur its vessel / dark-lesion layer: edges are exact
LESIONS = MASK_CLASSES[:-3]


def _channel(name):
    return MASK_CLASSES.index(name)


def _examples(spec, want, n):
    """Up to n indices of `spec`'s corpus whose record satisfies want(p) (sampling only, no rendering)."""
    ds = SyntheticFundus(spec)
    out = []
    for i in range(spec.size):
        p, _ = ds._sample(i)
        if want(p):
            out.append(i)
        if len(out) == n:
            break
    return ds, out


# ------------------------------------------------------------------------------------------- masks

def test_masks_shape_values_empty_lesions_and_image_unchanged():
    ds = SyntheticFundus(CorpusSpec(seed=11, size=40, image_size=64, attribute_prob=0.5))
    normals = 0
    for i in range(40):
        ex, plain = ds.item_with_masks(i), ds[i]
        assert np.array_equal(ex['image'], plain['image']), i         # masks cost the image nothing
        m = ex['masks']
        assert m.dtype == np.uint8 and m.shape == (64, 64, len(MASK_CLASSES)) and set(np.unique(m)) <= {0, 1}
        assert np.array_equal(ds.masks(i), m)
        for name in LESIONS:                                           # a lesion channel is empty iff the finding is absent
            assert m[..., _channel(name)].any() == bool(ex['labels'][K.FINDING_INDEX[name]]), (i, name)
        assert all(m[..., _channel(a)].any() for a in ('vessels', 'optic disc', 'optic cup'))
        assert not (m[..., _channel('optic cup')] & ~m[..., _channel('optic disc')]).any()
        _, r2 = syn._grid(64)
        assert not m[r2 > syn.FOV_RADIUS ** 2 + 0.01].any()           # cut to the field of view
        if ex['conditions'] == ['normal']:
            normals += 1
            assert not m[..., :len(LESIONS)].any()
    assert normals >= 2


def _without(key, empty):
    return lambda p: (p, dict(p, lesions=dict(p['lesions'], **{key: empty})))


def _hole_wider(p):
    return p, dict(p, lesions=dict(p['lesions'], hole=1.6 * p['lesions']['hole']))


def _ga_moved(p):
    # drusen (drawn later) would hide part of the atrophy: both renders go without them
    base = dict(p, lesions=dict(p['lesions'], drusen=np.zeros((0, 3))))
    gx, gy, gr = p['lesions']['ga']
    return base, dict(base, lesions=dict(base['lesions'], ga=(gx, gy + 0.45, gr)))


_CHANGES = [
    # (condition, mask class, the two eyes to render, which examples, soft-edged). Both eyes of a pair draw
    # the same random numbers, so the renders differ only where the class's structure changed: removed,
    # where nothing drawn later takes random numbers (the filters pick such eyes); the macular hole
    # widened (without a hole the foveal reflex would appear); the atrophy moved (it is drawn first:
    # removing it would shift every later draw). A hard-edged structure under a half-transparent
    # cotton-wool spot is hidden in its mask but still tints the image: those eyes are left out.
    ('diabetic retinopathy', 'microaneurysm', _without('ma', np.zeros((0, 3))),
     lambda p: p['findings'] == {'microaneurysm'}, False),
    ('hypertensive retinopathy', 'haemorrhage', _without('haem', np.zeros((0, 5))),
     lambda p: 'cotton-wool spot' not in p['findings'], False),
    ('diabetic retinopathy', 'hard exudate', _without('exudates', np.zeros((0, 3))), lambda p: True, False),
    ('hypertensive retinopathy', 'cotton-wool spot', _without('cws', np.zeros((0, 3))), lambda p: True, True),
    ('diabetic retinopathy', 'neovascularization', _without('nv', []),
     lambda p: not ({'cotton-wool spot', 'hard exudate'} & p['findings']), False),
    ('age-related macular degeneration', 'drusen', _without('drusen', np.zeros((0, 3))), lambda p: True, True),
    ('retinitis pigmentosa', 'bone-spicule pigment', _without('spicules', np.zeros((0, 3))), lambda p: True, False),
    ('diabetic retinopathy', 'laser scar', _without('scars', np.zeros((0, 3))),
     lambda p: 'cotton-wool spot' not in p['findings'], False),
    ('macular hole', 'macular hole', _hole_wider, lambda p: True, False),
    ('age-related macular degeneration', 'geographic atrophy', _ga_moved, lambda p: True, True),
]


@pytest.mark.parametrize('condition,name,change,want,soft', _CHANGES, ids=[c[1] for c in _CHANGES])
def test_mask_is_where_the_renderer_draws(condition, name, change, want, soft):
    """Two renders of an eye that differ in one structure differ where its masks differ. A structure
    drawn with a hard edge: exactly there. A soft-edged one: every strong change (over half the typical
    one) within a pixel of there, nearly every pixel there changed, beyond 3 pixels only faint changes."""
    spec = CorpusSpec(seed=4, size=600, image_size=S, conditions=(condition,), single_condition=True, attribute_prob=0.0)
    ds, indices = _examples(spec, lambda p: name in p['findings'] and want(p), 3)
    assert len(indices) == 3
    for i in indices:
        p, rng = ds._sample(i)
        renders = []
        for eye in change(p):
            layers = syn._MaskLayers(S)
            renders.append((syn._render(spec, eye, copy.deepcopy(rng), layers), layers.array(p['eye'])[..., _channel(name)]))
        (a, mask_a), (b, mask_b) = renders
        if change(p)[0] is p:                   # the example itself, as the corpus gives it
            assert np.array_equal(a, ds[i]['image']) and np.array_equal(mask_a, ds.masks(i)[..., _channel(name)])
        where = mask_a.astype(bool) ^ mask_b.astype(bool)
        delta = np.abs(a.astype(int) - b).max(-1)
        assert where.any(), i
        if not soft:
            assert np.array_equal(delta > 0, where), (i, int(((delta > 0) & ~where).sum()),
                                                      int((where & (delta == 0)).sum()))
            continue
        typical, distance = np.median(delta[where]), ndimage.distance_transform_edt(~where)
        assert delta[distance > 1].max() <= 0.5 * typical, i
        assert delta[distance > 3].max() < 0.1 * typical, i
        assert (delta[where] > 0.25 * typical).mean() > 0.95, i


def test_vessel_mask_is_where_vessels_are_drawn(monkeypatch):
    """Drawing the vessels nowhere (their random draws still taken) changes exactly the vessel mask's
    pixels: av nicks cut it, and a lesion drawn over a vessel takes those pixels out of it."""
    spec = CorpusSpec(seed=3, size=60, image_size=S, conditions=('diabetic retinopathy', 'hypertensive retinopathy'),
                      single_condition=True, attribute_prob=0.0)
    ds, indices = _examples(spec, lambda p: not ({'cotton-wool spot', 'drusen'} & p['findings']), 6)
    assert {'av nicking', 'haemorrhage'} <= set().union(*(ds._sample(i)[0]['findings'] for i in indices))
    real = syn._draw_vessels
    rim = np.asarray(syn._fov_mask(S, 'L')) < 255       # the field of view's soft edge, where masks stop at half
    for i in indices:
        ex, (p, rng) = ds.item_with_masks(i), ds._sample(i)
        with monkeypatch.context() as m:
            m.setattr(syn, '_draw_vessels', lambda md, *args: real(ImageDraw.Draw(Image.new('RGB', (S, S))), *args))
            without = syn._render(spec, p, rng)
        changed = (without != ex['image']).any(-1)
        np.testing.assert_array_equal(changed[~rim], ex['masks'][..., _channel('vessels')][~rim] > 0)


def _ring(mask, exclude, inner=1, outer=3):
    return ndimage.binary_dilation(mask, iterations=outer) & ~ndimage.binary_dilation(mask | exclude, iterations=inner)


def test_anatomy_and_atrophy_masks_match_their_colours():
    """Vessels are darker (green) than the fundus beside them; the disc, the cup within it and the
    peripapillary atrophy crescent are brighter than what surrounds them."""
    spec = CorpusSpec(seed=6, size=6, image_size=S, conditions=('normal', 'pathologic myopia'), single_condition=True,
                      attribute_prob=0.0)
    ds = SyntheticFundus(spec)
    myopic = 0
    for i in range(6):
        ex = ds.item_with_masks(i)
        g = ex['image'][..., 1].astype(float)
        m = ex['masks'].astype(bool)
        vessels, disc, cup, ppa = (m[..., _channel(a)]
                                   for a in ('vessels', 'optic disc', 'optic cup', 'peripapillary atrophy'))
        around_disc = ndimage.binary_dilation(disc, iterations=12)
        assert g[vessels & ~around_disc].mean() < 0.8 * g[_ring(vessels, around_disc, 1, 2)].mean(), i
        assert g[disc & ~vessels].mean() > g[_ring(disc, vessels | ppa, 2, 4)].mean() + 40, i
        assert g[cup & ~vessels].mean() > g[disc & ~cup & ~vessels].mean() + 20, i
        assert ppa.any() == ('pathologic myopia' in ex['conditions'])
        if ppa.any():
            myopic += 1
            assert not (ppa & disc).any()
            assert g[ppa & ~vessels].mean() > g[_ring(ppa, disc | vessels, 1, 3)].mean() + 40, i
    assert myopic >= 1


def test_microaneurysm_components_are_the_microaneurysms():
    """Where no two microaneurysms touch, the mask has one connected component per microaneurysm, at its
    (mirrored for a left eye) position."""
    spec = CorpusSpec(seed=8, size=300, image_size=S, conditions=('diabetic retinopathy',), single_condition=True)
    ds = SyntheticFundus(spec)
    checked = 0
    for i in range(300):
        p, _ = ds._sample(i)
        if p['findings'] != {'microaneurysm'}:      # other lesions may cover some
            continue
        ma = p['lesions']['ma']
        px = (ma[:, :2] + 1) * S / 2
        rad = np.maximum(ma[:, 2] * S / 2, 0.7)
        dist = np.hypot(*(px[:, None] - px[None, :]).transpose(2, 0, 1))
        if (dist + np.eye(len(ma)) * 1e9 < rad[:, None] + rad[None, :] + 3).any():
            continue
        labelled, count = ndimage.label(ds.masks(i)[..., _channel('microaneurysm')], np.ones((3, 3)))
        assert count == len(ma), (i, count, len(ma))
        centres = np.array(ndimage.center_of_mass(labelled > 0, labelled, range(1, count + 1)))[:, ::-1] + 0.5  # (x, y)
        if p['eye'] == 'left':
            px[:, 0] = S - px[:, 0]
        assert np.abs(centres[:, None] - px[None]).max(-1).min(1).max() < 1.0, i
        checked += 1
    assert checked >= 3


def test_quality_effects_and_haze_leave_masks_alone():
    spec = CorpusSpec(seed=1, size=30, image_size=64, conditions=('diabetic retinopathy',))
    ds = SyntheticFundus(spec)
    for i in range(3):
        p, rng = ds._sample(i)
        degraded = dict(p, atributes=['noisy', 'blurred', 'underexposed'], lesions=dict(p['lesions'], haze=0.6))
        layers = syn._MaskLayers(64)
        image = syn._render(spec, degraded, copy.deepcopy(rng), layers)
        assert not np.array_equal(image, ds[i]['image'])
        assert np.array_equal(layers.array(p['eye']), ds.masks(i))


@pytest.mark.parametrize('modality', ['FFA', 'OCT'])
def test_masks_are_for_colour_photographs_only(modality):
    ds = SyntheticFundus(CorpusSpec(size=2, image_size=32, modalities=(modality,)))
    with pytest.raises(ValueError, match=f'example 1 is a {modality} image.*CFP'):
        ds.masks(1)


# ------------------------------------------------------------------------------- towers and decoder

@pytest.mark.parametrize('make,strides', [(resnet_tiny, (2, 4, 8, 16, 32)), (clip_resnet_tiny, (2, 4, 8, 16, 32)),
                                          (lambda: vit_tiny(image_size=64), (8, 8))])
def test_tower_stages_keep_the_param_tree(make, strides):
    tower = make()
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    plain = jax.eval_shape(functools.partial(tower.init, train=False), jax.random.PRNGKey(0), x)
    staged = jax.eval_shape(functools.partial(tower.init, train=False, stages=True), jax.random.PRNGKey(0), x)
    assert jax.tree.map(lambda a: a.shape, plain) == jax.tree.map(lambda a: a.shape, staged)
    pooled, maps = jax.eval_shape(functools.partial(tower.apply, train=False, stages=True), plain, x)
    assert pooled.shape == (2, tower.features_dim) and [64 // m.shape[1] for m in maps] == list(strides)


@pytest.mark.parametrize('make,size,blocks', [(resnet_tiny, 64, 5), (resnet_tiny, 50, 5), (clip_resnet_tiny, 64, 5),
                                              (lambda: vit_tiny(image_size=64), 64, 3), (vit_b16, 224, 4)])
def test_decoder_output_shape(make, size, blocks):
    """Logits at the input size for every tower (odd sizes too); a ViT-B/16 gets UNETR's four levels
    (blocks 12, 9, 6, 3: three skips), so four decoder blocks."""
    model = SegmentationModel(img=make(), num_classes=len(MASK_CLASSES), features=(32, 16, 16, 8, 8))
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert set(variables['params']) == {'img', 'decoder'}
    assert sum(k.startswith('block') for k in variables['params']['decoder']) == blocks
    out = jax.eval_shape(model.apply, variables, x)
    assert out.shape == (2, size, size, len(MASK_CLASSES)) and out.dtype == jnp.float32


def test_decoder_needs_a_width_per_block():
    model = SegmentationModel(img=resnet_tiny(), num_classes=2, features=(8, 8))
    with pytest.raises(ValueError, match='need 5 decoder blocks'):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))


# ------------------------------------------------------------------------------------------ metrics

def _reference(true, pred):
    """Loop-over-classes NumPy reference of the dataset-level convention."""
    dice, iou = [], []
    for k in range(true.shape[-1]):
        t, p = true[..., k].astype(bool), pred[..., k].astype(bool)
        if not t.any():
            dice.append(np.nan), iou.append(np.nan)
            continue
        inter, union = np.logical_and(t, p).sum(), np.logical_or(t, p).sum()
        dice.append(2 * inter / (t.sum() + p.sum()))
        iou.append(inter / union)
    return np.array(dice), np.array(iou)


def test_metrics_match_reference_with_empty_masks():
    rng = np.random.default_rng(0)
    true = (rng.random((5, 8, 8, 6)) < 0.3).astype(np.uint8)
    pred = (rng.random((5, 8, 8, 6)) < 0.3).astype(np.uint8)
    true[..., 1] = 0                    # no ground truth, some predictions: unscored
    true[..., 2] = pred[..., 2] = 0     # empty and predicted empty: unscored
    pred[..., 3] = 0                    # ground truth, nothing predicted: 0
    pred[..., 4] = true[..., 4]         # perfect: 1
    true[1:, ..., 5] = 0                # one image has the class, the others' predictions are false positives
    names = tuple('abcdef')
    out = segmentation_metrics(true, pred, names)
    dice, iou = _reference(true, pred)
    for k, n in enumerate(names):
        np.testing.assert_allclose([out[f'dice/{n}'], out[f'iou/{n}']], [dice[k], iou[k]], equal_nan=True)
    assert np.isnan(out['dice/b']) and np.isnan(out['dice/c']) and out['dice/d'] == 0 and out['dice/e'] == 1
    assert out['num_classes_scored'] == 4 and out['num_examples'] == 5
    assert out['mean_dice'] == pytest.approx(np.nanmean(dice)) and out['mean_iou'] == pytest.approx(np.nanmean(iou))
    # hand-computed: 2 TP, 1 FP, 1 FN -> Dice 4/6, IoU 2/4
    t = np.array([1, 1, 1, 0]).reshape(1, 2, 2, 1)
    p = np.array([1, 1, 0, 1]).reshape(1, 2, 2, 1)
    out = segmentation_metrics(t, p, ('x',))
    assert out['dice/x'] == pytest.approx(2 / 3) and out['iou/x'] == pytest.approx(0.5)


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match='pred_masks: masks must be binary'):
        segmentation_metrics(np.zeros((1, 2, 2, 1)), np.full((1, 2, 2, 1), 2))
    with pytest.raises(ValueError, match=r'differ in shape'):
        segmentation_metrics(np.zeros((1, 2, 2, 1)), np.zeros((2, 2, 2, 1)))
    with pytest.raises(ValueError, match='pass class_names'):
        segmentation_metrics(np.zeros((1, 2, 2, 3)), np.zeros((1, 2, 2, 3)))


def test_soft_dice_loss():
    masks = jnp.asarray(np.random.default_rng(0).random((2, 8, 8, 3)) < 0.3, jnp.float32)
    masks = masks.at[..., 2].set(0.0)
    right = jnp.where(masks > 0, 20.0, -20.0)
    assert float(soft_dice_loss(right, masks)) < 1e-3                        # an absent class predicted absent: no loss
    assert float(soft_dice_loss(-right, masks)) > 0.6
    assert float(soft_dice_loss(right.at[..., 2].set(20.0), masks)) > 0.3    # false positives of an absent class


# ----------------------------------------------------------------------------------------- protocol

# The protocol tests share one tiny tower, image size and hyperparameters, so their jitted programs are
# compiled once (the session's persistent compilation cache serves the repeats).
_SIZE = 32
_CLASSES = ('optic disc', 'optic cup')
_HYPER = dict(lr=3e-3, batch_size=8, features=(16, 16, 8, 8, 8))


@pytest.fixture(scope='module')
def data():
    spec = CorpusSpec(seed=5, image_size=64, attribute_prob=0.0)
    keep = [_channel(c) for c in _CLASSES]
    (tx, tm), (vx, vm) = (synthetic_segmentation_data(spec, split, n, _SIZE) for split, n in (('train', 48), ('test', 12)))
    return tx, tm[..., keep], vx, vm[..., keep]


@pytest.fixture(scope='module')
def pretrained():
    """A tiny basic-block ResNet, randomly initialised (the 'rbg' generator compiles its init fast)."""
    tower = ResNet(depth=18, width=8, stage_sizes=(1, 1, 1, 1))
    x = jnp.zeros((1, _SIZE, _SIZE, 3))
    return tower, jax.jit(functools.partial(tower.init, train=False))(jax.random.key(0, impl='rbg'), x)


def test_transfer_beats_trivial_predictors_with_the_encoder_frozen(data, pretrained):
    tx, tm, vx, vm = data
    tower, variables = pretrained
    before = jax.tree.map(np.array, variables)
    out = segmentation_transfer(tower, variables, tx, tm, vx, vm, steps=120, class_names=_CLASSES, seed=0, **_HYPER)
    assert out['num_examples'] == 12 and out['num_classes_scored'] == 2       # 12 = a full and a padded batch
    assert out['train_loss_last'] < 0.7 * out['train_loss_first'], out
    for k, name in enumerate(_CLASSES):
        key = f"dice/{name.replace(' ', '_')}"
        truth = vm[..., k:k + 1]
        assert segmentation_metrics(truth, np.zeros_like(truth), (name,))[key] == 0
        all_one = segmentation_metrics(truth, np.ones_like(truth), (name,))[key]
        assert out[key] > max(0.4, 10 * all_one), (name, out[key], all_one)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, variables))

    # the same programs again (cached): the frozen tower's params and statistics come back unchanged,
    # and the padding of a last batch is not counted
    trained = train_segmentation(tower, variables, tx, tm, steps=2, **_HYPER)
    jax.tree.map(np.testing.assert_array_equal, before['params'], trained.variables['params']['img'])
    jax.tree.map(np.testing.assert_array_equal, before['batch_stats'], trained.variables['batch_stats']['img'])
    half = evaluate_segmentation(trained, vx[:4], vm[:4], _CLASSES, batch_size=8)
    twice = evaluate_segmentation(trained, np.concatenate([vx[:4]] * 2), np.concatenate([vm[:4]] * 2), _CLASSES,
                                  batch_size=8)
    assert half['num_examples'] == 4 and {k: v for k, v in half.items() if k != 'num_examples'} == \
        {k: v for k, v in twice.items() if k != 'num_examples'}


def test_finetuned_encoder_trains_on_a_copy(data, pretrained):
    tx, tm, _, _ = data
    tower, variables = pretrained
    # a TwoTower's variables: only its `img` subtree is used, and nothing of them is modified
    model = TwoTower(img=tower, txt_config=BertConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=1, intermediate_size=8))
    full = {'params': {'img': variables['params'], 'logit_scale': jnp.ones(())},
            'batch_stats': {'img': variables['batch_stats']}}
    before = jax.tree.map(np.array, full)
    tuned = train_segmentation(model, full, tx, tm, steps=2, finetune_encoder=True, **_HYPER)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before['params']['img'], tuned.variables['params']['img'])
    assert all(jax.tree.leaves(changed))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before['batch_stats']['img'],
                           tuned.variables['batch_stats']['img'])
    assert all(jax.tree.leaves(changed))                                      # trained in `train` mode
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, full))


def test_transfer_rejects_bad_input(data, pretrained):
    tx, tm, vx, vm = data
    tower, variables = pretrained
    with pytest.raises(ValueError, match=r'train_images \[N, H, W, 3\] must match train_masks'):
        train_segmentation(tower, variables, tx[:, :16], tm, steps=1)
    with pytest.raises(ValueError, match='train_masks: masks must be binary'):
        train_segmentation(tower, variables, tx, tm * 2, steps=1)
    with pytest.raises(ValueError, match='do not fit ModifiedResNet on 32x32 images'):
        train_segmentation(clip_resnet_tiny(image_size=_SIZE), variables, tx, tm, steps=1)
    with pytest.raises(TypeError, match='needs a TwoTower or an image tower'):
        train_segmentation(object(), variables, tx, tm, steps=1)
    with pytest.raises(ValueError, match='class_names has 3 names for masks of 2 classes'):
        segmentation_transfer(tower, variables, tx, tm, vx, vm, steps=1, class_names=('a', 'b', 'c'))


@pytest.mark.parametrize('mode', transforms.PREPROCESS_MODES)
def test_synthetic_segmentation_data(mode):
    spec = CorpusSpec(seed=9, image_size=64)
    images, masks = synthetic_segmentation_data(spec, 'test', 4, 32, preprocess=mode)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.float32
    assert masks.shape == (4, 32, 32, len(MASK_CLASSES)) and masks.dtype == np.uint8
    ds = SyntheticFundus(CorpusSpec(seed=10, size=4, image_size=64))           # 'test' is the next seed
    for i in range(4):
        ex = ds.item_with_masks(i)
        np.testing.assert_array_equal(images[i], transforms.preprocess(ex['image'], 32, mode))
        np.testing.assert_array_equal(masks[i], ex['masks'][1::2, 1::2])       # nearest: one pixel of each 2x2
    train, _ = synthetic_segmentation_data(spec, 'train', 4, 32, preprocess=mode)
    assert not np.array_equal(train, images)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        synthetic_segmentation_data(spec, 'val', 4, 32)


def test_synthetic_segmentation_data_from_config():
    from configs import common
    config = common.get_config()
    config.data.synthetic.image_size = 64
    images, masks = synthetic_segmentation_data(config, 'train', 2, 32)
    ds = SyntheticFundus(CorpusSpec(seed=config.heldout.findings.seed, size=2, image_size=64,
                                    comorbidity_prob=config.data.synthetic.comorbidity_prob, expert_fraction=0.0,
                                    difficulty=config.data.synthetic.difficulty))
    np.testing.assert_array_equal(images[1], transforms.preprocess(ds[1]['image'], 32, config.data.preprocess))
    np.testing.assert_array_equal(masks[1], ds.masks(1)[1::2, 1::2])
