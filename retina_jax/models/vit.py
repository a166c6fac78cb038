"""CLIP-layout Vision Transformer: ViLReF's ViT-B/16 image tower (docs/methods.md, "ViLReF"
and "Checkpoint interoperability").

ViLReF builds on Chinese-CLIP, whose `VisualTransformer` is OpenAI CLIP's: conv patchify without
bias, a learned class token and learned positions, `ln_pre`, pre-LN residual blocks (torch
`nn.MultiheadAttention` with packed q/k/v and biases; MLP `c_fc` -> QuickGELU -> `c_proj`),
`ln_post` on the class token, LayerNorm eps 1e-5, no dropout. The final `proj` matrix is NOT part
of this module: the two-tower model owns it as `img_proj`, so `__call__` returns the
pre-projection feature (the linear-probe input, 768-d for ViT-B/16).

Param tree (flax) <- checkpoint key (Chinese-CLIP `visual.*`, prefix stripped), see
`convert.vit_from_clip_state_dict`:

    conv1/kernel                          conv1.weight                        (OIHW -> HWIO)
    class_embedding                       class_embedding
    positional_embedding                  positional_embedding                [g*g + 1, width]
    ln_pre/{scale,bias}                   ln_pre.{weight,bias}
    resblocks_{i}/ln_1/{scale,bias}       transformer.resblocks.{i}.ln_1.{weight,bias}
    resblocks_{i}/attn/query/kernel       transformer.resblocks.{i}.attn.in_proj_weight[:w].T
    resblocks_{i}/attn/key/kernel         ... in_proj_weight[w:2w].T   (value: [2w:], biases alike
    resblocks_{i}/attn/value/kernel                                     from attn.in_proj_bias)
    resblocks_{i}/attn/out/{kernel,bias}  transformer.resblocks.{i}.attn.out_proj.{weight,bias}
    resblocks_{i}/ln_2/{scale,bias}       transformer.resblocks.{i}.ln_2.{weight,bias}
    resblocks_{i}/mlp/c_fc/{kernel,bias}  transformer.resblocks.{i}.mlp.c_fc.{weight,bias}
    resblocks_{i}/mlp/c_proj/{kernel,bias} transformer.resblocks.{i}.mlp.c_proj.{weight,bias}
    ln_post/{scale,bias}                  ln_post.{weight,bias}
    (not here: the two tower's img_proj)  proj                                [width, D]

The learned positions are for `image_size`: running on another grid raises instead of silently
interpolating; convert the checkpoint with `resample_positional_embedding` instead (the importer
does it). Params are float32; `dtype` is the compute dtype.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retina_jax.models import maybe_remat

# torch's default Conv2d init (kaiming_uniform, a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def quick_gelu(x):
    # CLIP's QuickGELU, not erf/tanh GELU: the checkpoints were trained with it.
    return x * jax.nn.sigmoid(1.702 * x)


def attend(q, k, v, num_heads: int):
    """Multi-head scaled dot-product attention on projected inputs (torch MHA semantics).

    q: [B, Lq, C], k and v: [B, Lk, C] -> [B, Lq, C]. Heads split C into `num_heads` contiguous
    chunks, as torch's `multi_head_attention_forward` does. Softmax in float32 so a bf16 model's
    logits keep their precision.
    """
    b, lq, c = q.shape
    if c % num_heads:
        raise ValueError(f"attention width {c} is not divisible by num_heads={num_heads}")
    head_dim = c // num_heads
    q = q.reshape(b, lq, num_heads, head_dim)  # [B, Lq, H, Dh]
    k = k.reshape(b, -1, num_heads, head_dim)  # [B, Lk, H, Dh]
    v = v.reshape(b, -1, num_heads, head_dim)  # [B, Lk, H, Dh]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)  # [B, H, Lq, Lk]
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, lq, c)  # [B, Lq, C]


class MultiheadAttention(nn.Module):
    """torch `nn.MultiheadAttention` self-attention, with the packed in-projection kept as three
    Dense layers (`query`, `key`, `value`, each with bias) and the output projection `out`."""

    num_heads: int
    in_std: float
    out_std: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # x: [B, L, C]
        c = x.shape[-1]

        def dense(std, name):
            return nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.normal(std), name=name)

        q, k, v = (dense(self.in_std, n)(x) for n in ("query", "key", "value"))  # [B, L, C] each
        return dense(self.out_std, "out")(attend(q, k, v, self.num_heads))  # [B, L, C]


class Mlp(nn.Module):
    """CLIP block MLP: c_fc -> QuickGELU -> c_proj."""

    hidden: int
    fc_std: float
    proj_std: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # x: [B, L, C]
        y = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=nn.initializers.normal(self.fc_std),
                     name="c_fc")(x)  # [B, L, hidden]
        return nn.Dense(x.shape[-1], dtype=self.dtype,
                        kernel_init=nn.initializers.normal(self.proj_std), name="c_proj")(
            quick_gelu(y))  # [B, L, C]


def layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    # CLIP's LayerNorm subclass normalises in float32 and casts back; flax LayerNorm reduces in
    # float32 (force_float32_reductions) and returns the compute dtype, which is the same thing.
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, name=name)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    heads: int
    mlp_dim: int
    attn_std: float
    proj_std: float
    fc_std: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # x: [B, L, C]
        x = x + MultiheadAttention(self.heads, self.attn_std, self.proj_std, self.dtype,
                                   name="attn")(layer_norm(self.dtype, "ln_1")(x))
        return x + Mlp(self.mlp_dim, self.fc_std, self.proj_std, self.dtype, name="mlp")(
            layer_norm(self.dtype, "ln_2")(x))


class VisionTransformer(nn.Module):
    """CLIP `VisualTransformer` without `proj`: images [B, H, W, 3] -> class feature [B, width].

    `image_size` fixes the learned position grid (`image_size // patch_size` per side).
    Initialisation follows OpenAI CLIP's `initialize_parameters` (Chinese-CLIP keeps torch defaults
    for its ViT; init only matters when training from scratch).
    """

    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int | None = None
    image_size: int = 224
    dtype: Any = jnp.float32
    remat: bool = False  # rematerialise each block (models.maybe_remat)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def features_dim(self) -> int:
        return self.width

    @nn.compact
    def __call__(self, x, train: bool = False, return_tokens: bool = False, stages: bool = False):
        """Returns the pooled feature [B, width] in float32, and with `return_tokens` also the
        final-block tokens before `ln_post` ([B, 1 + N, width], class token first, compute dtype);
        with `stages`, also every block's patch tokens as a grid ([B, g, g, width] per block, first
        block first, class token dropped, compute dtype): the skip connections of
        models/unet_decoder.py. `train` is accepted for the tower interface: CLIP's ViT has no
        dropout or batch norm."""
        del train
        if return_tokens and stages:
            raise ValueError("VisionTransformer: ask for either tokens or stage grids, not both")
        b, h, w, _ = x.shape
        p, g = self.patch_size, self.grid
        if (h // p, w // p) != (g, g):
            raise ValueError(
                f"VisionTransformer(image_size={self.image_size}, patch_size={p}) has learned "
                f"positions for a {g}x{g} grid but the input {h}x{w} gives {h // p}x{w // p}. "
                f"Build the model for the input size and convert the checkpoint with position "
                f"resampling (convert.vit_from_clip_state_dict(..., resample_positions=True)).")
        scale = self.width ** -0.5
        # torch Conv2d(stride=patch) drops a remainder row/column, as 'VALID' does.
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                    kernel_init=torch_default_init, dtype=self.dtype, name="conv1")(
            x.astype(self.dtype))  # [B, g, g, width]
        x = x.reshape(b, g * g, self.width)  # [B, N, width], row-major like torch's flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(scale), (self.width,))
        pos = self.param("positional_embedding", nn.initializers.normal(scale),
                         (g * g + 1, self.width))
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width))  # [B, 1, width]
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)  # [B, 1 + N, width]
        x = layer_norm(self.dtype, "ln_pre")(x)
        # OpenAI CLIP's init stds: attention in-proj, output projections (scaled by depth), MLP in.
        attn_std, fc_std = scale, (2 * self.width) ** -0.5
        proj_std = scale * (2 * self.layers) ** -0.5
        grids = []
        block_cls = maybe_remat(ResidualAttentionBlock, self.remat)
        for i in range(self.layers):
            x = block_cls(self.heads, self.mlp_dim or 4 * self.width, attn_std, proj_std, fc_std, self.dtype,
                          name=f"resblocks_{i}")(x)
            if stages:
                grids.append(x[:, 1:].reshape(b, g, g, self.width))  # row-major, as patchified
        pooled = layer_norm(self.dtype, "ln_post")(x[:, 0]).astype(jnp.float32)  # [B, width]
        if stages:
            return pooled, tuple(grids)
        return (pooled, x) if return_tokens else pooled


def _bicubic_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
    """[out, in] weights of torch's 1-D bicubic resize (upsample_bicubic2d): cubic convolution with
    A = -0.75, taps at floor(src) - 1 .. + 2 clamped to the border."""
    a = -0.75
    dst = np.arange(out_size, dtype=np.float64)
    if align_corners:
        src = dst * ((in_size - 1) / (out_size - 1)) if out_size > 1 else np.zeros_like(dst)
    else:
        # half-pixel centres; unlike (bi)linear, torch does NOT clamp src at 0 for cubic.
        src = (dst + 0.5) * (in_size / out_size) - 0.5
    lo = np.floor(src)
    t = src - lo  # [out]

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)  # [out, 4]
    taps = np.clip(lo[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)  # [out, 4]
    m = np.zeros((out_size, in_size))
    np.add.at(m, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return m


def resample_positional_embedding(pe: np.ndarray, new_grid: int, *,
                                  align_corners: bool = False) -> np.ndarray:
    """Resizes CLIP positions [1 + g*g, w] to [1 + new_grid**2, w]: the class position is kept,
    the g x g grid is resized bicubically, equal to torch
    `F.interpolate(grid, size=new_grid, mode='bicubic', align_corners=align_corners)`.

    The default (False) is open_clip's `resize_pos_embed`. Chinese-CLIP's (ViLReF's)
    `resize_pos_embed`, applied when its loader meets another resolution, uses
    `align_corners=True`: pass that to reproduce it.
    """
    pe = np.asarray(pe)
    if pe.ndim != 2:
        raise ValueError(f"positional embedding must be [1 + g*g, width], got {pe.shape}")
    g = math.isqrt(pe.shape[0] - 1)
    if g * g + 1 != pe.shape[0]:
        raise ValueError(f"positional embedding length {pe.shape[0]} is not 1 + a square grid")
    if g == new_grid:
        return pe.copy()
    m = _bicubic_matrix(g, new_grid, align_corners)  # [new, g], the same along rows and columns
    grid = pe[1:].reshape(g, g, -1).astype(np.float64)  # [g, g, w]
    resized = np.einsum("oi,ijc,pj->opc", m, grid, m)  # [new, new, w]
    return np.concatenate([pe[:1], resized.reshape(new_grid * new_grid, -1).astype(pe.dtype)])


def vit_b16(**kw) -> VisionTransformer:
    """ViLReF / Chinese-CLIP ViT-B/16 at 224 (768-d features, 197 positions)."""
    return VisionTransformer(**{"patch_size": 16, "width": 768, "layers": 12, "heads": 12,
                                "image_size": 224, **kw})


def vit_tiny(**kw) -> VisionTransformer:
    """Two-block, 64-wide ViT on 32 px images (4x4 patches of 8 px): CPU tests/demos."""
    return VisionTransformer(**{"patch_size": 8, "width": 64, "layers": 2, "heads": 4,
                                "image_size": 32, **kw})
