"""THE trainer: mesh, data, state, jitted step, loop, checkpoints and evaluations.

Implements FLAIR pretraining (METHODS.md section 1) as the first method; later methods differ by
config (towers, loss terms, data streams, momentum state), not by a forked trainer.

Sharding (ARCHITECTURE.md): one `jax.jit` with NamedShardings on a mesh from the config. The batch
is sharded over `data`, parameters and optimizer state are replicated, and the loss is written on
the global batch with row-sharded logits. The train state is built abstractly (`jax.eval_shape`)
and materialised directly with its shardings; the same abstract state is orbax's restore target,
so a checkpoint written on one mesh restores onto another.
"""
from __future__ import annotations

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from retina_jax import checkpointing, losses, sharding
from retina_jax.config import validate
from retina_jax.data import pipeline
from retina_jax.data.tokenizer import Tokenize
from retina_jax.evals import metrics as eval_metrics
from retina_jax.evals import zeroshot
from retina_jax.metrics import MetricWriter, Throughput, check_finite
from retina_jax.models.two_tower import build_model
from retina_jax.optim import make_optimizer
from retina_jax.train_state import TrainState


class Trainer:
    def __init__(self, config, workdir: str):
        validate(config, jax.device_count())
        self.config = config
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.mesh = sharding.make_mesh(config.mesh)
        self.num_data_shards = self.mesh.shape[sharding.DATA]
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.replicated = sharding.replicated(self.mesh)

        self.tokenize = Tokenize(pipeline.prepare_tokenizer(config, self.workdir), config.text.max_len)
        self.model = build_model(config.model, self.tokenize.vocab_size, config.data.image_size)

        self.global_batch = config.data.batch_size
        self.steps_per_epoch = config.data.synthetic.size // self.global_batch
        self.total_steps = max(1, int(round(config.train.epochs * self.steps_per_epoch)))
        self.tx, self.schedule = make_optimizer(config.optim, self.steps_per_epoch)

        self.abstract_state = jax.eval_shape(self._init_state, jax.random.key(0))
        # Parameters, optimizer state and the rest are replicated (FSDP arrives with the scale-out work).
        self.state_sharding = jax.tree.map(lambda _: self.replicated, self.abstract_state)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state, self.state_sharding)
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_sharding, self.batch_sharding),
                                  out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)
        # Compiled once, on first use; evaluation may run every `eval.every_steps`.
        self.encode_text = jax.jit(lambda v, ids, mask: self.model.apply(v, ids, mask, method="encode_text"))
        self.encode_image = jax.jit(lambda v, img: self.model.apply(v, img, method="encode_image"),
                                    out_shardings=self.batch_sharding)
        self.writer = MetricWriter(self.workdir)
        self._stop_signal = None

    # ------------------------------------------------------------------------------ state
    def _dummy_inputs(self):
        size = self.config.data.image_size
        return (jnp.zeros((1, size, size, 3), jnp.float32), jnp.zeros((1, self.config.text.max_len), jnp.int32),
                jnp.ones((1, self.config.text.max_len), jnp.int32))

    def _init_state(self, rng) -> TrainState:
        params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
        variables = self.model.init({"params": params_rng, "dropout": dropout_rng}, *self._dummy_inputs(), train=False)
        params = variables["params"]
        # A ViT tower has no BatchNorm: batch_stats is then an empty tree.
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                          opt_state=self.tx.init(params), rng=jax.random.key_data(state_rng))

    def init_state(self) -> TrainState:
        init = jax.jit(self._init_state, out_shardings=self.state_sharding)
        return init(jax.random.key(self.config.seed))

    def restore_or_init(self, mngr, data_iter) -> TrainState:
        """The resume order of ARCHITECTURE.md: own workdir > config.resume > config.model_init > scratch."""
        if mngr.latest_step() is not None:
            logging.info("resuming from %s step %d", mngr.directory, mngr.latest_step())
            return checkpointing.restore(mngr, self.abstract_state, data_iter)
        if self.config.resume:
            other = checkpointing.manager(self.config.resume, read_only=True)
            logging.info("resuming from config.resume=%s step %s", self.config.resume, other.latest_step())
            state = checkpointing.restore(other, self.abstract_state, data_iter)
            other.close()
            return state
        state = self.init_state()
        if self.config.model_init:
            params, batch_stats = checkpointing.init_from(self.config.model_init, state.params, state.batch_stats,
                                                          self.replicated)
            state = state.replace(params=params, batch_stats=batch_stats)
        return state

    # ------------------------------------------------------------------------------- step
    def _loss(self, out, batch, logit_scale):
        if self.config.loss.name == "flair":
            fn, args = losses.flair_loss, (out["zimg"], out["ztxt"], batch["category_id"])
        else:
            fn, args = losses.clip_loss, (out["zimg"], out["ztxt"])
        if self.config.loss.scope == "local":
            # Per-device negatives, as the original computes it.
            return losses.grouped(fn, self.num_data_shards)(*args, logit_scale=logit_scale)
        return fn(*args, logit_scale, row_sharding=sharding.rows_sharding(self.mesh))

    def _train_step(self, state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        # FLAIR clamps logit_scale.data in place before every forward: AdamW then steps from the
        # clamped value, so the clamp is applied to the stored parameter here, not only inside the loss.
        params = dict(state.params)
        params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, losses.LOGIT_SCALE_MAX)

        def loss_fn(params):
            out, updates = self.model.apply(
                {"params": params, "batch_stats": state.batch_stats}, batch["image"], batch["input_ids"],
                batch["attention_mask"], train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
            return self._loss(out, batch, params["logit_scale"]), updates.get("batch_stats", {})

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = self.tx.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        metrics = {"train/loss": loss, "train/lr": self.schedule(state.step),
                   "train/grad_norm": optax.global_norm(grads),
                   "train/logit_scale": jnp.exp(params["logit_scale"])}
        return state.replace(step=state.step + 1, params=new_params, batch_stats=batch_stats,
                             opt_state=opt_state), metrics

    # ------------------------------------------------------------------------------- loop
    def _on_sigterm(self, signum, frame):
        logging.warning("signal %d received: saving a checkpoint after the current step", signum)
        self._stop_signal = signum

    def train(self) -> dict:
        """Train to `total_steps` (resuming if possible); returns the final eval metrics (if any)."""
        config = self.config
        mngr = checkpointing.manager(checkpointing.checkpoint_dir(self.workdir), max_to_keep=config.train.max_to_keep,
                                     async_save=config.train.async_checkpoint)
        data_iter = self.data_iter = iter(pipeline.train_dataset(config, self.tokenize))
        state = self.restore_or_init(mngr, data_iter)
        start = int(jax.device_get(state.step))
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._write_run_info(start)
        progress = _progress(config.train.progress, start, self.total_steps)
        throughput = Throughput()
        last_saved = mngr.latest_step()

        def save(done: int, force: bool = False):
            nonlocal last_saved
            if last_saved != done:  # e.g. SIGTERM right after a periodic save of the same step
                checkpointing.save(mngr, done, state, data_iter, force=force)
                last_saved = done

        try:
            for step in range(start, self.total_steps):
                batch = pipeline.make_global(next(data_iter), self.batch_sharding)
                state, metrics = self.train_step(state, batch)
                throughput.add(self.global_batch)
                done = step + 1
                if done % config.train.log_every == 0 or done == self.total_steps:
                    metrics = jax.device_get(metrics)
                    check_finite(done, metrics)
                    metrics["perf/examples_per_sec"] = throughput.rate()
                    metrics["train/epoch"] = done / self.steps_per_epoch
                    self.writer.write(done, metrics)
                    if progress is not None:
                        progress.set_postfix(loss=f"{float(metrics['train/loss']):.4f}",
                                             ex_s=f"{metrics['perf/examples_per_sec']:.0f}")
                if progress is not None:
                    progress.update(1)
                if done % config.train.checkpoint_every == 0 and done != self.total_steps:
                    save(done)
                if self._stop_signal is not None:
                    save(done, force=True)
                    mngr.wait_until_finished()
                    self.state = state
                    logging.warning("stopped by signal %d at step %d; checkpoint saved", self._stop_signal, done)
                    return {}
                if config.eval.every_steps and done % config.eval.every_steps == 0 and done != self.total_steps:
                    self.evaluate(state, step=done)
            save(self.total_steps, force=True)
            mngr.wait_until_finished()
        finally:
            signal.signal(signal.SIGTERM, previous)
            if progress is not None:
                progress.close()
            mngr.close()
        self.state = state
        return self.evaluate(state, step=self.total_steps) if config.eval.at_end else {}

    def _write_run_info(self, start: int):
        if jax.process_index() != 0:
            return
        info = {"config": self.config.to_dict(), "devices": jax.device_count(), "mesh": dict(self.mesh.shape),
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps, "start_step": start,
                "param_count": int(sum(np.prod(a.shape) for a in jax.tree.leaves(self.abstract_state.params)))}
        with open(os.path.join(self.workdir, "run_info.json"), "w") as f:
            json.dump(info, f, indent=2, default=str)
        logging.info("%d devices, mesh %s, %d params, %d steps/epoch, steps %d -> %d", info["devices"], info["mesh"],
                     info["param_count"], self.steps_per_epoch, start, self.total_steps)

    # ------------------------------------------------------------------------------- eval
    def restore_latest(self) -> TrainState:
        """The latest checkpoint of this workdir (for `retina_jax.evaluate`)."""
        mngr = checkpointing.manager(checkpointing.checkpoint_dir(self.workdir), read_only=True)
        try:
            return checkpointing.restore(mngr, self.abstract_state)
        finally:
            mngr.close()

    def evaluate(self, state: TrainState, step: int) -> dict:
        """Zero-shot on the held-out synthetic task; writes eval/<task>/<metric> and a JSON report."""
        z = self.config.eval.zero_shot
        t0 = time.time()
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        protos = zeroshot.class_prototypes(lambda ids, mask: self.encode_text(variables, ids, mask), self.tokenize,
                                           list(z.classes), z.template)
        embeddings, labels = [], []
        for images, y, valid in pipeline.heldout_batches(self.config, self.config.eval.batch_size):
            zimg = self.encode_image(variables, jax.make_array_from_process_local_data(self.batch_sharding, images))
            zimg, y, valid = (multihost_utils.process_allgather(a, tiled=True) if jax.process_count() > 1
                              else np.asarray(a) for a in (zimg, y, valid))
            embeddings.append(np.asarray(zimg)[valid])
            labels.append(np.asarray(y)[valid])
        scale = float(np.exp(np.clip(jax.device_get(state.params["logit_scale"]), 0.0, losses.LOGIT_SCALE_MAX)))
        probs = zeroshot.zero_shot_probs(np.concatenate(embeddings), protos, scale)
        labels = np.concatenate(labels)
        result = eval_metrics.classification_metrics(labels, probs)
        result["num_examples"] = int(len(labels))
        result["num_classes"] = len(z.classes)
        self.writer.write(step, {f"eval/{z.name}/{k}": v for k, v in result.items()})
        if jax.process_index() == 0:
            report = {"task": z.name, "step": step, "classes": list(z.classes), "seed": z.seed, **result,
                      "seconds": time.time() - t0}
            with open(os.path.join(self.workdir, f"eval_{z.name}.json"), "w") as f:
                json.dump(report, f, indent=2)
            logging.info("zero-shot %s at step %d: %s", z.name, step,
                         " ".join(f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float)))
        return result


def _progress(enabled: bool, start: int, total: int):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
