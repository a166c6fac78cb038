"""The FLAIR two-tower model (METHODS.md section 1).

Image tower (torchvision-layout ResNet) and text tower (HF-layout BERT with FLAIR pooling), each
followed by FLAIR's projection head: `x / |x|` -> Linear(in, D, no bias) -> `/ |x|` (normalised
before AND after the projection), and a learnable temperature `logit_scale` (init ln(1/0.07)). The
clamp to [0, ln 100] is applied where the temperature is used (`losses.clamp_logit_scale`) and on
the stored value before each step (train.py), as FLAIR clamps `.data` in place.

Param tree names are an API (weight decay, freezing, sharding and conversion key on them):
`img`, `txt`, `img_proj`, `txt_proj`, `logit_scale`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from retina_jax.models.bert import BertConfig, TextEncoder
from retina_jax.models.resnet import ResNet


def l2_normalize(x, eps: float = 1e-12):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class Projection(nn.Module):
    """FLAIR's ProjectionLayer: normalise, project without bias, normalise."""
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = l2_normalize(x.astype(jnp.float32))
        x = nn.Dense(self.features, use_bias=False, dtype=self.dtype, name="dense")(x)
        return l2_normalize(x.astype(jnp.float32))


class TwoTower(nn.Module):
    img: ResNet
    txt_config: BertConfig
    text_pooling: str = "flair"
    embed_dim: int = 512
    logit_scale_init: float = 2.659260036932778
    dtype: Any = jnp.float32

    def setup(self):
        # Submodule attribute names become the param tree names.
        self.txt = TextEncoder(config=self.txt_config, pooling=self.text_pooling, dtype=self.dtype)
        self.img_proj = Projection(self.embed_dim, dtype=self.dtype)
        self.txt_proj = Projection(self.embed_dim, dtype=self.dtype)
        self.logit_scale = self.param("logit_scale", lambda _: jnp.asarray(self.logit_scale_init, jnp.float32))

    def image_features(self, image, train: bool = False):
        """Pre-projection image features (FLAIR's 2048-d for ResNet-50; the linear-probe input)."""
        return self.img(image.astype(self.dtype), train=train)

    def encode_image(self, image, train: bool = False):
        return self.img_proj(self.image_features(image, train))  # [B, D], unit norm

    def encode_text(self, input_ids, attention_mask, train: bool = False):
        return self.txt_proj(self.txt(input_ids, attention_mask, deterministic=not train))  # [B, D]

    def __call__(self, image, input_ids, attention_mask, train: bool = False):
        return {"zimg": self.encode_image(image, train), "ztxt": self.encode_text(input_ids, attention_mask, train),
                "logit_scale": self.logit_scale}


def build_model(model_config, vocab_size: int) -> TwoTower:
    """TwoTower from `config.model` and the tokenizer's vocabulary size."""
    dtype = jnp.dtype(model_config.compute_dtype)
    m = model_config
    img = ResNet(depth=m.img.depth, width=m.img.width, stage_sizes=tuple(m.img.stage_sizes) or None, dtype=dtype)
    txt = BertConfig(vocab_size=vocab_size, hidden_size=m.txt.hidden_size, num_hidden_layers=m.txt.num_hidden_layers,
                     num_attention_heads=m.txt.num_attention_heads, intermediate_size=m.txt.intermediate_size,
                     max_position_embeddings=m.txt.max_position_embeddings,
                     hidden_dropout_prob=m.txt.hidden_dropout_prob,
                     attention_probs_dropout_prob=m.txt.attention_probs_dropout_prob, add_pooler=m.txt.add_pooler)
    return TwoTower(img=img, txt_config=txt, text_pooling=m.txt.pooling, embed_dim=m.embed_dim,
                    logit_scale_init=m.logit_scale_init, dtype=dtype)
