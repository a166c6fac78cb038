"""torchvision-layout ResNet: FLAIR's (and KeepFIT's) image tower, docs/methods.md, "FLAIR".

FLAIR uses torchvision's ResNet-50 (bottleneck v1.5: the stride sits on the 3x3 conv, not the
first 1x1), global average pooled to 2048-d features, with the classifier head (`fc`) removed.
This module reproduces that layout exactly so torchvision / FLAIR checkpoints convert
mechanically (see `convert.resnet_from_torchvision_state_dict`):

    torchvision key                         flax variable
    conv1.weight                            params/conv1/kernel           (OIHW -> HWIO)
    bn1.{weight,bias}                       params/bn1/{scale,bias}
    bn1.{running_mean,running_var}          batch_stats/bn1/{mean,var}
    layer1.0.conv1.weight                   params/layer1_0/conv1/kernel
    layer1.0.downsample.0.weight            params/layer1_0/downsample_0/kernel
    layer1.0.downsample.1.running_mean      batch_stats/layer1_0/downsample_1/mean

BatchNorm statistics live in the `batch_stats` collection: call with `train=True` and
`mutable=['batch_stats']` to update them, `train=False` to use the running averages.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from retina_jax.models import maybe_remat

# torchvision block counts per depth, and whether the depth uses bottleneck blocks.
_STAGE_SIZES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
_BOTTLENECK_DEPTHS = (50, 101, 152)

# torchvision: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"), an UNtruncated
# normal with std sqrt(2 / fan_out). In jax's variance_scaling 'normal' is the untruncated one
# ('truncated_normal' is the truncated one).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    # Explicit symmetric torch padding (k // 2 on each side), not 'SAME': with stride 2 and even
    # input sizes 'SAME' pads asymmetrically (0 before, 1 after) and shifts every feature map.
    p = k // 2
    return ((p, p), (p, p))


class _Blocks:
    """Shared constructors so every block names its layers exactly like torchvision."""

    @staticmethod
    def conv(features: int, k: int, stride: int, dtype: Any, name: str) -> nn.Conv:
        return nn.Conv(features, (k, k), strides=(stride, stride), padding=_pad(k), use_bias=False,
                       kernel_init=conv_init, dtype=dtype, name=name)

    @staticmethod
    def bn(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
        # flax momentum 0.9 == torch momentum 0.1; torch eps 1e-5. Scale 1 / bias 0 init (torch).
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                            name=name)


class BasicBlock(nn.Module):
    """torchvision BasicBlock (ResNet-18/34): 3x3 -> 3x3, expansion 1."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(_Blocks.conv, dtype=self.dtype)
        bn = functools.partial(_Blocks.bn, train, self.dtype)
        out_features = self.features * self.expansion
        y = conv(self.features, 3, self.stride, name="conv1")(x)
        y = nn.relu(bn(name="bn1")(y))
        y = conv(self.features, 3, 1, name="conv2")(y)
        y = bn(name="bn2")(y)
        if self.stride != 1 or x.shape[-1] != out_features:
            x = conv(out_features, 1, self.stride, name="downsample_0")(x)
            x = bn(name="downsample_1")(x)
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """torchvision Bottleneck v1.5 (ResNet-50/101/152): 1x1 -> 3x3 (strided) -> 1x1, expansion 4.

    The inner width is `features * width_per_group / 64` (torchvision's `base_width`): 64 for the
    plain ResNets, 128 for `wide_resnet50_2` / `wide_resnet101_2`."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    width_per_group: int = 64
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(_Blocks.conv, dtype=self.dtype)
        bn = functools.partial(_Blocks.bn, train, self.dtype)
        out_features = self.features * self.expansion
        inner = int(self.features * self.width_per_group / 64)
        y = conv(inner, 1, 1, name="conv1")(x)
        y = nn.relu(bn(name="bn1")(y))
        # v1.5: the stride is on the 3x3 conv (torchvision), not on conv1 (original v1 / Caffe).
        y = conv(inner, 3, self.stride, name="conv2")(y)
        y = nn.relu(bn(name="bn2")(y))
        y = conv(out_features, 1, 1, name="conv3")(y)
        y = bn(name="bn3")(y)
        if self.stride != 1 or x.shape[-1] != out_features:
            x = conv(out_features, 1, self.stride, name="downsample_0")(x)
            x = bn(name="downsample_1")(x)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """torchvision ResNet trunk without `fc`: images [B, H, W, 3] -> pooled features [B, F].

    `stage_sizes` overrides the depth's block counts (e.g. (1, 1, 1, 1) for a tiny CPU variant);
    `bottleneck=None` derives the block type from `depth`. Params are float32; `dtype` is the
    compute dtype. The pooled features are returned in float32 (they feed the projection head).
    """

    depth: int = 50
    width: int = 64  # the stem's width; stage i's blocks output width * 2**i * expansion
    width_per_group: int = 64  # bottleneck inner width per 64 stage channels (128: wide ResNets)
    stage_sizes: tuple[int, ...] | None = None
    bottleneck: bool | None = None
    dtype: Any = jnp.float32
    remat: bool = False  # rematerialise each block (models.maybe_remat)

    def __post_init__(self):
        super().__post_init__()
        if self.width_per_group != 64 and not self._is_bottleneck():
            raise ValueError(f"ResNet width_per_group={self.width_per_group}: torchvision's basic blocks "
                             "(ResNet-18/34) support only 64")

    def _stage_sizes(self) -> tuple[int, ...]:
        if self.stage_sizes is not None:
            return tuple(self.stage_sizes)
        if self.depth not in _STAGE_SIZES:
            raise ValueError(f"ResNet depth {self.depth} not in {sorted(_STAGE_SIZES)}; "
                             "pass stage_sizes explicitly")
        return _STAGE_SIZES[self.depth]

    def _is_bottleneck(self) -> bool:
        return self.depth in _BOTTLENECK_DEPTHS if self.bottleneck is None else self.bottleneck

    @property
    def features_dim(self) -> int:
        """Width of the pooled features (2048 for ResNet-50, 512 for ResNet-18/34)."""
        expansion = Bottleneck.expansion if self._is_bottleneck() else BasicBlock.expansion
        return self.width * 2 ** (len(self._stage_sizes()) - 1) * expansion

    @nn.compact
    def __call__(self, x, train: bool, spatial: bool = False, stages: bool = False):
        """Pooled features [B, F]; with `spatial`, also the last stage's map as tokens [B, h*w, F]
        (KeepFIT V2's caption decoder cross-attends to them); with `stages`, also the multi-scale
        maps, finest first: the stem's (stride 2, before the max pool) and each stage's output
        (strides 4, 8, ...), compute dtype; the skip connections of models/unet_decoder.py."""
        if spatial and stages:
            raise ValueError("ResNet: ask for either spatial tokens or stage maps, not both")
        block_cls = maybe_remat(Bottleneck if self._is_bottleneck() else BasicBlock, self.remat, static_argnums=(2,))
        x = x.astype(self.dtype)  # [B, H, W, 3]
        x = _Blocks.conv(self.width, 7, 2, self.dtype, "conv1")(x)  # [B, H/2, W/2, width]
        x = nn.relu(_Blocks.bn(train, self.dtype, "bn1")(x))
        maps = [x]
        # torch MaxPool2d(3, 2, padding=1) pads with -inf; reduce_window pads with its -inf init.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))  # [B, H/4, W/4, width]
        for i, num_blocks in enumerate(self._stage_sizes()):
            for j in range(num_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                extra = {"width_per_group": self.width_per_group} if self._is_bottleneck() else {}
                x = block_cls(self.width * 2 ** i, stride, self.dtype, name=f"layer{i + 1}_{j}", **extra)(x, train)
            maps.append(x)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, F] global average pool
        if spatial:
            return pooled, x.reshape(x.shape[0], -1, x.shape[-1])
        if stages:
            return pooled, tuple(maps)
        return pooled


def resnet50(**kw) -> ResNet:
    return ResNet(depth=50, **kw)


def resnet18(**kw) -> ResNet:
    return ResNet(depth=18, **kw)


def resnet_tiny(**kw) -> ResNet:
    """Bottleneck ResNet with one block per stage and width 16 (512-d features): CPU tests/demos."""
    kw = {"depth": 50, "width": 16, "stage_sizes": (1, 1, 1, 1), "bottleneck": True, **kw}
    return ResNet(**kw)
