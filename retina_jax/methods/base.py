"""What the generic trainer (retina_jax/train.py) asks of a pretraining method (docs/architecture.md,
"Methods").

A method builds its model, opens its training streams, adds its own train-state fields (ViLReF's
momentum copy and queues), and writes one step as three pure functions the trainer's jitted step
calls in order:

    state = method.begin_step(state)                 # e.g. ViLReF's late queue start
    params, ctx = method.prepare(state, batch, rng)  # no gradients: clamps, the momentum forward
    (loss, aux), grads = value_and_grad(method.loss)(params, state, batch, rng, ctx)
    ... the optimizer step (the trainer) ...
    new_params, fields, metrics = method.finish_step(state, params, new_params, aux, ctx, batch)

`TwoTowerMethod` holds what FLAIR, KeepFIT and ViLReF share: the two-tower model, its forward with
BatchNorm statistics, the `logit_scale` clamp and reset quirks and the collapse gauges.
"""
from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from retina_jax import losses, sharding
from retina_jax.data import files, pipeline
from retina_jax.models.two_tower import build_model
from retina_jax.train_state import TrainState

# Config groups a method turns on; `validate` refuses each one under a method that does not own it.
FEATURES = {
    "data.expert.enabled": lambda c: c.data.expert.enabled,
    "mlm.enabled": lambda c: c.mlm.enabled,
    "momentum.enabled": lambda c: c.momentum.enabled,
    "momentum.queue_size": lambda c: bool(c.momentum.queue_size),
    "model.knowledge.enabled": lambda c: c.model.knowledge.enabled,
    "model.decoder.enabled": lambda c: c.model.decoder.enabled,
}


