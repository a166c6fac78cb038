"""The generic trainer: mesh, train state and its shardings, the jitted step, the loop, checkpoints,
metrics and preemption (docs/architecture.md, "The trainer").

What is trained is the method's (`config.method`, retina_jax/methods/): its model, data streams,
extra state and the loss of one step. What is measured is the evaluators' (`config.evals`,
retina_jax/evals/), which see the model only through the public `Encoder`.

Sharding: one `jax.jit` with NamedShardings on a `data` x `fsdp` mesh (sharding.py). The batch is
sharded over both axes; parameters, optimizer state and EMA parameters are replicated or
FSDP-sharded (`mesh.param_sharding`). The train state is built abstractly (`jax.eval_shape`) and
materialised directly with its shardings; the same abstract state is orbax's restore target, so a
checkpoint written on one mesh restores onto another.
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

from retina_jax import checkpointing, distributed, evals, plots, sharding
from retina_jax.config import validate
from retina_jax.data import files, pipeline
from retina_jax.data.tokenizer import Tokenize
from retina_jax.encoder import Encoder
from retina_jax.methods import method_class
from retina_jax.metric_writer import MetricWriter, Throughput, check_finite, progress_bar
from retina_jax.optim import make_optimizer
from retina_jax.train_state import TrainState


class Trainer:
    def __init__(self, config, workdir: str):
        validate(config, jax.device_count())
        self.config = config
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.mesh = sharding.make_mesh(config.mesh)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.replicated = sharding.replicated(self.mesh)
        self.tokenize = Tokenize(pipeline.prepare_tokenizer(config, self.workdir), config.text.max_len)
        self.global_batch = config.data.batch_size
        self.method = method_class(config)(config, self.tokenize, self.mesh)
        self.model = self.method.model
        self.steps_per_epoch, self.total_steps = self.method.steps_per_epoch, self.method.total_steps
        # Rows dropped while parsing the datasets (data.on_error='skip') start a fresh run's skip count.
        self.bad_rows = self.method.bad_rows()
        if self.bad_rows:
            logging.warning("%d bad rows dropped (data.on_error='skip'), first: %s", len(self.bad_rows), self.bad_rows[0])
        self.tx, self.schedule = make_optimizer(config.optim, self.steps_per_epoch)

        abstract = jax.eval_shape(self._init_state, jax.random.key(0))
        # Replicated, or parameters with their optimizer state and EMA copy split over `fsdp`.
        self.state_sharding = sharding.state_shardings(abstract, self.mesh, config.mesh)
        self.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                           self.state_sharding)
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_sharding, self.batch_sharding),
                                  out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)
        self.encoder = Encoder(self.model, self.tokenize, self.mesh)
        self.evaluators = evals.build(config, out_dir=f"{self.workdir}/transfer", data_root=config.eval_data_root)
        self.writer = MetricWriter(self.workdir, wandb_project=config.train.wandb, run_config=config.to_dict())
        self._stop_signal = None

    # ------------------------------------------------------------------------------ state
    def _init_state(self, rng) -> TrainState:
        params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
        variables = self.model.init({"params": params_rng, "dropout": dropout_rng}, *self.method.dummy_inputs(),
                                    train=False)
        params = variables["params"]
        # A model without BatchNorm (ViT, the text tower alone) has an empty batch_stats tree.
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                          opt_state=self.tx.init(params), rng=jax.random.key_data(state_rng),
                          **self.method.extra_state(params))

    def init_state(self) -> TrainState:
        return jax.jit(self._init_state, out_shardings=self.state_sharding)(jax.random.key(self.config.seed))

    def restore_or_init(self, mngr, data_iter) -> TrainState:
        """The resume order of docs/architecture.md: own workdir > config.resume > config.model_init >
        scratch. `method.on_run_start` (ViLReF's logit_scale reset) applies whenever a run STARTS, not
        when it resumes from its own workdir after an interruption: that resume is bit-identical."""
        self.skipped_examples = len(self.bad_rows)  # a resumed run reads its count from the checkpoint
        own_resume = mngr.latest_step() is not None
        if own_resume or self.config.resume:
            source = mngr if own_resume else checkpointing.manager(self.config.resume, read_only=True)
            logging.info("resuming from %s step %s", source.directory, source.latest_step())
            state = checkpointing.restore(source, self.abstract_state, data_iter)
            self.skipped_examples = checkpointing.restore_meta(source).get("skipped_examples", 0)
            if not own_resume:
                source.close()
        else:
            state = self.init_state()
            if self.config.model_init:
                params, batch_stats = checkpointing.init_from(self.config.model_init, state.params, state.batch_stats,
                                                              self.replicated, self.config.model_init_trees)
                # Loaded replicated; laid out as this run shards its parameters (mesh.param_sharding).
                state = self.method.with_params(state, jax.device_put(params, self.state_sharding.params),
                                                batch_stats)
        return state if own_resume else self.method.on_run_start(state, self.replicated)

    # ------------------------------------------------------------------------------- step
    def _forward_backward(self, state: TrainState, batch):
        """The method's step up to its gradients: the step's key is fold_in(rng, step), so a resumed
        run redraws every dropout mask and augmentation identically."""
        state = self.method.begin_step(state)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        params, ctx = self.method.prepare(state, batch, rng)
        (loss, aux), grads = jax.value_and_grad(self.method.loss, has_aux=True)(params, state, batch, rng, ctx)
        return state, params, ctx, loss, aux, grads

    def loss_and_grads(self, state: TrainState, batch):
        """The loss and gradients the train step applies, without updating anything: to check that
        shardings, compute dtypes and rematerialisation leave the step's numbers unchanged."""
        _, _, _, loss, _, grads = self._forward_backward(state, batch)
        return loss, grads

    def _train_step(self, state: TrainState, batch):
        state, params, ctx, loss, aux, grads = self._forward_backward(state, batch)
        updates, opt_state = self.tx.update(grads, state.opt_state, params)
        new_params, fields, method_metrics = self.method.finish_step(
            state, params, optax.apply_updates(params, updates), aux, ctx, batch)
        metrics = {"train/loss": loss, "train/lr": self.schedule(state.step), "train/grad_norm": optax.global_norm(grads),
                   **{f"train/loss_{name}": value for name, value in aux["terms"].items()}, **aux["metrics"],
                   **method_metrics}
        return state.replace(step=state.step + 1, params=new_params, opt_state=opt_state, **fields), metrics

    # ------------------------------------------------------------------------------- loop
    def _on_sigterm(self, signum, frame):
        logging.warning("signal %d received: saving a checkpoint after the current step", signum)
        self._stop_signal = signum

    def train(self) -> dict:
        """Train to `total_steps` (resuming if possible); returns the final eval metrics (if any)."""
        config = self.config
        mngr = checkpointing.manager(checkpointing.checkpoint_dir(self.workdir), max_to_keep=config.train.max_to_keep,
                                     async_save=config.train.async_checkpoint)
        data_iter = self.data_iter = self.method.train_iter()
        state = self.restore_or_init(mngr, data_iter)
        start = int(jax.device_get(state.step))
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._write_run_info(start)
        progress = progress_bar(config.train.progress, start, self.total_steps)
        throughput = Throughput()
        last_saved = mngr.latest_step()
        preemption = distributed.PreemptionCheck(lambda: self._stop_signal is not None,
                                                   config.train.stop_check_every)

        def save(done: int, force: bool = False):
            nonlocal last_saved
            if last_saved != done:  # e.g. SIGTERM right after a periodic save of the same step
                checkpointing.save(mngr, done, state, data_iter, force=force,
                                   meta={"skipped_examples": self.skipped_examples})
                last_saved = done

        try:
            for step in range(start, self.total_steps):
                began = time.perf_counter()
                batch = next(data_iter)
                data_wait = time.perf_counter() - began
                # Bad examples passed over to fill this batch (data.on_error='skip'), a host count.
                self.skipped_examples += int(batch.get(files.SKIPPED, 0))
                state, metrics = self.train_step(state, pipeline.make_global(batch, self.batch_sharding))
                throughput.add(self.global_batch, data_wait)
                done = step + 1
                if done % config.train.log_every == 0 or done == self.total_steps:
                    self._log(done, jax.device_get(metrics), throughput, progress)
                if progress is not None:
                    progress.update(1)
                if done % config.train.checkpoint_every == 0 and done != self.total_steps:
                    with throughput.outside():
                        save(done)
                if preemption.requested(done):
                    save(done, force=True)
                    mngr.wait_until_finished()
                    self.state = state
                    logging.warning("stopped by signal %s at step %d; checkpoint saved",
                                    self._stop_signal or "SIGTERM on another process", done)
                    return {}
                if done != self.total_steps and (due := self._due(done)):
                    with throughput.outside():
                        self.evaluate(state, step=done, evaluators=due)
            save(self.total_steps, force=True)
            mngr.wait_until_finished()
        finally:
            signal.signal(signal.SIGTERM, previous)
            if progress is not None:
                progress.close()
            mngr.close()
            data_iter.close()  # stops grain's workers and frees the batches they left in shared memory
        self.state = state
        result = self.evaluate(state, self.total_steps, self._due(self.total_steps)) if config.train.eval_at_end else {}
        self.writer.close()
        plots.report(self.workdir)
        return result

    def _due(self, step: int) -> list:
        """The evaluators due after `step`: every_steps divides it, or the last step and at_end."""
        return [e for e in self.evaluators if (e.settings.every_steps and step % e.settings.every_steps == 0)
                or (step == self.total_steps and e.settings.at_end)]

    def _log(self, done: int, metrics: dict, throughput: Throughput, progress):
        check_finite(done, metrics)
        metrics.update(throughput.report())
        metrics["train/epoch"] = done / self.steps_per_epoch
        if self.config.data.on_error == "skip":
            metrics["train/skipped_examples"] = self.skipped_examples
        self.writer.write(done, metrics)
        if progress is not None:
            progress.set_postfix(loss=f"{float(metrics['train/loss']):.4f}", ex_s=f"{metrics['perf/examples_per_sec']:.0f}",
                                 data_wait=f"{metrics['perf/data_wait_seconds']:.2f}s")

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
    def restore_latest(self, step: int | None = None) -> TrainState:
        """The checkpoint of `step` (default the latest) of this workdir (for `retina_jax.evaluate`)."""
        mngr = checkpointing.manager(checkpointing.checkpoint_dir(self.workdir), read_only=True)
        try:
            return checkpointing.restore(mngr, self.abstract_state, step=step)
        finally:
            mngr.close()

    def evaluate(self, state: TrainState, step: int, evaluators=None) -> dict:
        """`evaluators` (default: the config.evals entries marked at_end) on the state's model; each
        writes eval/<report_name>/<metric> and eval_<report_name>.json in the workdir. Returns their
        metrics in one dict, each under its evaluator's prefix."""
        encoder, result = self.encoder.at(state.params, state.batch_stats, step=step, checkpoint=self.workdir), {}
        for evaluator in [e for e in self.evaluators if e.settings.at_end] if evaluators is None else evaluators:
            t0 = time.time()
            metrics, extra = evaluator.run(encoder)
            extra.pop("result", None)  # a task evaluator's whole result is in its own report
            self.writer.report(evaluator.report_name, step, metrics, seconds=time.time() - t0, **extra)
            result.update({f"{evaluator.metric_prefix}{k}": v for k, v in metrics.items()})
        return result

