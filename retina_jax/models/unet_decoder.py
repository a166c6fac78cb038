"""U-Net-style segmentation decoder on a pretrained image tower (ViLReF's evaluation,
docs/methods.md, "ViLReF": segmentation transfer (lesion/vessel masks) with a decoder on the image tower, Dice/IoU).

`SegmentationModel(img=tower, num_classes=M)` runs the image tower for its multi-scale maps and a U-Net
decoder over them, and returns per-pixel logits [B, H, W, M] at the input size: one sigmoid per class,
since classes overlap (a haemorrhage on a vessel, the cup inside the disc). The pyramid the decoder
starts from (the towers' `stages=True` outputs):
- `resnet` / `clip_resnet`: every stage's output (strides 32, 16, 8, 4) and the stem's map (stride 2),
  as in segmentation_models_pytorch's U-Net on a ResNet encoder;
- `vit`: a plain ViT has one scale, so as in UNETR (Hatamizadeh et al., 2022) the patch-token grids of
  evenly spaced blocks are the skips: the last block's at the patch stride, earlier blocks' merged at
  2, 4, ... times finer sizes (at most log2(patch) levels: blocks 12, 9, 6, 3 of ViT-B/16).
Each decoder block upsamples (bilinear) to the next level's size, concatenates that level's map after a
1x1 lateral conv to the block's width, and applies two 3x3 conv + GroupNorm + ReLU; past the finest
skip, blocks double the size until the input size; a 1x1 conv gives the logits (float32). GroupNorm,
not BatchNorm: the decoder keeps no running statistics, and the tower's BatchNorm statistics stay its own.

Param tree: `img` (the tower's own tree, so its pretrained variables drop in) and `decoder`.
`freeze_encoder` (default True) runs the tower in inference mode (BatchNorm running averages) under
stop_gradient; False runs it in `train` mode, to be fine-tuned with the decoder.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from retina_jax.models.clip_resnet import ModifiedResNet
from retina_jax.models.resnet import ResNet, conv_init
from retina_jax.models.vit import VisionTransformer

# Decoder block widths, coarsest block first (segmentation_models_pytorch's U-Net default); a pyramid
# that needs fewer blocks (a ViT's) uses the last, finest ones.
DECODER_FEATURES = (256, 128, 64, 32, 16)
# Most pixels of every class are background: the head starts at this foreground probability instead of
# 0.5, so the first steps are not spent pushing every pixel down (RetinaNet's prior initialisation).
_PRIOR = 0.01


def _resize(x, size: tuple[int, int]):
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "bilinear")


class ConvBlock(nn.Module):
    """Two 3x3 conv + GroupNorm + ReLU."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for k in (1, 2):
            x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=conv_init,
                        dtype=self.dtype, name=f"conv{k}")(x)
            x = nn.relu(nn.GroupNorm(num_groups=math.gcd(8, self.features), dtype=self.dtype, name=f"norm{k}")(x))
        return x


class UNetDecoder(nn.Module):
    """levels [(map [B, h, w, C], merge size (h', w'))], deepest first -> logits [B, H, W, num_classes].

    The deepest map starts the decoder; every other level is a skip merged at its size (a ResNet stage
    at its own size, a ViT block's grid at a finer one)."""

    num_classes: int
    features: tuple[int, ...] = DECODER_FEATURES
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, levels, out_size: tuple[int, int]):
        x, skips = levels[0][0], levels[1:]
        sizes = [tuple(size) for _, size in skips]
        h, w = sizes[-1] if sizes else x.shape[1:3]
        height, width = out_size
        while (h, w) != (height, width):
            h, w = min(2 * h, height), min(2 * w, width)
            sizes.append((h, w))
        if len(sizes) > len(self.features):
            raise ValueError(f"UNetDecoder: this tower and input size need {len(sizes)} decoder blocks (sizes "
                             f"{sizes}), so at least {len(sizes)} widths; got features={self.features}")
        widths = self.features[len(self.features) - len(sizes):]
        for b, (size, features) in enumerate(zip(sizes, widths)):
            x = _resize(x, size)
            if b < len(skips):
                lateral = nn.Conv(features, (1, 1), kernel_init=conv_init, dtype=self.dtype, name=f"lateral{b}")
                x = jnp.concatenate([x, _resize(lateral(skips[b][0]), size).astype(x.dtype)], axis=-1)
            x = ConvBlock(features, self.dtype, name=f"block{b}")(x)
        head = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="head",
                       bias_init=nn.initializers.constant(math.log(_PRIOR / (1 - _PRIOR))))
        return head(x).astype(jnp.float32)  # [B, H, W, num_classes]


def pyramid(tower: nn.Module, stage_maps, out_size: tuple[int, int]) -> list:
    """The decoder's levels [(map, merge size)], deepest first, from the tower's `stages=True` maps
    (arrays, or anything with a .shape: the decoder's init only needs shapes)."""
    if isinstance(tower, VisionTransformer):
        # UNETR: the grids of n evenly spaced blocks, the last at the patch stride, each earlier one 2x finer.
        n = max(1, min(len(stage_maps), int(math.log2(tower.patch_size))))
        g_h, g_w = stage_maps[-1].shape[1:3]
        picks = [len(stage_maps) - 1 - (k * len(stage_maps)) // n for k in range(n)]
        return [(stage_maps[i], (min(g_h * 2 ** k, out_size[0]), min(g_w * 2 ** k, out_size[1])))
                for k, i in enumerate(picks)]
    if isinstance(tower, (ResNet, ModifiedResNet)):
        return [(m, tuple(m.shape[1:3])) for m in reversed(stage_maps)]
    raise TypeError(f"no multi-scale features for a {type(tower).__name__} tower (ResNet, ModifiedResNet or "
                    f"VisionTransformer)")


class SegmentationModel(nn.Module):
    """Image tower + U-Net decoder: images [B, H, W, 3] -> per-class logits [B, H, W, num_classes].

    `encode` and `decode` are the two halves of `__call__`; `init(..., method=SegmentationModel.decode)`
    creates the decoder's params alone (the tower's come pretrained)."""

    img: nn.Module  # ResNet | ModifiedResNet | VisionTransformer
    num_classes: int
    features: tuple[int, ...] = DECODER_FEATURES
    freeze_encoder: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        self.decoder = UNetDecoder(self.num_classes, tuple(self.features), self.dtype)

    def encode(self, images, train: bool = False) -> list:
        _, maps = self.img(images, train=train and not self.freeze_encoder, stages=True)
        levels = pyramid(self.img, maps, images.shape[1:3])
        if self.freeze_encoder:
            levels = [(jax.lax.stop_gradient(m), size) for m, size in levels]
        return levels

    def decode(self, levels, out_size: tuple[int, int]):
        return self.decoder(levels, out_size)

    def __call__(self, images, train: bool = False):
        return self.decode(self.encode(images, train), images.shape[1:3])
