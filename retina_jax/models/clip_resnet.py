"""CLIP ModifiedResNet: ViLReF's RN50 image tower (docs/methods.md, "ViLReF" and
"Checkpoint interoperability").

ViLReF builds on Chinese-CLIP, whose `ModifiedResNet` is OpenAI CLIP's. It differs from
torchvision's ResNet (`resnet.py`) in three ways:
- a 3-conv stem (3x3 stride 2 -> 3x3 -> 3x3, each with BN + ReLU) then AvgPool2d(2), no max pool;
- anti-aliased downsampling: every conv has stride 1; a stride-s block average-pools by s after
  its 3x3 conv, and its shortcut average-pools by s before its 1x1 conv;
- an attention-pool head: the mean of the final map is prepended as a token, learned positions
  are added, and one multi-head attention query (the mean token) over all tokens, followed by
  `c_proj`, gives the `output_dim` feature (1024 for RN50, which is Chinese-CLIP's embed dim: the
  RN50 tower has no separate `proj`).

Param tree (flax) <- checkpoint key (Chinese-CLIP `visual.*`, prefix stripped), see
`convert.modified_resnet_from_clip_state_dict`:

    conv{1,2,3}/kernel                     conv{1,2,3}.weight                  (OIHW -> HWIO)
    bn{1,2,3}/{scale,bias}                 bn{1,2,3}.{weight,bias}
    batch_stats: bn1/{mean,var}            bn1.{running_mean,running_var}
    layer1_0/{conv1,conv2,conv3}/kernel    layer1.0.{conv1,conv2,conv3}.weight
    layer1_0/{bn1,bn2,bn3}                 layer1.0.{bn1,bn2,bn3}.*
    layer1_0/downsample_0/kernel           layer1.0.downsample.0.weight        (1x1 conv)
    layer1_0/downsample_1                  layer1.0.downsample.1.*             (BN)
    (no params)                            layer1.0.downsample.-1              (AvgPool2d)
    attnpool/positional_embedding          attnpool.positional_embedding       [(S/32)^2 + 1, C]
    attnpool/{q,k,v,c}_proj/{kernel,bias}  attnpool.{q,k,v,c}_proj.{weight,bias}

BatchNorm statistics live in `batch_stats` (train=True with mutable=['batch_stats'] updates them;
eps 1e-5, flax momentum 0.9 == torch 0.1). Params are float32; `dtype` is the compute dtype.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from retina_jax.models import maybe_remat
from retina_jax.models.resnet import _Blocks
from retina_jax.models.vit import attend


def _bn(train: bool, dtype: Any, name: str, zero_scale: bool = False) -> nn.BatchNorm:
    # CLIP zero-initialises every block's bn3 scale so residual branches start as identities.
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        scale_init=scale_init, name=name)


def _avg_pool(x, k: int):
    # torch AvgPool2d(k): kernel = stride = k, no padding, floor mode (an odd last row is dropped).
    return x if k == 1 else nn.avg_pool(x, (k, k), strides=(k, k), padding="VALID")


class Bottleneck(nn.Module):
    """CLIP Bottleneck: 1x1 -> 3x3 -> avgpool(stride) -> 1x1, expansion 4, all convs stride 1."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(_Blocks.conv, stride=1, dtype=self.dtype)
        bn = functools.partial(_bn, train, self.dtype)
        out_features = self.features * self.expansion
        y = nn.relu(bn(name="bn1")(conv(self.features, 1, name="conv1")(x)))
        y = nn.relu(bn(name="bn2")(conv(self.features, 3, name="conv2")(y)))
        y = _avg_pool(y, self.stride)  # [B, H/s, W/s, features]
        y = bn(name="bn3", zero_scale=True)(conv(out_features, 1, name="conv3")(y))
        if self.stride > 1 or x.shape[-1] != out_features:
            x = _avg_pool(x, self.stride)  # torch `downsample.-1` (no params)
            x = bn(name="downsample_1")(conv(out_features, 1, name="downsample_0")(x))
        return nn.relu(y + x)  # [B, H/s, W/s, 4 * features]


