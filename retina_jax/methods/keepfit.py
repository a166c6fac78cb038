"""KeepFIT (Wu et al., 2024; docs/methods.md, "KeepFIT"): FLAIR plus a stream of expert
image-caption pairs (MM-Retinal's role) and a knowledge attention that revises the public image
embeddings with them.

Every step reads a public FLAIR batch and an expert batch (`data.expert`). The loss is
`L_pub + mm_weight * L_mm + rev_weight * L_rev` (`losses.keepfit_loss`): L_pub FLAIR's loss on the
public batch, L_mm the CLIP loss of the expert pairs, L_rev the MSE between the public text
embeddings and the knowledge attention's answer to the public image embeddings over the expert
pairs (`model.knowledge`, models/knowledge_attention.py). The expert pairs go through the same
towers in train mode after the public batch, so BatchNorm is updated by the public pass, then the
expert pass, as the original's two forward calls.
"""
from __future__ import annotations

import jax

from retina_jax import losses, sharding
from retina_jax.data import files, pipeline
from retina_jax.methods.flair import Flair
from retina_jax.models.two_tower import TwoTower


class KeepFIT(Flair):
    name = "keepfit"
    losses = ("flair",)
    features = ("data.expert.enabled", "model.knowledge.enabled")

    @classmethod
    def check(cls, config, num_devices: int) -> list[str]:
        errors = super().check(config, num_devices)
        e, k, batch_shards = config.data.expert, config.loss.keepfit, sharding.batch_devices(config.mesh, num_devices)
        if not e.enabled:
            errors.append("config.data.expert.enabled: KeepFIT trains with its expert stream (True)")
            return errors
        if e.batch_size <= 0 or e.batch_size % max(batch_shards, 1):
            errors.append(f"config.data.expert.batch_size: global expert batch {e.batch_size} must be a positive "
                          f"multiple of the {batch_shards} data x fsdp devices")
        if e.size < e.batch_size:
            errors.append(f"config.data.expert.size: {e.size} examples cannot fill one expert batch of {e.batch_size}")
        if e.seed in (config.data.synthetic.seed, config.heldout.conditions.seed):
            errors.append(f"config.data.expert.seed: {e.seed} must differ from the public corpus and held-out seeds")
        if config.data.stream != "flair" or config.loss.name != "flair":
            errors.append("config.data.expert.enabled: KeepFIT's expert stream goes with the FLAIR public stream and "
                          "loss (data.stream='flair', loss.name='flair')")
        if k.mm_weight < 0 or k.rev_weight < 0 or k.gen_weight < 0:
            errors.append("config.loss.keepfit: mm_weight, rev_weight and gen_weight must be >= 0")
        if not (k.mm_weight > 0 or k.rev_weight > 0 or k.gen_weight > 0):
            errors.append("config.loss.keepfit: mm_weight, rev_weight and gen_weight are all 0: the expert stream "
                          "would not train anything")
        if k.rev_weight and not config.model.knowledge.enabled:
            errors.append(f"config.loss.keepfit.rev_weight: {k.rev_weight} needs the knowledge attention "
                          "(model.knowledge.enabled=True)")
        if (k.gen_weight > 0) != bool(config.model.decoder.enabled):
            errors.append(f"config.loss.keepfit.gen_weight: {k.gen_weight} with model.decoder.enabled="
                          f"{config.model.decoder.enabled}: the caption decoder trains exactly when gen_weight > 0")
        return errors

    def open_data(self) -> None:
        super().open_data()
        e = self.config.data.expert
        self.expert_datasets = files.open_datasets(self.config, e.datasets, "data.expert.datasets") \
            if e.datasets else None

    def bad_rows(self) -> list[str]:
        return files.bad_rows(self.datasets or {}, self.expert_datasets or {})

    def train_iter(self):
        return iter(pipeline.train_dataset(self.config, self.tokenize, self.datasets, self.expert_datasets))

    def expert_pass(self, params, batch_stats, batch, rng, image_tokens: bool = False):
        """The expert pairs through both towers in train mode -> (outputs, new batch_stats)."""
        kout, updates = self.model.apply(
            {"params": params, "batch_stats": batch_stats}, batch["expert_image"], batch["expert_input_ids"],
            batch["expert_attention_mask"], train=True, image_tokens=image_tokens,
            rngs={"dropout": jax.random.fold_in(rng, 2)}, mutable=["batch_stats"])
        return kout, updates.get("batch_stats", batch_stats)

    def keepfit_loss(self, params, out, kout, batch, rng):
        """L_pub + mm_weight L_mm + rev_weight L_rev -> (loss, terms). The knowledge attention (its
        own dropout draw) revises the public image embeddings into text space from the expert pairs."""
        k = self.config.loss.keepfit
        revised = None
        if k.rev_weight:
            revised = self.model.apply({"params": params}, out["zimg"], kout["zimg"], kout["ztxt"], train=True,
                                       method=TwoTower.revise, rngs={"dropout": jax.random.fold_in(rng, 3)})
        num_groups, row_sharding = self.scope()
        return losses.keepfit_loss(
            out["zimg"], out["ztxt"], batch["category_id"], kout["zimg"], kout["ztxt"], revised, params["logit_scale"],
            mm_weight=k.mm_weight, rev_weight=k.rev_weight, num_groups=num_groups, row_sharding=row_sharding)

    def loss(self, params, state, batch, rng, ctx):
        out, batch_stats = self.forward(params, state, batch, rng)
        kout, batch_stats = self.expert_pass(params, batch_stats, batch, rng)
        loss, terms = self.keepfit_loss(params, out, kout, batch, rng)
        return loss, {"batch_stats": batch_stats, "out": out, "terms": terms, "metrics": {}}

