"""The two-tower model of every method (docs/methods.md, "FLAIR", "KeepFIT" and "ViLReF").

An image tower (`model.img.name`: torchvision-layout ResNet for FLAIR/KeepFIT, CLIP ModifiedResNet
or CLIP-layout ViT for ViLReF) and a text tower (HF-layout BERT/RoBERTa with the pooling switch),
each followed by a projection head, and a learnable temperature `logit_scale` (init ln(1/0.07)):
- 'flair' head (FLAIR's ProjectionLayer): `x / |x|` -> Linear(in, D, no bias) -> `/ |x|`;
- 'linear' head (CLIP's `visual.proj` / ViLReF's `text_projection`): Linear(no bias) -> `/ |x|`
  (CLIP normalises right after projecting, in the loss);
- 'none': the tower already outputs D (CLIP RN50's attention pool); only normalised.
KeepFIT adds the knowledge attention (`model.knowledge.enabled`, models/knowledge_attention.py); KeepFIT V2
the caption decoder over the image tower's spatial tokens (`model.decoder.enabled`,
models/caption_decoder.py).

The clamp of `logit_scale` to [0, ln 100] is applied where the temperature is used
(`losses.clamp_logit_scale`) and on the stored value before or after each step (methods/base.py),
as FLAIR and Chinese-CLIP clamp `.data` in place.

Param tree names are an API (weight decay, freezing, sharding and conversion key on them):
`img`, `txt`, `img_proj`, `txt_proj` (absent for 'none'), `logit_scale`, `knowledge`, `decoder`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from retina_jax.models.bert import BertConfig, TextEncoder
from retina_jax.models.caption_decoder import CaptionDecoder
from retina_jax.models.clip_resnet import ModifiedResNet
from retina_jax.models.knowledge_attention import KnowledgeAttention
from retina_jax.models.resnet import ResNet
from retina_jax.models.vit import VisionTransformer

IMAGE_TOWERS = ("resnet", "clip_resnet", "vit")
PROJECTIONS = ("flair", "linear", "none")


def l2_normalize(x, eps: float = 1e-12):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class Projection(nn.Module):
    """Projection head -> unit-norm embedding [B, features]; `kind` in PROJECTIONS (module docstring)."""
    features: int
    kind: str = "flair"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32)
        if self.kind not in PROJECTIONS:
            raise ValueError(f"unknown projection {self.kind!r}; allowed: {PROJECTIONS}")
        if self.kind == "none":
            if x.shape[-1] != self.features:
                raise ValueError(f"projection 'none' needs tower features of embed_dim={self.features}, "
                                 f"got {x.shape[-1]}")
            return l2_normalize(x)
        if self.kind == "flair":  # FLAIR normalises BEFORE projecting, too
            x = l2_normalize(x)
        x = nn.Dense(self.features, use_bias=False, dtype=self.dtype, name="dense")(x)
        return l2_normalize(x.astype(jnp.float32))


class TwoTower(nn.Module):
    img: nn.Module  # ResNet | ModifiedResNet | VisionTransformer: image [B, H, W, 3] -> features [B, F]
    txt_config: BertConfig
    text_pooling: str = "flair"
    embed_dim: int = 512
    img_projection: str = "flair"
    txt_projection: str = "flair"
    logit_scale_init: float = 2.659260036932778
    knowledge: KnowledgeAttention | None = None
    decoder: CaptionDecoder | None = None
    dtype: Any = jnp.float32
    remat: bool = False  # the text tower's layers (the image tower and decoder carry their own switch)

    def setup(self):
        # Submodule attribute names become the param tree names.
        self.txt = TextEncoder(config=self.txt_config, pooling=self.text_pooling, dtype=self.dtype, remat=self.remat)
        self.img_proj = Projection(self.embed_dim, self.img_projection, dtype=self.dtype)
        self.txt_proj = Projection(self.embed_dim, self.txt_projection, dtype=self.dtype)
        self.logit_scale = self.param("logit_scale", lambda _: jnp.asarray(self.logit_scale_init, jnp.float32))

    def image_features(self, image, train: bool = False):
        """Pre-projection image features (the linear-probe input): 2048-d for FLAIR's ResNet-50,
        768 for the CLIP ViT-B/16 (ln_post of the class token), 1024 for CLIP RN50."""
        return self.img(image.astype(self.dtype), train=train)

    def encode_image(self, image, train: bool = False):
        return self.img_proj(self.image_features(image, train))  # [B, D], unit norm

    def encode_image_tokens(self, image, train: bool = False):
        """(unit-norm embedding [B, D], spatial tokens [B, N, F]) from one pass of the image tower."""
        if not isinstance(self.img, ResNet):
            raise ValueError("the caption decoder needs spatial tokens, implemented for model.img.name='resnet' only")
        features, tokens = self.img(image.astype(self.dtype), train=train, spatial=True)
        return self.img_proj(features), tokens

    def caption_logits(self, image_tokens, input_ids, train: bool = False):
        """Decoder logits [B, L, V] for the decoder inputs `input_ids` given the image tokens."""
        if self.decoder is None:
            raise ValueError("this model has no caption decoder (config.model.decoder.enabled=False)")
        return self.decoder(input_ids, image_tokens, deterministic=not train)

    def encode_text(self, input_ids, attention_mask, train: bool = False):
        return self.txt_proj(self.txt(input_ids, attention_mask, deterministic=not train))  # [B, D]

    def revise(self, zimg, kimg, ktxt, train: bool = False):
        """KeepFIT's knowledge attention o = knowledge(q=zimg, k=kimg, v=ktxt) -> [B, D]."""
        if self.knowledge is None:
            raise ValueError("this model has no knowledge attention (config.model.knowledge.enabled=False)")
        return self.knowledge(zimg, kimg, ktxt, deterministic=not train)

    def __call__(self, image, input_ids, attention_mask, train: bool = False, image_tokens: bool = False):
        """{'zimg', 'ztxt', 'logit_scale'} and, with `image_tokens`, the image tower's spatial tokens."""
        out = {"ztxt": self.encode_text(input_ids, attention_mask, train), "logit_scale": self.logit_scale}
        if image_tokens or (self.decoder is not None and self.is_initializing()):
            out["zimg"], out["image_tokens"] = self.encode_image_tokens(image, train)
        else:
            out["zimg"] = self.encode_image(image, train)
        if self.is_initializing():  # create the optional heads' params
            if self.knowledge is not None:
                self.revise(out["zimg"], out["zimg"], out["ztxt"])
            if self.decoder is not None:
                self.caption_logits(out["image_tokens"], input_ids[:, :-1])
        return out


