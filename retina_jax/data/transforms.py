"""Image preprocessing (FLAIR and CLIP/ViLReF; docs/methods.md, "FLAIR" and "ViLReF") and FLAIR's augmentation.

`config.data.preprocess` picks the input convention a checkpoint was trained with:
- 'flair': FLAIR feeds RGB in [0, 1] with no mean/std normalisation: the long side is resized to the target
size keeping the aspect ratio, then zero-padded at the bottom/right to a square. Public images are
augmented with a horizontal flip (p 0.5), a small affine (p 0.25: rotation +-5 degrees, scale
0.9-1) and colour jitter (p 0.25: brightness and contrast 0.2). FLAIR applies these on the GPU
with kornia per batch; here they run per example in the grain workers, drawn from the example's
own generator so a pipeline position always reproduces the same augmentation.
- 'clip': resize to a square (bicubic, as Chinese-CLIP's `Resize((S, S), BICUBIC)`), then CLIP's
  mean/std normalisation; augmentation runs before the normalisation, in [0, 1].

`config.data.augment.kind` picks the augmentation recipe: 'flair' (above) or 'vilref' (docs/methods.md, "ViLReF"):
torchvision's RandomResizedCrop(S, scale 0.9-1, ratio 3/4-4/3) on the source image, a horizontal
flip and colour jitter 0.1 (brightness, contrast and saturation factors in [0.9, 1.1]).
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def resize_long_side_and_pad(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [size, size, 3] in [0, 1]: long side to `size`, zero-pad bottom/right."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    out = np.zeros((size, size, 3), np.float32)
    out[:new_h, :new_w] = image.astype(np.float32) / 255.0
    return out


PREPROCESS_MODES = ("flair", "clip")
# OpenAI CLIP's (and Chinese-CLIP's / ViLReF's) normalisation constants.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [size, size, 3] in [0, 1], bicubic, aspect ratio not kept (CLIP)."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    return image.astype(np.float32) / 255.0


def to_canvas(image: np.ndarray, size: int, mode: str) -> np.ndarray:
    """The geometric part of `preprocess`: uint8 [H, W, 3] -> float32 [size, size, 3] in [0, 1]."""
    if mode == "flair":
        return resize_long_side_and_pad(image, size)
    if mode == "clip":
        return resize_square(image, size)
    raise ValueError(f"unknown preprocess mode {mode!r}; allowed: {PREPROCESS_MODES}")


def normalize(image: np.ndarray, mode: str) -> np.ndarray:
    """The intensity part of `preprocess`, applied after augmentation: none (FLAIR) or CLIP mean/std."""
    if mode == "clip":
        # `(image - mean) / std`, element for element, over rows of W*3 values against the constants
        # tiled to a row: broadcasting a 3-vector runs NumPy's inner loop 3 values at a time, which
        # made this 4x slower (7 ms a batch of the ViLReF demo's pipeline; benchmarks/RESULTS.md).
        width = image.shape[-2]
        out = np.subtract(image.reshape(-1, width * 3), np.tile(CLIP_MEAN, width), dtype=np.float32)
        return np.divide(out, np.tile(CLIP_STD, width), out=out).reshape(image.shape)
    return image


def preprocess(image: np.ndarray, size: int, mode: str) -> np.ndarray:
    """uint8 [H, W, 3] -> the float32 [size, size, 3] model input of `mode` (evaluation, predict)."""
    return normalize(to_canvas(image, size, mode), mode)


AUGMENT_KINDS = ("flair", "vilref")


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop.get_params: (top, left, h, w) covering `scale` of the area with
    an aspect ratio log-uniform in `ratio`; 10 tries, then a centre crop clamped to `ratio`."""
    area = height * width
    log_ratio = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = np.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_source(image: np.ndarray, rng: np.random.Generator, cfg) -> np.ndarray:
    """The augmentation applied to the source uint8 image before resizing: ViLReF's random resized
    crop (the resize to the canvas follows); FLAIR's recipe has none."""
    if cfg.kind != "vilref":
        return image
    top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng, cfg.crop_scale)
    return image[top:top + h, left:left + w]


def augment(image: np.ndarray, rng: np.random.Generator, cfg) -> np.ndarray:
    """Flip, affine and colour jitter on a float32 [S, S, 3] image in [0, 1]; `cfg` is `config.data.augment`."""
    if rng.random() < cfg.hflip_p:
        image = image[:, ::-1]
    if rng.random() < cfg.affine_p:
        angle = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)
        scale = rng.uniform(cfg.scale_min, cfg.scale_max)
        image = _rotate_scale(image, angle, scale)
    if rng.random() < cfg.jitter_p:
        brightness = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
        contrast = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
        image = image * brightness  # a new array: the in-place steps below never touch the caller's
        # Contrast around the image mean, as torchvision/kornia adjust_contrast (grey-level mean).
        mean = image.mean()
        image -= mean
        image *= contrast
        image += mean
        if cfg.saturation > 0:
            # torchvision adjust_saturation: blend with the ITU-R 601 grey image.
            saturation = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
            # Repeated to [S, S, 3]: a [S, S, 1] operand runs NumPy's inner loop 3 values at a time.
            grey = np.repeat((image @ np.array([0.299, 0.587, 0.114], np.float32))[..., None], 3, axis=-1)
            image -= grey
            image *= saturation
            image += grey
        return np.clip(image, 0.0, 1.0, out=image)
    return np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)


def _rotate_scale(image: np.ndarray, angle_deg: float, scale: float) -> np.ndarray:
    """Rotate by `angle_deg` and scale by `scale` about the centre, zero fill outside."""
    size = image.shape[0]
    theta = np.deg2rad(angle_deg)
    cos, sin = np.cos(theta) / scale, np.sin(theta) / scale
    c = (size - 1) / 2.0
    # PIL's AFFINE maps output (x, y) to input (a x + b y + c0, d x + e y + f0).
    coeffs = (cos, sin, c - cos * c - sin * c, -sin, cos, c + sin * c - cos * c)
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[..., k], dtype=np.float32)).transform(
            (size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=0.0))
        for k in range(3)
    ]
    return np.stack(channels, axis=-1)
