"""Segmentation transfer (ViLReF's evaluation, docs/methods.md, "ViLReF": lesion/vessel masks
with a decoder on the image tower, Dice/IoU).

A U-Net decoder (models/unet_decoder.py) on the pretrained image tower is trained with BCE + soft Dice
(AdamW, jitted steps) on images with per-class binary masks, the tower frozen (default) or fine-tuned,
and scored by Dice and IoU on a test set. Training works on a copy of the pretrained variables, which
are untouched afterwards. The synthetic corpus draws the masks (`SyntheticFundus.masks`, MASK_CLASSES).

Metrics are dataset-level, per class: the pixels of every test image are pooled, predictions
thresholded at probability 0.5, Dice = 2 TP / (2 TP + FP + FN) and IoU = TP / (TP + FP + FN). So an
image without a class still counts, through the false positives predicted on it (a per-image Dice has
no value there), and every pixel weighs the same. A class with no positive pixel in the whole test set
has no score (NaN, as MONAI's `ignore_empty`); the means are over the scored classes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from PIL import Image

from retina_jax.data import pipeline, transforms
from retina_jax.data.synthetic import MASK_CLASSES, CorpusSpec, SyntheticFundus
from retina_jax.models.clip_resnet import ModifiedResNet
from retina_jax.models.resnet import ResNet
from retina_jax.models.unet_decoder import DECODER_FEATURES, SegmentationModel, pyramid
from retina_jax.models.two_tower import TwoTower
from retina_jax.models.vit import VisionTransformer


# ------------------------------------------------------------------------------------------ metrics

def scores_from_counts(tp, fp, fn, class_names: Sequence[str]) -> dict:
    """Per-class and mean Dice / IoU from pooled pixel counts [M] (module docstring)."""
    tp, fp, fn = (np.asarray(a, np.float64) for a in (tp, fp, fn))
    scored = tp + fn > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(scored, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(scored, tp / (tp + fp + fn), np.nan)
    out = {"mean_dice": float(dice[scored].mean()) if scored.any() else float("nan"),
           "mean_iou": float(iou[scored].mean()) if scored.any() else float("nan"),
           "num_classes_scored": int(scored.sum())}
    for k, name in enumerate(class_names):
        key = name.replace(" ", "_")
        out[f"dice/{key}"], out[f"iou/{key}"] = float(dice[k]), float(iou[k])
    return out


def _check_masks(name: str, masks, num_classes: int | None = None) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 4 or (num_classes is not None and masks.shape[-1] != num_classes):
        raise ValueError(f"{name}: masks [N, H, W, M] expected" + (f" with M={num_classes}" if num_classes else "")
                         + f", got {masks.shape}")
    if not np.isin(masks, (0, 1)).all():
        raise ValueError(f"{name}: masks must be binary (0/1), got values {np.unique(masks)[:8].tolist()}")
    return masks


def _class_names(class_names, num_classes: int) -> tuple[str, ...]:
    if class_names is None:
        if num_classes != len(MASK_CLASSES):
            raise ValueError(f"masks have {num_classes} classes, not the synthetic corpus's {len(MASK_CLASSES)} "
                             f"(MASK_CLASSES): pass class_names")
        return MASK_CLASSES
    if len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names for masks of {num_classes} classes")
    return tuple(class_names)


def segmentation_metrics(true_masks, pred_masks, class_names: Sequence[str] | None = None) -> dict:
    """Dataset-level Dice / IoU of binary predictions [N, H, W, M] against binary masks of the same shape."""
    true_masks = _check_masks("true_masks", true_masks).astype(bool)
    pred_masks = _check_masks("pred_masks", pred_masks, true_masks.shape[-1]).astype(bool)
    if pred_masks.shape != true_masks.shape:
        raise ValueError(f"pred_masks {pred_masks.shape} and true_masks {true_masks.shape} differ in shape")
    axes = (0, 1, 2)
    return {**scores_from_counts((pred_masks & true_masks).sum(axes), (pred_masks & ~true_masks).sum(axes),
                                 (~pred_masks & true_masks).sum(axes), _class_names(class_names, true_masks.shape[-1])),
            "num_examples": len(true_masks)}


# ------------------------------------------------------------------------------------------- losses

def soft_dice_loss(logits, masks, smooth: float = 1.0):
    """1 - mean over classes of the soft Dice of sigmoid(logits) [B, H, W, M], pooled over the batch
    (as the metric pools the test set); `smooth` keeps a class absent from the batch defined (its
    loss then only asks for low probabilities)."""
    probs = jax.nn.sigmoid(logits.astype(jnp.float32))
    axes = (0, 1, 2)
    inter = jnp.sum(probs * masks, axes)
    return 1.0 - jnp.mean((2 * inter + smooth) / (jnp.sum(probs, axes) + jnp.sum(masks, axes) + smooth))


def segmentation_loss(logits, masks, dice_weight: float = 1.0):
    """Mean per-pixel BCE + dice_weight * soft Dice loss."""
    return optax.sigmoid_binary_cross_entropy(logits, masks).mean() + dice_weight * soft_dice_loss(logits, masks)


# ------------------------------------------------------------------------------------------ protocol

_TOWERS = (ResNet, ModifiedResNet, VisionTransformer)


def _tower_and_variables(model, variables) -> tuple:
    """(image tower, {'params', 'batch_stats'} of the tower) from a TwoTower and its variables, or from a
    bare tower and its own variables."""
    variables = dict(variables)
    if "params" not in variables:
        raise ValueError(f"variables: no 'params' collection (got {sorted(variables)})")
    if isinstance(model, TwoTower):
        if "img" not in variables["params"]:
            raise ValueError("variables['params']: no 'img' subtree (the image tower's)")
        return model.img, {"params": variables["params"]["img"],
                           "batch_stats": variables.get("batch_stats", {}).get("img", {})}
    if isinstance(model, _TOWERS):
        return model, {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    towers = ", ".join(t.__name__ for t in _TOWERS)
    raise TypeError(f"segmentation transfer needs a TwoTower or an image tower ({towers}), got {type(model).__name__}")


def _check_pair(name: str, images, masks) -> np.ndarray:
    masks = _check_masks(f"{name}_masks", masks)
    if np.ndim(images) != 4 or np.shape(images)[:3] != masks.shape[:3] or np.shape(images)[-1] != 3:
        raise ValueError(f"{name}_images [N, H, W, 3] must match {name}_masks [N, H, W, M]: got "
                         f"{np.shape(images)} and {masks.shape}")
    return masks


@dataclasses.dataclass
class TrainedSegmentation:
    """The result of `train_segmentation`: the model, its trained variables and the loss per step."""
    model: SegmentationModel
    variables: dict
    losses: np.ndarray


def train_segmentation(model, variables, images, masks, *, steps: int = 300, lr: float = 1e-3,
                       batch_size: int = 16, finetune_encoder: bool = False, weight_decay: float = 1e-4,
                       dice_weight: float = 1.0, features: Sequence[int] = DECODER_FEATURES,
                       seed: int = 0) -> TrainedSegmentation:
    """Trains a U-Net decoder (and with `finetune_encoder` the image tower) on a copy of the tower's
    variables: images float32 [N, H, W, 3] (preprocessed as the model expects), masks 0/1 [N, H, W, M].
    Frozen, only the decoder is optimised (no weight decay reaches the tower) and the tower keeps its
    BatchNorm running averages; fine-tuned, the tower trains in `train` mode, its statistics updated."""
    masks = _check_pair("train", images, masks)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    tower, tower_variables = _tower_and_variables(model, variables)
    # Our own buffers, so the step may donate them while the caller's model stays intact and usable.
    owned = jax.tree.map(lambda a: jnp.array(a, copy=True), tower_variables)
    seg = SegmentationModel(img=tower, num_classes=masks.shape[-1], features=tuple(features),
                            freeze_encoder=not finetune_encoder, dtype=getattr(tower, "dtype", jnp.float32))
    # Shapes only (eval_shape): the tower's params come pretrained, and only the decoder's are initialised.
    dummy = jax.ShapeDtypeStruct((1, *np.shape(images)[1:]), jnp.float32)
    want = jax.eval_shape(functools.partial(tower.init, train=False), jax.random.PRNGKey(0), dummy)
    want = {"params": want["params"], "batch_stats": want.get("batch_stats", {})}
    if jax.tree.map(lambda a: (a.shape, a.dtype), want) != jax.tree.map(lambda a: (a.shape, a.dtype), owned):
        raise ValueError(f"the pretrained image-tower variables do not fit {type(tower).__name__} on "
                         f"{dummy.shape[1]}x{dummy.shape[2]} images (another architecture or image size?)")
    out_size = tuple(dummy.shape[1:3])
    maps = jax.eval_shape(lambda v, x: tower.apply(v, x, train=False, stages=True)[1], owned, dummy)
    levels = pyramid(tower, maps, out_size)
    sizes = [size for _, size in levels]
    # The 'rbg' generator: the init then compiles to one RngBitGenerator op per parameter instead of
    # unrolled threefry rounds, about 5x faster on CPU; the values are still a function of `seed`.
    decoder = jax.jit(lambda key, maps: seg.init(key, list(zip(maps, sizes)), out_size, method=SegmentationModel.decode))(
        jax.random.key(seed, impl="rbg"), [jnp.zeros(m.shape, m.dtype) for m, _ in levels])
    params = {"img": owned["params"], "decoder": decoder["params"]["decoder"]}
    stats = {"img": owned["batch_stats"]} if owned["batch_stats"] else {}
    trainable, frozen = (params, {}) if finetune_encoder else ({"decoder": params["decoder"]}, {"img": params["img"]})
    # No decay on biases and norm scales, as in pretraining.
    tx = optax.adamw(lr, weight_decay=weight_decay, mask=lambda p: jax.tree.map(lambda a: a.ndim > 1, p))
    opt_state = tx.init(trainable)

    def loss_fn(trainable, frozen, stats, images, masks):
        v = {"params": {**frozen, **trainable}, **({"batch_stats": stats} if stats else {})}
        if finetune_encoder:
            logits, updates = seg.apply(v, images, train=True, mutable=["batch_stats"])
            stats = updates.get("batch_stats", stats)
        else:
            logits = seg.apply(v, images, train=False)
        return segmentation_loss(logits, masks, dice_weight), stats

    @functools.partial(jax.jit, donate_argnums=(0, 2, 3))
    def step(trainable, frozen, stats, opt_state, images, masks):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, stats, images, masks)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), stats, opt_state, loss

    rng = np.random.default_rng(seed)
    window = max(1, steps // 10)  # logging interval
    losses = []
    for i in range(steps):
        idx = np.sort(rng.choice(len(masks), size=min(batch_size, len(masks)), replace=False))
        trainable, stats, opt_state, loss = step(trainable, frozen, stats, opt_state, jnp.asarray(images[idx]),
                                                 jnp.asarray(masks[idx], jnp.float32))
        losses.append(loss)
        if (i + 1) % window == 0:
            logging.info("segmentation step %d/%d: train loss %.4f", i + 1, steps, float(loss))
    trained = {"params": {**frozen, **trainable}, **({"batch_stats": stats} if stats else {})}
    return TrainedSegmentation(seg, trained, np.asarray(jax.device_get(losses), np.float64))


def evaluate_segmentation(trained: TrainedSegmentation, images, masks, class_names: Sequence[str] | None = None,
                          batch_size: int = 16) -> dict:
    """Dataset-level Dice / IoU of `trained` on images [N, H, W, 3] with masks [N, H, W, M] (module docstring)."""
    masks = _check_pair("test", images, masks)
    names = _class_names(class_names, masks.shape[-1])
    if masks.shape[-1] != trained.model.num_classes:
        raise ValueError(f"test_masks have {masks.shape[-1]} classes, the model was trained on {trained.model.num_classes}")

    @jax.jit
    def counts(variables, images, masks, valid):
        pred = trained.model.apply(variables, images, train=False) > 0  # probability > 0.5
        truth = masks > 0
        valid = valid[:, None, None, None]
        return jnp.stack([jnp.sum(pred & truth & valid, (0, 1, 2)), jnp.sum(pred & ~truth & valid, (0, 1, 2)),
                          jnp.sum(~pred & truth & valid, (0, 1, 2))])

    total = np.zeros((3, masks.shape[-1]), np.int64)
    for start in range(0, len(masks), batch_size):
        # The last batch is zero-padded to one compiled shape; `valid` drops its padding rows.
        rows = np.arange(start, start + batch_size)
        valid = rows < len(masks)
        rows = np.minimum(rows, len(masks) - 1)
        total += np.asarray(counts(trained.variables, jnp.asarray(images[rows], jnp.float32), jnp.asarray(masks[rows]),
                                   jnp.asarray(valid)), np.int64)
    return {**scores_from_counts(*total, names), "num_examples": len(masks)}


def segmentation_transfer(model, variables, train_images, train_masks, test_images, test_masks, *, steps: int = 300,
                          lr: float = 1e-3, batch_size: int = 16, finetune_encoder: bool = False,
                          weight_decay: float = 1e-4, dice_weight: float = 1.0,
                          features: Sequence[int] = DECODER_FEATURES, class_names: Sequence[str] | None = None,
                          seed: int = 0) -> dict:
    """Trains a U-Net decoder on the image tower of `model` (a TwoTower with its variables, or a bare image
    tower with its own) and scores it on the test set: per-class and mean Dice / IoU, the training loss
    at the start and end. `variables` are copied, never modified."""
    names = _class_names(class_names, np.shape(train_masks)[-1])
    trained = train_segmentation(model, variables, train_images, train_masks, steps=steps, lr=lr,
                                 batch_size=batch_size, finetune_encoder=finetune_encoder, weight_decay=weight_decay,
                                 dice_weight=dice_weight, features=features, seed=seed)
    window = max(1, steps // 10)
    return {**evaluate_segmentation(trained, test_images, test_masks, names, batch_size),
            "train_loss_first": float(trained.losses[:window].mean()),
            "train_loss_last": float(trained.losses[-window:].mean())}


# ---------------------------------------------------------------------------------------------- data

def _resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour [S, S, M] -> [size, size, M]. The synthetic images are square, which both
    preprocessing modes map onto the whole canvas, so the masks follow the image with a plain resize."""
    if masks.shape[:2] == (size, size):
        return masks
    return np.stack([np.asarray(Image.fromarray(masks[..., k]).resize((size, size), Image.NEAREST))
                     for k in range(masks.shape[-1])], -1)


