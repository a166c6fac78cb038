"""KeepFIT V2 (Wu et al., 2025; docs/methods.md, "KeepFIT V2"): knowledge injected in two stages.

Stage `text` (`mlm.enabled`, `TextStage`): the text tower alone learns the expert vocabulary by
whole-word masked language modelling on plain texts (reports and expert captions): 15 % of the
words are chosen and every token of a chosen word is masked (data/text_corpus.py); the loss is the
cross-entropy over the masked tokens. Stage `vl` (`VisionLanguageStage`) starts its text encoder
from stage `text` and trains KeepFIT's image-text objective (contrastive knowledge injection)
plus a CoCa-style caption decoder that writes the expert captions from the image tower's spatial
tokens (generative knowledge injection), with weight `loss.keepfit.gen_weight`.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from retina_jax import losses
from retina_jax.data import pipeline
from retina_jax.methods.base import FEATURES, Method
from retina_jax.methods.keepfit import KeepFIT
from retina_jax.models import caption_decoder
from retina_jax.models.mlm import MaskedLM
from retina_jax.models.two_tower import TwoTower, text_config


class TextStage(Method):
    """Stage `text`: whole-word masked-LM of the text tower alone."""
    name = "keepfit_v2 (stage text)"
    features = ("mlm.enabled",)

    @classmethod
    def check(cls, config, num_devices: int) -> list[str]:
        errors = super().check(config, num_devices)
        mlm = config.mlm
        if not 0.0 < mlm.mask_prob < 1.0:
            errors.append(f"config.mlm.mask_prob: {mlm.mask_prob} must be in (0, 1)")
        if mlm.heldout_size <= 0:
            errors.append("config.mlm.heldout_size: must be > 0 (the held-out masked-token accuracy)")
        if mlm.corpus != "synthetic" and not os.path.isdir(mlm.corpus):
            errors.append(f"config.mlm.corpus: {mlm.corpus!r} is neither 'synthetic' nor a folder of .txt files")
        if any(on(config) for field, on in FEATURES.items() if field != "mlm.enabled"):
            errors.append("config.mlm.enabled: stage `text` trains the text tower alone: turn off data.expert, "
                          "momentum, model.knowledge and model.decoder")
        return errors

    def build_model(self):
        c = self.config
        return MaskedLM(text_config(c.model.txt, self.tokenize.vocab_size), jnp.dtype(c.model.compute_dtype),
                        c.model.remat)

    def dummy_inputs(self) -> tuple:
        length = self.config.text.max_len
        return jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), jnp.int32)

    def train_size(self) -> int:
        return len(pipeline.mlm_split(self.config, "train"))

    def train_iter(self):
        return iter(pipeline.mlm_dataset(self.config, self.tokenize.path))

    def loss(self, params, state, batch, rng, ctx):
        logits = self.model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], train=True,
                                  rngs={"dropout": rng})
        loss, accuracy = losses.token_cross_entropy(logits, batch["mlm_labels"], batch["mlm_weights"])
        return loss, {"batch_stats": state.batch_stats, "terms": {}, "metrics": {"train/mlm_accuracy": accuracy}}


class VisionLanguageStage(KeepFIT):
    name = "keepfit_v2"
    features = KeepFIT.features + ("model.decoder.enabled",)
    stages = (TextStage,)

    @classmethod
    def for_config(cls, config):
        return TextStage if config.mlm.enabled else VisionLanguageStage

    @classmethod
    def check(cls, config, num_devices: int) -> list[str]:
        errors = super().check(config, num_devices)
        d = config.model.decoder
        if d.enabled:
            if config.model.img.name != "resnet":
                errors.append("config.model.decoder.enabled: its spatial image tokens are implemented for "
                              f"model.img.name='resnet', not {config.model.img.name!r}")
            if d.width % d.heads:
                errors.append(f"config.model.decoder.heads: width {d.width} is not divisible by {d.heads} heads")
        return errors

    def loss(self, params, state, batch, rng, ctx):
        gen_weight = self.config.loss.keepfit.gen_weight
        out, batch_stats = self.forward(params, state, batch, rng)
        kout, batch_stats = self.expert_pass(params, batch_stats, batch, rng, image_tokens=bool(gen_weight))
        loss, terms = self.keepfit_loss(params, out, kout, batch, rng)
        if gen_weight:
            # The decoder captions the expert images from their spatial tokens (teacher forcing).
            inputs, targets, weights = caption_decoder.shift_tokens(batch["expert_input_ids"],
                                                                    batch["expert_attention_mask"])
            logits = self.model.apply({"params": params}, kout["image_tokens"], inputs, train=True,
                                      method=TwoTower.caption_logits, rngs={"dropout": jax.random.fold_in(rng, 4)})
            terms["cap"], _ = losses.token_cross_entropy(logits, targets, weights)
            loss = loss + gen_weight * terms["cap"]
        return loss, {"batch_stats": batch_stats, "out": out, "terms": terms, "metrics": {}}
