"""ViLReF (Yang et al., 2024; docs/methods.md, "ViLReF"): image-report pretraining with labels read
from the reports, the Weighted Similarity Coupling Loss and batch expansion by momentum encoders
and a queue.

Each example is an image, its report and the multi-hot findings the expert keyword extractor reads
off the report (data/labels.py). Stage `clip` (`loss.name='clip'`, no momentum model) is the
pretrained start ViLReF assumes: plain CLIP InfoNCE on the pairs. Stage `vilref` trains WSCL
(`losses.wscl_loss`): every non-paired key is a negative whose logit is scaled by how different its
labels are, and keys with the query's exact label set are dropped as false negatives. With
`momentum.enabled` an EMA copy of both towers (ALBEF mechanics, momentum.py) encodes the batch, its
features are this step's keys (`momentum.key_features`) and, with `momentum.queue_size`, enter a
replicated ring buffer whose entries join the next steps' keys. The temperature is clamped after
every optimizer step and restarted at every run start (`model.logit_scale_clamp`,
`model.logit_scale_reset`, the original's quirks).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from retina_jax import losses, momentum, sharding
from retina_jax.errors import ConfigError
from retina_jax.data import pipeline
from retina_jax.methods.base import TwoTowerMethod
from retina_jax.momentum import SCHEDULES as MOMENTUM_SCHEDULES, check_queue_size
from retina_jax.train_state import TrainState

MOMENTUM_KEYS = ("momentum", "online")


class ViLReF(TwoTowerMethod):
    name = "vilref"
    losses = ("clip", "wscl")
    features = ("momentum.enabled", "momentum.queue_size")

    @classmethod
    def check(cls, config, num_devices: int) -> list[str]:
        errors = super().check(config, num_devices)

        def check(ok: bool, field: str, why: str):
            if not ok:
                errors.append(f"config.{field}: {why}")

        m, w = config.momentum, config.loss.wscl
        check(config.data.stream == "reports", "data.stream", "ViLReF trains on image-report pairs ('reports')")
        check(0.0 <= m.decay < 1.0, "momentum.decay", f"{m.decay} must be in [0, 1)")
        check(m.key_features in MOMENTUM_KEYS, "momentum.key_features", f"{m.key_features!r} not in {MOMENTUM_KEYS}")
        check(m.enabled or m.key_features == "online", "momentum.key_features",
              "'momentum' keys need momentum.enabled=True")
        check(m.enabled or w.alpha == 0, "loss.wscl.alpha", "momentum distillation (alpha > 0) needs momentum.enabled=True")
        check(not m.enabled or config.loss.name == "wscl", "momentum.enabled",
              f"the momentum model feeds only the 'wscl' loss, not {config.loss.name!r}")
        check(m.queue_size >= 0, "momentum.queue_size", "must be >= 0 (0 = no queue)")
        if m.queue_size:
            check(config.loss.name == "wscl", "momentum.queue_size",
                  f"queues feed only the 'wscl' loss, not {config.loss.name!r}")
            try:
                check_queue_size(m.queue_size, config.data.batch_size)
            except ValueError as e:
                check(False, "momentum.queue_size", f"{e} (data.batch_size)")
        check(m.schedule in MOMENTUM_SCHEDULES, "momentum.schedule", f"{m.schedule!r} not in {MOMENTUM_SCHEDULES}")
        check(m.queue_start_step >= 0, "momentum.queue_start_step", "must be >= 0 (0 = the queue from the first step)")
        check(not m.queue_start_step or (m.enabled and m.queue_size > 0), "momentum.queue_start_step",
              "needs momentum.enabled=True and momentum.queue_size > 0")
        check(0.0 < m.queue_max_fraction <= 1.0, "momentum.queue_max_fraction", "must be in (0, 1]")
        check(config.loss.name != "wscl" or config.loss.scope == "global", "loss.scope",
              "WSCL is computed over the global batch and the queue ('global'); 'local' is implemented for the "
              "'flair' and 'clip' losses only")
        return errors

    def open_data(self) -> None:
        super().open_data()
        _check_queue_fraction(self.config.momentum, self.train_size())

    def train_iter(self):
        extractor = pipeline.label_extractor(self.config)
        if extractor is not None and jax.process_index() == 0:
            self.label_coverage = pipeline.log_label_coverage(self.config, extractor)
        return super().train_iter()

    # ------------------------------------------------------------------------------ train state
    def extra_state(self, params) -> dict:
        m = self.config.momentum
        # ALBEF starts the momentum model as an exact copy of the online one.
        ema_params = jax.tree.map(jnp.copy, params) if m.enabled else {}
        queues = momentum.init_queues(m.queue_size, self.config.model.embed_dim, pipeline.num_labels(self.config)) \
            if m.queue_size else {}
        return {"ema_params": ema_params, "queues": queues}

    def with_params(self, state: TrainState, params, batch_stats) -> TrainState:
        # The momentum model starts as a copy of whatever the online model starts from.
        ema_params = jax.tree.map(jnp.copy, params) if self.config.momentum.enabled else {}
        return state.replace(params=params, batch_stats=batch_stats, ema_params=ema_params)

    # ------------------------------------------------------------------------------ the step
    def begin_step(self, state: TrainState) -> TrainState:
        """At `momentum.queue_start_step` the momentum towers restart as copies of the online ones
        and the queue restarts empty; before it the queue is never written (so never read)."""
        start = self.config.momentum.queue_start_step
        if not start:
            return state
        return state.replace(ema_params=momentum.resync_at(state.ema_params, state.params, state.step, start),
                             queues=momentum.restart_at(state.queues, state.step, start))

    def prepare(self, state: TrainState, batch, rng):
        params, _ = super().prepare(state, batch, rng)
        m = self.config.momentum
        if not m.enabled:
            return params, {"ema_params": state.ema_params, "momentum_out": None}
        # ALBEF order: EMA update from the current online params, then the momentum forward in train
        # mode as ALBEF's (its own dropout draw; BatchNorm on batch statistics like the queries, its
        # running averages discarded).
        ema_params = momentum.ema_update(state.ema_params, params,
                                         momentum.decay_at(state.step, m.decay, m.schedule, self.total_steps))
        momentum_out, _ = self.model.apply(
            {"params": ema_params, "batch_stats": state.batch_stats}, batch["image"], batch["input_ids"],
            batch["attention_mask"], train=True, rngs={"dropout": jax.random.fold_in(rng, 1)},
            mutable=["batch_stats"])
        return params, {"ema_params": ema_params, "momentum_out": jax.lax.stop_gradient(momentum_out)}

    def queue(self, state: TrainState) -> dict:
        """The queue as the loss reads it: no slot counts before `momentum.queue_start_step`."""
        m = self.config.momentum
        if not m.queue_size:
            return {}
        q = state.queues
        valid = q.valid & (state.step >= m.queue_start_step) if m.queue_start_step else q.valid
        return dict(queue_img=q.img, queue_txt=q.txt, queue_labels=q.labels, queue_valid=valid)

    def loss(self, params, state: TrainState, batch, rng, ctx):
        if self.config.loss.name == "clip":  # stage `clip`
            return super().loss(params, state, batch, rng, ctx)
        out, batch_stats = self.forward(params, state, batch, rng)
        w, m, momentum_out = self.config.loss.wscl, self.config.momentum, ctx["momentum_out"]
        kwargs = {}
        if momentum_out is not None:
            kwargs.update(momentum_img=momentum_out["zimg"], momentum_txt=momentum_out["ztxt"])
            if m.key_features == "momentum":
                kwargs.update(keys_img=momentum_out["zimg"], keys_txt=momentum_out["ztxt"])
        kwargs.update(self.queue(state))
        loss = losses.wscl_loss(out["zimg"], out["ztxt"], batch["labels"], params["logit_scale"], coupling=w.coupling,
                                alpha=w.alpha, row_sharding=sharding.rows_sharding(self.mesh), **kwargs)
        return loss, {"batch_stats": batch_stats, "out": out, "terms": {}, "metrics": {}}

    def finish_step(self, state: TrainState, params, new_params, aux, ctx, batch):
        new_params, fields, metrics = super().finish_step(state, params, new_params, aux, ctx, batch)
        out, momentum_out, m = aux["out"], ctx["momentum_out"], self.config.momentum
        if self.config.loss.name == "wscl":
            # False-negative fractions and the softmax mass on the queue of this step's image-to-text rows.
            keys = momentum_out["ztxt"] if momentum_out is not None and m.key_features == "momentum" else out["ztxt"]
            queue = {k: v for k, v in self.queue(state).items() if k != "queue_img"}
            stats = losses.wscl_statistics(out["zimg"], keys, batch["labels"], params["logit_scale"],
                                           coupling=self.config.loss.wscl.coupling,
                                           row_sharding=sharding.rows_sharding(self.mesh), **queue)
            metrics.update({f"train/wscl_{k}": v for k, v in stats.items()})
        if momentum_out is not None:
            # How closely the momentum model tracks the online one (cosine of the same examples'
            # embeddings): far below 1, the keys and queue are stale and the loss can fall by moving
            # every feature away from them instead of separating the examples (docs/methods.md, ViLReF).
            for key, name in (("zimg", "img"), ("ztxt", "txt")):
                metrics[f"train/momentum_cos_{name}"] = jnp.mean(jnp.sum(out[key] * momentum_out[key], axis=-1))
            fields["ema_params"] = ctx["ema_params"]
        if m.queue_size:
            # The whole global batch enters the replicated queue: momentum features when there is a
            # momentum model, else the online ones (detached).
            source = momentum_out if momentum_out is not None else out
            fields["queues"] = momentum.enqueue_from(state.queues, state.step, m.queue_start_step, source["zimg"],
                                                     source["ztxt"], batch["labels"])
            metrics["train/queue_fill"] = jnp.mean(fields["queues"].valid.astype(jnp.float32))
        return new_params, fields, metrics


def _check_queue_fraction(m, train_size: int):
    """The queue must stay well under the training set (`momentum.queue_max_fraction`): the paper's
    65,536 of 451,956 pairs is 0.145; at the dataset's size it would hold every example's own key
    from the last epoch, a negative drawn from a model one epoch old."""
    if m.queue_size and m.queue_size > m.queue_max_fraction * train_size:
        raise ConfigError(f"invalid config:\n  config.momentum.queue_size: {m.queue_size} is over "
                          f"momentum.queue_max_fraction={m.queue_max_fraction} of the {train_size} training examples "
                          f"(at most {int(m.queue_max_fraction * train_size)}); use a smaller queue")