def synthetic_segmentation_data(config_or_spec, split: str, size: int, image_size: int, *,
                                preprocess: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [size, image_size, image_size, 3] preprocessed as the model expects, masks uint8
    [size, image_size, image_size, len(MASK_CLASSES)], nearest-neighbour resized) of a held-out corpus.

    A config: the multi-label transfer's held-out corpus (`pipeline.multilabel_source`: seed
    `heldout.findings.seed` for 'train', the next for 'test', never a training seed, which `validate`
    checks), its first `size` examples, preprocessed with `data.preprocess`. A CorpusSpec: that corpus
    with seed `spec.seed` for 'train' and `spec.seed + 1` for 'test', preprocessed with `preprocess`
    ('flair' unless given). Only colour photographs carry masks, so the corpus is drawn CFP-only.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if isinstance(config_or_spec, CorpusSpec):
        spec = dataclasses.replace(config_or_spec, seed=config_or_spec.seed + (split == "test"))
        preprocess = preprocess or "flair"
    else:
        spec = pipeline.multilabel_source(config_or_spec, split).spec
        preprocess = preprocess or config_or_spec.data.preprocess
    source = SyntheticFundus(dataclasses.replace(spec, size=size, modalities=("CFP",), modality_weights=None))
    images = np.zeros((size, image_size, image_size, 3), np.float32)
    masks = np.zeros((size, image_size, image_size, len(MASK_CLASSES)), np.uint8)
    for i in range(size):
        example = source.item_with_masks(i)
        images[i] = transforms.preprocess(example["image"], image_size, preprocess)
        masks[i] = _resize_masks(example["masks"], image_size)
    return images, masks