def build_image_tower(img_config, image_size: int, dtype=jnp.float32, remat: bool = False) -> nn.Module:
    """The image tower `config.model.img` names; `image_size` fixes the CLIP towers' position grids;
    `remat` rematerialises each of its blocks (`config.model.remat`)."""
    if img_config.name == "resnet":
        return ResNet(depth=img_config.depth, width=img_config.width, width_per_group=img_config.width_per_group,
                      stage_sizes=tuple(img_config.stage_sizes) or None, dtype=dtype, remat=remat)
    if img_config.name == "clip_resnet":
        c = img_config.clip_resnet
        return ModifiedResNet(layers=tuple(c.layers), width=c.width, heads=c.heads, output_dim=c.output_dim,
                              image_size=image_size, dtype=dtype, remat=remat)
    if img_config.name == "vit":
        c = img_config.vit
        return VisionTransformer(patch_size=c.patch_size, width=c.width, layers=c.layers, heads=c.heads,
                                 mlp_dim=c.mlp_dim, image_size=image_size, dtype=dtype, remat=remat)
    raise ValueError(f"config.model.img.name={img_config.name!r} not in {IMAGE_TOWERS}")


def text_config(txt_config, vocab_size: int) -> BertConfig:
    """BertConfig from `config.model.txt` and the tokenizer's vocabulary size."""
    t = txt_config
    return BertConfig(vocab_size=vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
                      num_attention_heads=t.num_attention_heads, intermediate_size=t.intermediate_size,
                      max_position_embeddings=t.max_position_embeddings, type_vocab_size=t.type_vocab_size,
                      layer_norm_eps=t.layer_norm_eps, hidden_dropout_prob=t.hidden_dropout_prob,
                      attention_probs_dropout_prob=t.attention_probs_dropout_prob, add_pooler=t.add_pooler,
                      dropout_draw=t.dropout_draw)


def build_model(model_config, vocab_size: int, image_size: int, max_len: int | None = None) -> TwoTower:
    """TwoTower from `config.model`, the tokenizer's vocabulary size, `config.data.image_size` and
    `config.text.max_len` (the caption decoder's positions; default: as many as the text tower's)."""
    dtype = jnp.dtype(model_config.compute_dtype)
    m = model_config
    knowledge = decoder = None
    if m.knowledge.enabled:
        knowledge = KnowledgeAttention(heads=m.knowledge.heads, dropout=m.knowledge.dropout,
                                       softmax_axis=m.knowledge.softmax_axis, dtype=dtype)
    if m.decoder.enabled:
        d = m.decoder
        decoder = CaptionDecoder(vocab_size=vocab_size, max_len=max_len or m.txt.max_position_embeddings, width=d.width, layers=d.layers, heads=d.heads,
                                 mlp_dim=d.mlp_dim, dropout=d.dropout, dtype=dtype, remat=m.remat)
    return TwoTower(img=build_image_tower(m.img, image_size, dtype, m.remat), txt_config=text_config(m.txt, vocab_size),
                    text_pooling=m.txt.pooling, embed_dim=m.embed_dim, img_projection=m.img_projection,
                    txt_projection=m.txt_projection, logit_scale_init=m.logit_scale_init, knowledge=knowledge,
                    decoder=decoder, dtype=dtype, remat=m.remat)