class Method:
    """One pretraining method. Subclasses set `name`, `losses`, `features` and the step functions."""
    name: ClassVar[str]
    losses: ClassVar[tuple[str, ...]] = ()  # the `loss.name` values it trains with
    features: ClassVar[tuple[str, ...]] = ()  # the FEATURES it may turn on
    stages: ClassVar[tuple[type, ...]] = ()  # its other stages' classes (`for_config` picks one)

    def __init__(self, config, tokenize, mesh):
        self.config, self.tokenize, self.mesh = config, tokenize, mesh
        self.batch_sharding = sharding.batch_sharding(mesh)
        self.model = self.build_model()
        self.open_data()
        self.steps_per_epoch = max(1, self.train_size() // config.data.batch_size)
        self.total_steps = max(1, int(round(config.train.epochs * self.steps_per_epoch)))

    @classmethod
    def for_config(cls, config) -> type[Method]:
        """The class that trains `config`: a method with stages returns the stage's class."""
        return cls

    @classmethod
    def check(cls, config, num_devices: int) -> list[str]:
        """Config errors of this method (each `config.<field>: why`); the generic ones are
        `retina_jax.config.validate`'s, the refusal of other methods' features `methods.check`'s."""
        errors = []
        if cls.losses and config.loss.name not in cls.losses:
            errors.append(f"config.loss.name: {config.loss.name!r} is not a loss of method {cls.name!r} "
                          f"({', '.join(cls.losses)})")
        return errors

    # ------------------------------------------------------------------------------ model and data
    def build_model(self):
        raise NotImplementedError

    def dummy_inputs(self) -> tuple:
        raise NotImplementedError

    def open_data(self) -> None:
        """Open (parse) the datasets once; `train_iter` and `bad_rows` read them."""
        self.datasets = files.open_datasets(self.config) if self.config.data.source == "files" else None

    def bad_rows(self) -> list[str]:
        return files.bad_rows(self.datasets or {})

    def train_size(self) -> int:
        raise NotImplementedError

    def train_iter(self):
        raise NotImplementedError

    # ------------------------------------------------------------------------------ train state
    def extra_state(self, params) -> dict:
        """Train-state fields beyond parameters and optimizer state (`ema_params`, `queues`)."""
        return {}

    def with_params(self, state: TrainState, params, batch_stats) -> TrainState:
        """`state` starting from loaded parameters (`config.model_init`)."""
        return state.replace(params=params, batch_stats=batch_stats)

    def on_run_start(self, state: TrainState, replicated) -> TrainState:
        """Applied when a run starts (scratch, model_init, config.resume), never on its own resume."""
        return state

    # ------------------------------------------------------------------------------ the step
    def begin_step(self, state: TrainState) -> TrainState:
        return state

    def prepare(self, state: TrainState, batch, rng):
        """(parameters as this step uses them, context for `loss` and `finish_step`); no gradients."""
        return dict(state.params), {}

    def loss(self, params, state: TrainState, batch, rng, ctx):
        """(scalar loss, aux); aux['batch_stats'] is the new BatchNorm state, aux['metrics'] extra
        metrics, aux['terms'] the loss terms logged as train/loss_<name>."""
        raise NotImplementedError

    def finish_step(self, state: TrainState, params, new_params, aux, ctx, batch):
        """(new params, other new train-state fields, metrics) after the optimizer step."""
        return new_params, {"batch_stats": aux["batch_stats"]}, {}


class TwoTowerMethod(Method):
    """An image tower and a text tower trained contrastively (FLAIR, KeepFIT, ViLReF)."""

    def build_model(self):
        c = self.config
        return build_model(c.model, self.tokenize.vocab_size, c.data.image_size, c.text.max_len)

    def dummy_inputs(self) -> tuple:
        size, length = self.config.data.image_size, self.config.text.max_len
        return (jnp.zeros((1, size, size, 3), jnp.float32), jnp.zeros((1, length), jnp.int32),
                jnp.ones((1, length), jnp.int32))

    def train_size(self) -> int:
        return pipeline.train_size(self.config, self.datasets)

    def train_iter(self):
        return iter(pipeline.train_dataset(self.config, self.tokenize, self.datasets, None))

    def on_run_start(self, state: TrainState, replicated) -> TrainState:
        """ViLReF's quirk (`model.logit_scale_reset`, docs/methods.md): the temperature restarts at
        its initial value whenever a run starts, in the online and any momentum parameters."""
        if not self.config.model.logit_scale_reset:
            return state
        # A fresh buffer per tree: the train step donates its state, and one buffer may not be donated twice.
        init = lambda: jax.device_put(np.float32(self.config.model.logit_scale_init), replicated)  # noqa: E731
        logging.info("logit_scale reset to %.4f (model.logit_scale_reset)", self.config.model.logit_scale_init)
        replace = {"params": {**state.params, "logit_scale": init()}}
        if state.ema_params:
            replace["ema_params"] = {**state.ema_params, "logit_scale": init()}
        return state.replace(**replace)

    def scope(self):
        """(num_groups, row_sharding) of `losses.scoped` for `config.loss.scope`: 'local' computes
        the loss per device (negatives only from the same device, as the original), 'global' over
        the whole batch with row-sharded logits."""
        if self.config.loss.scope == "local":
            return sharding.num_batch_shards(self.mesh), None
        return 1, sharding.rows_sharding(self.mesh)

    def prepare(self, state: TrainState, batch, rng):
        params = dict(state.params)
        if self.config.model.logit_scale_clamp == "before_forward":
            # FLAIR clamps logit_scale.data in place before every forward: AdamW then steps from the
            # clamped value, so the clamp is applied to the stored parameter, not only inside the loss.
            params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, losses.LOGIT_SCALE_MAX)
        return params, {}

    def contrastive_loss(self, out, batch, logit_scale):
        """FLAIR's soft CLIP loss (`loss.name='flair'`) or CLIP's InfoNCE on the public batch, in
        `loss.scope`."""
        if self.config.loss.name == "flair":
            fn, args = losses.flair_loss, (out["zimg"], out["ztxt"], batch["category_id"])
        else:
            fn, args = losses.clip_loss, (out["zimg"], out["ztxt"])
        return losses.scoped(fn, *self.scope())(*args, logit_scale=logit_scale)

    def loss(self, params, state, batch, rng, ctx):
        """FLAIR's loss, or CLIP's (`contrastive_loss`) on the public batch."""
        out, batch_stats = self.forward(params, state, batch, rng)
        loss = self.contrastive_loss(out, batch, params["logit_scale"])
        return loss, {"batch_stats": batch_stats, "out": out, "terms": {}, "metrics": {}}

    def forward(self, params, state: TrainState, batch, rng):
        """Both towers in train mode on the public batch -> (outputs, new batch_stats)."""
        out, updates = self.model.apply(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], batch["input_ids"],
            batch["attention_mask"], train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
        # Embeddings stay split by rows like the batch: with FSDP-split projection kernels XLA
        # would otherwise split them (and their gradients) by feature, then copy them whole to
        # meet the row-sharded logits.
        out = {**out, **{k: jax.lax.with_sharding_constraint(out[k], self.batch_sharding) for k in ("zimg", "ztxt")}}
        return out, updates.get("batch_stats", {})

    def finish_step(self, state: TrainState, params, new_params, aux, ctx, batch):
        if self.config.model.logit_scale_clamp == "after_step":
            # ViLReF (Chinese-CLIP) clamps logit_scale.data after every optimizer step.
            new_params["logit_scale"] = jnp.clip(new_params["logit_scale"], 0.0, losses.LOGIT_SCALE_MAX)
        out = aux["out"]
        metrics = {"train/logit_scale": jnp.exp(params["logit_scale"])}
        # Collapse gauge: the norm of the batch-mean embedding (1 = every example the same vector).
        for key, name in (("zimg", "img"), ("ztxt", "txt")):
            metrics[f"train/mean_norm_{name}"] = jnp.linalg.norm(jnp.mean(out[key].astype(jnp.float32), axis=0))
        return new_params, {"batch_stats": aux["batch_stats"]}, metrics