class AttentionPool2d(nn.Module):
    """CLIP AttentionPool2d: [B, H, W, C] -> [B, output_dim], mean token as the only query."""

    spacial_dim: int
    num_heads: int
    output_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)  # [B, HW, C]
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)  # [B, 1 + HW, C]
        # CLIP init: positions randn / sqrt(C); all four projection weights normal(C ** -0.5).
        pos = self.param("positional_embedding", nn.initializers.normal(c ** -0.5),
                         (self.spacial_dim ** 2 + 1, c))
        x = x + pos.astype(x.dtype)

        def dense(features, name):
            return nn.Dense(features, dtype=self.dtype, name=name,
                            kernel_init=nn.initializers.normal(c ** -0.5))

        # torch attends with every token as a query but returns only x[0]: the mean token's row.
        q = dense(c, "q_proj")(x[:, :1])  # [B, 1, C]
        k, v = dense(c, "k_proj")(x), dense(c, "v_proj")(x)  # [B, 1 + HW, C] each
        return dense(self.output_dim, "c_proj")(attend(q, k, v, self.num_heads))[:, 0]  # [B, out]


class ModifiedResNet(nn.Module):
    """CLIP ModifiedResNet: images [B, H, W, 3] -> attention-pooled features [B, output_dim].

    `image_size` fixes the attention pool's learned positions ((image_size // 32)^2 + 1).
    Convs use torchvision's init (CLIP keeps torch defaults; only matters from scratch); CLIP's own
    init is kept for the attention pool and the zero bn3 scales.
    """

    layers: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    heads: int = 32
    output_dim: int = 1024
    image_size: int = 224
    dtype: Any = jnp.float32
    remat: bool = False  # rematerialise each block (models.maybe_remat)

    @property
    def grid(self) -> int:
        return self.image_size // 32

    @property
    def features_dim(self) -> int:
        return self.output_dim

    @nn.compact
    def __call__(self, x, train: bool = False, return_tokens: bool = False, stages: bool = False):
        """Returns the pooled feature [B, output_dim] in float32, and with `return_tokens` also
        the layer4 map flattened row-major ([B, HW, 32 * width], compute dtype); with `stages`,
        also the multi-scale maps, finest first: the stem's (stride 2, before its average pool)
        and each stage's output (strides 4 to 32), compute dtype (models/unet_decoder.py)."""
        if return_tokens and stages:
            raise ValueError("ModifiedResNet: ask for either tokens or stage maps, not both")
        if len(self.layers) != 4:
            raise ValueError(f"ModifiedResNet has 4 stages (CLIP's stride-32 layout), got "
                             f"layers={self.layers}")
        conv = functools.partial(_Blocks.conv, dtype=self.dtype)
        bn = functools.partial(_bn, train, self.dtype)
        x = x.astype(self.dtype)  # [B, H, W, 3]
        x = nn.relu(bn(name="bn1")(conv(self.width // 2, 3, 2, name="conv1")(x)))  # [B, H/2, ..]
        x = nn.relu(bn(name="bn2")(conv(self.width // 2, 3, 1, name="conv2")(x)))
        x = nn.relu(bn(name="bn3")(conv(self.width, 3, 1, name="conv3")(x)))
        maps = [x]
        x = _avg_pool(x, 2)  # [B, H/4, W/4, width]
        block_cls = maybe_remat(Bottleneck, self.remat, static_argnums=(2,))
        for i, num_blocks in enumerate(self.layers):
            for j in range(num_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                x = block_cls(self.width * 2 ** i, stride, self.dtype, name=f"layer{i + 1}_{j}")(
                    x, train)
            maps.append(x)
        b, h, w, c = x.shape  # [B, H/32, W/32, 32 * width]
        if (h, w) != (self.grid, self.grid):
            raise ValueError(
                f"ModifiedResNet(image_size={self.image_size}) has attention-pool positions for a "
                f"{self.grid}x{self.grid} map but the input gives {h}x{w}. Build the model for the "
                f"input size and convert the checkpoint with position resampling "
                f"(convert.modified_resnet_from_clip_state_dict(..., resample_positions=True)).")
        pooled = AttentionPool2d(self.grid, self.heads, self.output_dim, self.dtype,
                                 name="attnpool")(x).astype(jnp.float32)  # [B, output_dim]
        if stages:
            return pooled, tuple(maps)
        return (pooled, x.reshape(b, h * w, c)) if return_tokens else pooled


def clip_rn50(**kw) -> ModifiedResNet:
    """Chinese-CLIP / ViLReF RN50 at 224: 32 heads (2048 / head width 64), output 1024."""
    return ModifiedResNet(**{"layers": (3, 4, 6, 3), "width": 64, "heads": 32,
                             "output_dim": 1024, "image_size": 224, **kw})


def clip_resnet_tiny(**kw) -> ModifiedResNet:
    """One block per stage, width 16 (512-d map, 2x2 at 64 px), 4 heads, 64-d output: CPU tests."""
    return ModifiedResNet(**{"layers": (1, 1, 1, 1), "width": 16, "heads": 4, "output_dim": 64,
                             "image_size": 64, **kw})
