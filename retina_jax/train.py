"""THE trainer: mesh, data, state, jitted step, loop, checkpoints and evaluations.

Implements FLAIR pretraining (METHODS.md section 1), KeepFIT (section 2: the expert stream beside
the public one, the knowledge attention, L_pub + L_mm + L_rev), KeepFIT V2 (section 3: stage `text`,
whole-word masked-LM of the text tower alone; stage `vl`, KeepFIT plus the caption decoder's loss
and caption evaluation) and ViLReF (section 4: report stream with extracted labels, WSCL, momentum
encoders and replicated queues, logit_scale clamp/reset quirks); methods differ by config (towers,
loss terms, data streams, momentum state), not by a forked trainer.

Sharding (ARCHITECTURE.md): one `jax.jit` with NamedShardings on a `data` x `fsdp` mesh from the
config (sharding.py). The batch is sharded over both axes; parameters, optimizer state and EMA
parameters are replicated or FSDP-sharded (`mesh.param_sharding`); the loss is written on the
global batch with row-sharded logits. The train state is built abstractly (`jax.eval_shape`) and
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
from jax.experimental import multihost_utils

from retina_jax import checkpointing, losses, momentum, sharding
from retina_jax.config import ConfigError, validate
from retina_jax.data import files, pipeline
from retina_jax.data.tokenizer import Tokenize
from retina_jax.evals import metrics as eval_metrics
from retina_jax.evals import captions as caption_metrics
from retina_jax.evals import multilabel, zeroshot
from retina_jax.metrics import MetricWriter, Throughput, check_finite
from retina_jax.models import caption_decoder
from retina_jax.models.mlm import MaskedLM
from retina_jax.models.two_tower import TwoTower, build_model, text_config
from retina_jax.optim import make_optimizer
from retina_jax.train_state import TrainState


class Trainer:
    def __init__(self, config, workdir: str):
        validate(config, jax.device_count())
        self.config = config
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.mesh = sharding.make_mesh(config.mesh)
        self.num_batch_shards = sharding.num_batch_shards(self.mesh)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.replicated = sharding.replicated(self.mesh)

        self.tokenize = Tokenize(pipeline.prepare_tokenizer(config, self.workdir), config.text.max_len)
        self.global_batch = config.data.batch_size
        # Real datasets are opened (their CSV/JSONL rows parsed) once, here, and reused by train().
        self.datasets = files.open_datasets(config) if config.data.source == "files" else None
        e = config.data.expert
        self.expert_datasets = files.open_datasets(config, e.datasets, "data.expert.datasets") \
            if e.enabled and e.datasets and not config.mlm.enabled else None
        # Rows dropped while parsing them (data.on_error='skip') start a fresh run's skip count.
        self.bad_rows = files.bad_rows(self.datasets or {}, self.expert_datasets or {})
        if self.bad_rows:
            logging.warning("%d bad dataset rows dropped (data.on_error='skip'), first: %s", len(self.bad_rows),
                            self.bad_rows[0])
        if config.mlm.enabled:  # KeepFIT V2 stage `text`: the text tower alone
            self.model = MaskedLM(text_config(config.model.txt, self.tokenize.vocab_size),
                                  jnp.dtype(config.model.compute_dtype), config.model.remat)
            self.steps_per_epoch = len(pipeline.mlm_split(config, "train")) // self.global_batch
        else:
            self.model = build_model(config.model, self.tokenize.vocab_size, config.data.image_size,
                                     config.text.max_len)
            train_size = pipeline.train_size(config, self.datasets)
            self.steps_per_epoch = max(1, train_size // self.global_batch)
            _check_queue_fraction(config.momentum, train_size)
        self.num_labels = pipeline.num_labels(config)
        self.total_steps = max(1, int(round(config.train.epochs * self.steps_per_epoch)))
        self.tx, self.schedule = make_optimizer(config.optim, self.steps_per_epoch)

        self.abstract_state = jax.eval_shape(self._init_state, jax.random.key(0))
        # Replicated, or parameters with their optimizer state and EMA copy split over `fsdp`.
        self.state_sharding = sharding.state_shardings(self.abstract_state, self.mesh, config.mesh)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state, self.state_sharding)
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_sharding, self.batch_sharding),
                                  out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)
        # Compiled once, on first use; evaluation may run every `eval.every_steps`.
        self.encode_text = jax.jit(lambda v, ids, mask: self.model.apply(v, ids, mask, method="encode_text"))
        self.encode_image = jax.jit(lambda v, img: self.model.apply(v, img, method="encode_image"),
                                    out_shardings=self.batch_sharding)
        self.image_features = jax.jit(lambda v, img: self.model.apply(v, img, method="image_features"),
                                      out_shardings=self.batch_sharding)
        # KeepFIT V2: the caption decoder's image memory and logits; stage `text`'s masked-LM logits.
        self.image_tokens = jax.jit(lambda v, img: self.model.apply(v, img, method="encode_image_tokens")[1],
                                    out_shardings=self.batch_sharding)
        self.caption_logits = jax.jit(
            lambda p, mem, tokens: self.model.apply({"params": p}, mem, tokens, method="caption_logits"))
        self.mlm_logits = jax.jit(lambda p, ids, mask: self.model.apply({"params": p}, ids, mask))
        self.writer = MetricWriter(self.workdir)
        self._stop_signal = None

    # ------------------------------------------------------------------------------ state
    def _dummy_inputs(self):
        size, length = self.config.data.image_size, self.config.text.max_len
        text = (jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), jnp.int32))
        return text if self.config.mlm.enabled else (jnp.zeros((1, size, size, 3), jnp.float32), *text)

    def _init_state(self, rng) -> TrainState:
        params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
        variables = self.model.init({"params": params_rng, "dropout": dropout_rng}, *self._dummy_inputs(), train=False)
        params = variables["params"]
        # A ViT tower has no BatchNorm: batch_stats is then an empty tree.
        m = self.config.momentum
        # ALBEF starts the momentum model as an exact copy of the online one.
        ema_params = jax.tree.map(jnp.copy, params) if m.enabled else {}
        queues = momentum.init_queues(m.queue_size, self.config.model.embed_dim, self.num_labels) \
            if m.queue_size else {}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                          opt_state=self.tx.init(params), rng=jax.random.key_data(state_rng), ema_params=ema_params,
                          queues=queues)

    def init_state(self) -> TrainState:
        init = jax.jit(self._init_state, out_shardings=self.state_sharding)
        return init(jax.random.key(self.config.seed))

    def restore_or_init(self, mngr, data_iter) -> TrainState:
        """The resume order of ARCHITECTURE.md: own workdir > config.resume > config.model_init > scratch.

        With `model.logit_scale_reset` (ViLReF's quirk) the temperature restarts at its initial value,
        in the online and the momentum parameters, whenever a run STARTS (from scratch, `model_init`
        or `config.resume`), but not when a run resumes from its own workdir after an interruption:
        that resume continues bit-identically (docs/methods.md, ViLReF quirks).
        """
        self.skipped_examples = len(self.bad_rows)  # a resumed run reads its count from the checkpoint
        own_resume = mngr.latest_step() is not None
        if own_resume:
            logging.info("resuming from %s step %d", mngr.directory, mngr.latest_step())
            state = checkpointing.restore(mngr, self.abstract_state, data_iter)
            self.skipped_examples = checkpointing.restore_meta(mngr).get("skipped_examples", 0)
        elif self.config.resume:
            other = checkpointing.manager(self.config.resume, read_only=True)
            logging.info("resuming from config.resume=%s step %s", self.config.resume, other.latest_step())
            state = checkpointing.restore(other, self.abstract_state, data_iter)
            self.skipped_examples = checkpointing.restore_meta(other).get("skipped_examples", 0)
            other.close()
        else:
            state = self.init_state()
            if self.config.model_init:
                params, batch_stats = checkpointing.init_from(self.config.model_init, state.params, state.batch_stats,
                                                              self.replicated, self.config.model_init_trees)
                # Loaded replicated; laid out as this run shards its parameters (mesh.param_sharding).
                params = jax.device_put(params, self.state_sharding.params)
                # The momentum model starts as a copy of whatever the online model starts from.
                ema_params = jax.tree.map(jnp.copy, params) if self.config.momentum.enabled else {}
                state = state.replace(params=params, batch_stats=batch_stats, ema_params=ema_params)
        if self.config.model.logit_scale_reset and not self.config.mlm.enabled and not own_resume:
            state = self._reset_logit_scale(state)
        return state

    def _reset_logit_scale(self, state: TrainState) -> TrainState:
        # A fresh buffer per tree: the train step donates its state, and one buffer may not be donated twice.
        init = lambda: jax.device_put(np.float32(self.config.model.logit_scale_init), self.replicated)  # noqa: E731
        logging.info("logit_scale reset to %.4f (model.logit_scale_reset)", self.config.model.logit_scale_init)
        replace = {"params": {**state.params, "logit_scale": init()}}
        if self.config.momentum.enabled:
            replace["ema_params"] = {**state.ema_params, "logit_scale": init()}
        return state.replace(**replace)

    # ------------------------------------------------------------------------------- step
    def _loss(self, out, batch, logit_scale):
        if self.config.loss.name == "flair":
            fn, args = losses.flair_loss, (out["zimg"], out["ztxt"], batch["category_id"])
        else:
            fn, args = losses.clip_loss, (out["zimg"], out["ztxt"])
        return losses.scoped(fn, *self._scope())(*args, logit_scale=logit_scale)

    def _scope(self):
        """(num_groups, row_sharding) of `losses.scoped` for `config.loss.scope`: 'local' computes
        the loss per device (negatives only from the same device, as the original), 'global' over
        the whole batch with row-sharded logits."""
        if self.config.loss.scope == "local":
            return self.num_batch_shards, None
        return 1, sharding.rows_sharding(self.mesh)

    def _wscl(self, out, batch, logit_scale, state: TrainState, momentum_out):
        """ViLReF's WSCL with this step's keys (momentum or online features) and the queue."""
        w, m = self.config.loss.wscl, self.config.momentum
        kwargs = {}
        if momentum_out is not None:
            kwargs.update(momentum_img=momentum_out["zimg"], momentum_txt=momentum_out["ztxt"])
            if m.key_features == "momentum":
                kwargs.update(keys_img=momentum_out["zimg"], keys_txt=momentum_out["ztxt"])
        kwargs.update(self._queue(state))
        return losses.wscl_loss(out["zimg"], out["ztxt"], batch["labels"], logit_scale, coupling=w.coupling,
                                alpha=w.alpha, row_sharding=sharding.rows_sharding(self.mesh), **kwargs)

    def _wscl_statistics(self, out, batch, params, state: TrainState, momentum_out) -> dict:
        """False-negative fractions and the softmax mass on the queue of this step's image-to-text rows."""
        m = self.config.momentum
        keys = momentum_out["ztxt"] if momentum_out is not None and m.key_features == "momentum" else out["ztxt"]
        queue = {k: v for k, v in self._queue(state).items() if k != "queue_img"}
        return losses.wscl_statistics(out["zimg"], keys, batch["labels"], params["logit_scale"],
                                      coupling=self.config.loss.wscl.coupling,
                                      row_sharding=sharding.rows_sharding(self.mesh), **queue)

    def _queue(self, state: TrainState) -> dict:
        """The queue as the loss reads it: no slot counts before `momentum.queue_start_step`."""
        m = self.config.momentum
        if not m.queue_size:
            return {}
        q = state.queues
        valid = q.valid & (state.step >= m.queue_start_step) if m.queue_start_step else q.valid
        return dict(queue_img=q.img, queue_txt=q.txt, queue_labels=q.labels, queue_valid=valid)

    def _keepfit(self, params, batch_stats, out, batch, rng):
        """KeepFIT's expert pass and loss (METHODS.md section 2) -> (loss, terms, batch_stats).

        The expert pairs go through the same towers in train mode AFTER the public batch, starting
        from the statistics the public pass left: BatchNorm is updated by the public pass, then the
        expert pass, as the original's two forward calls. The knowledge attention (its own dropout
        draw) revises the public image embeddings into text space from the expert pairs.
        """
        k = self.config.loss.keepfit
        kout, updates = self.model.apply(
            {"params": params, "batch_stats": batch_stats}, batch["expert_image"], batch["expert_input_ids"],
            batch["expert_attention_mask"], train=True, image_tokens=bool(k.gen_weight),
            rngs={"dropout": jax.random.fold_in(rng, 2)}, mutable=["batch_stats"])
        revised = None
        if k.rev_weight:
            revised = self.model.apply({"params": params}, out["zimg"], kout["zimg"], kout["ztxt"], train=True,
                                       method=TwoTower.revise, rngs={"dropout": jax.random.fold_in(rng, 3)})
        num_groups, row_sharding = self._scope()
        loss, terms = losses.keepfit_loss(
            out["zimg"], out["ztxt"], batch["category_id"], kout["zimg"], kout["ztxt"], revised, params["logit_scale"],
            mm_weight=k.mm_weight, rev_weight=k.rev_weight, num_groups=num_groups, row_sharding=row_sharding)
        if k.gen_weight:
            # KeepFIT V2: the decoder captions the expert images from their spatial tokens.
            inputs, targets, weights = caption_decoder.shift_tokens(batch["expert_input_ids"],
                                                                    batch["expert_attention_mask"])
            logits = self.model.apply({"params": params}, kout["image_tokens"], inputs, train=True,
                                      method=TwoTower.caption_logits, rngs={"dropout": jax.random.fold_in(rng, 4)})
            terms["cap"], _ = losses.token_cross_entropy(logits, targets, weights)
            loss = loss + k.gen_weight * terms["cap"]
        return loss, terms, updates.get("batch_stats", batch_stats)

    def _mlm(self, params, batch, rng):
        """KeepFIT V2 stage `text`: whole-word masked-LM loss and accuracy over the masked tokens."""
        logits = self.model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], train=True,
                                  rngs={"dropout": rng})
        return losses.token_cross_entropy(logits, batch["mlm_labels"], batch["mlm_weights"])

    def _forward_backward(self, state: TrainState, batch):
        """The step's forward and backward passes -> (params as used, ema_params, momentum_out, loss,
        (batch_stats, outputs, loss terms, extra metrics), gradients)."""
        config = self.config
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        params = dict(state.params)
        contrastive = not config.mlm.enabled
        if contrastive and config.model.logit_scale_clamp == "before_forward":
            # FLAIR clamps logit_scale.data in place before every forward: AdamW then steps from the
            # clamped value, so the clamp is applied to the stored parameter, not only inside the loss.
            params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, losses.LOGIT_SCALE_MAX)

        ema_params, momentum_out = state.ema_params, None
        if config.momentum.enabled:
            # ALBEF order: EMA update from the current online params, then the momentum forward in
            # train mode as ALBEF's (its own dropout draw; BatchNorm on batch statistics like the
            # queries, its running averages discarded).
            m = config.momentum
            ema_params = momentum.ema_update(state.ema_params, params,
                                             momentum.decay_at(state.step, m.decay, m.schedule, self.total_steps))
            momentum_out, _ = self.model.apply(
                {"params": ema_params, "batch_stats": state.batch_stats}, batch["image"], batch["input_ids"],
                batch["attention_mask"], train=True, rngs={"dropout": jax.random.fold_in(rng, 1)},
                mutable=["batch_stats"])
            momentum_out = jax.lax.stop_gradient(momentum_out)

        def loss_fn(params):
            if config.mlm.enabled:
                loss, accuracy = self._mlm(params, batch, rng)
                return loss, ({}, {}, {}, {"train/mlm_accuracy": accuracy})
            out, updates = self.model.apply(
                {"params": params, "batch_stats": state.batch_stats}, batch["image"], batch["input_ids"],
                batch["attention_mask"], train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
            # Embeddings stay split by rows like the batch: with FSDP-split projection kernels XLA
            # would otherwise split them (and their gradients) by feature, then copy them whole to
            # meet the row-sharded logits.
            out = {**out, **{k: jax.lax.with_sharding_constraint(out[k], self.batch_sharding) for k in ("zimg", "ztxt")}}
            batch_stats, terms = updates.get("batch_stats", {}), {}
            if config.data.expert.enabled:
                loss, terms, batch_stats = self._keepfit(params, batch_stats, out, batch, rng)
            elif config.loss.name == "wscl":
                loss = self._wscl(out, batch, params["logit_scale"], state, momentum_out)
            else:
                loss = self._loss(out, batch, params["logit_scale"])
            return loss, (batch_stats, out, terms, {})

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return params, ema_params, momentum_out, loss, aux, grads

    def loss_and_grads(self, state: TrainState, batch):
        """The loss and gradients the train step applies, without updating anything: to check that
        shardings, compute dtypes and rematerialisation leave the step's numbers unchanged."""
        _, _, _, loss, _, grads = self._forward_backward(self._queue_start(state), batch)
        return loss, grads

    def _queue_start(self, state: TrainState) -> TrainState:
        """At `momentum.queue_start_step` the momentum towers restart as copies of the online ones
        and the queue restarts empty; before it the queue is never written (so never read)."""
        start = self.config.momentum.queue_start_step
        if not start:
            return state
        return state.replace(ema_params=momentum.resync_at(state.ema_params, state.params, state.step, start),
                             queues=momentum.restart_at(state.queues, state.step, start))

    def _train_step(self, state: TrainState, batch):
        config, contrastive = self.config, not self.config.mlm.enabled
        state = self._queue_start(state)
        params, ema_params, momentum_out, loss, (batch_stats, out, terms, extra), grads = \
            self._forward_backward(state, batch)
        updates, opt_state = self.tx.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if contrastive and config.model.logit_scale_clamp == "after_step":
            # ViLReF (Chinese-CLIP) clamps logit_scale.data after every optimizer step.
            new_params["logit_scale"] = jnp.clip(new_params["logit_scale"], 0.0, losses.LOGIT_SCALE_MAX)
        metrics = {"train/loss": loss, "train/lr": self.schedule(state.step),
                   "train/grad_norm": optax.global_norm(grads),
                   **{f"train/loss_{name}": value for name, value in terms.items()}, **extra}
        if contrastive:
            metrics["train/logit_scale"] = jnp.exp(params["logit_scale"])
            # Collapse gauge: the norm of the batch-mean embedding (1 = every example the same vector).
            for key, name in (("zimg", "img"), ("ztxt", "txt")):
                metrics[f"train/mean_norm_{name}"] = jnp.linalg.norm(jnp.mean(out[key].astype(jnp.float32), axis=0))
        if contrastive and config.loss.name == "wscl":
            metrics.update({f"train/wscl_{k}": v for k, v in self._wscl_statistics(out, batch, params, state,
                                                                                     momentum_out).items()})
        if momentum_out is not None:
            # How closely the momentum model tracks the online one (cosine of the same examples'
            # embeddings): far below 1, the keys and queue are stale and the loss can fall by moving
            # every feature away from them instead of separating the examples (RESULTS.md, ViLReF).
            for key, name in (("zimg", "img"), ("ztxt", "txt")):
                metrics[f"train/momentum_cos_{name}"] = jnp.mean(jnp.sum(out[key] * momentum_out[key], axis=-1))
        queues = state.queues
        if config.momentum.queue_size:
            # The whole global batch enters the replicated queue: momentum features when there is a
            # momentum model, else the online ones (detached).
            source = momentum_out if momentum_out is not None else out
            queues = momentum.enqueue_from(queues, state.step, config.momentum.queue_start_step, source["zimg"],
                                           source["ztxt"], batch["labels"])
            metrics["train/queue_fill"] = jnp.mean(queues.valid.astype(jnp.float32))
        return state.replace(step=state.step + 1, params=new_params, batch_stats=batch_stats, opt_state=opt_state,
                             ema_params=ema_params, queues=queues), metrics

    # ------------------------------------------------------------------------------- loop
    def _on_sigterm(self, signum, frame):
        logging.warning("signal %d received: saving a checkpoint after the current step", signum)
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        """True on every process as soon as any one of them has been sent SIGTERM, so that all save
        the same step (a checkpoint is written collectively) and exit together. One tiny all-gather
        of a host flag per step when there are several processes."""
        local = self._stop_signal is not None
        if jax.process_count() == 1:
            return local
        return bool(np.any(multihost_utils.process_allgather(np.asarray([local]))))

    def train(self) -> dict:
        """Train to `total_steps` (resuming if possible); returns the final eval metrics (if any)."""
        config = self.config
        mngr = checkpointing.manager(checkpointing.checkpoint_dir(self.workdir), max_to_keep=config.train.max_to_keep,
                                     async_save=config.train.async_checkpoint)
        if config.mlm.enabled:
            data_iter = self.data_iter = iter(pipeline.mlm_dataset(config, self.tokenize.path))
        else:
            data_iter = self.data_iter = iter(pipeline.train_dataset(config, self.tokenize, self.datasets,
                                                                     self.expert_datasets))
        extractor = pipeline.label_extractor(config)
        if extractor is not None and jax.process_index() == 0:
            self.label_coverage = pipeline.log_label_coverage(config, extractor)
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
                checkpointing.save(mngr, done, state, data_iter, force=force,
                                   meta={"skipped_examples": self.skipped_examples})
                last_saved = done

        try:
            for step in range(start, self.total_steps):
                began = time.perf_counter()
                batch = next(data_iter)
                data_wait = time.perf_counter() - began
                # Bad examples passed over to fill this batch (data.on_error='skip'); a host count
                # that make_global leaves behind.
                self.skipped_examples += int(batch.get(files.SKIPPED, 0))
                state, metrics = self.train_step(state, pipeline.make_global(batch, self.batch_sharding))
                throughput.add(self.global_batch, data_wait)
                done = step + 1
                if done % config.train.log_every == 0 or done == self.total_steps:
                    metrics = jax.device_get(metrics)
                    check_finite(done, metrics)
                    metrics.update(throughput.report())
                    metrics["train/epoch"] = done / self.steps_per_epoch
                    if config.data.on_error == "skip":
                        metrics["train/skipped_examples"] = self.skipped_examples
                    self.writer.write(done, metrics)
                    if progress is not None:
                        progress.set_postfix(loss=f"{float(metrics['train/loss']):.4f}",
                                             ex_s=f"{metrics['perf/examples_per_sec']:.0f}",
                                             data_wait=f"{metrics['perf/data_wait_seconds']:.2f}s")
                if progress is not None:
                    progress.update(1)
                if done % config.train.checkpoint_every == 0 and done != self.total_steps:
                    with throughput.outside():
                        save(done)
                if self._stop_requested():
                    save(done, force=True)
                    mngr.wait_until_finished()
                    self.state = state
                    logging.warning("stopped by signal %s at step %d; checkpoint saved",
                                    self._stop_signal or "SIGTERM on another process", done)
                    return {}
                if config.eval.every_steps and done % config.eval.every_steps == 0 and done != self.total_steps:
                    with throughput.outside():
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

    def _gather(self, fn, variables, batches):
        """Run `fn(variables, images)` over held-out batches; every process gets all valid rows."""
        outputs, labels = [], []
        for images, y, valid in batches:
            out = fn(variables, jax.make_array_from_process_local_data(self.batch_sharding, images))
            out, y, valid = (multihost_utils.process_allgather(a, tiled=True) if jax.process_count() > 1
                             else np.asarray(a) for a in (out, y, valid))
            outputs.append(np.asarray(out)[valid])
            labels.append(np.asarray(y)[valid])
        return np.concatenate(outputs), np.concatenate(labels)

    def evaluate(self, state: TrainState, step: int) -> dict:
        """Zero-shot on the held-out synthetic task and, when enabled, ViLReF's multi-label linear probe
        and fine-tuning and KeepFIT V2's caption metrics; stage `text` reports its held-out masked-token
        loss and accuracy instead. Writes eval/<task>/<metric> and a JSON report per task."""
        if self.config.mlm.enabled:
            return self._mlm_eval(state, step)
        result = self._zero_shot(state, step)
        if self.config.eval.linear_probe.enabled or self.config.eval.finetune.enabled:
            result.update(self._multilabel(state, step))
        if self.config.eval.captions.enabled:
            result.update(self._captions(state, step))
        return result

    def _report(self, name: str, step: int, result: dict, **extra):
        self.writer.write(step, {f"eval/{name}/{k}": v for k, v in result.items()})
        if jax.process_index() == 0:
            with open(os.path.join(self.workdir, f"eval_{name}.json"), "w") as f:
                json.dump({"task": name, "step": step, **extra, **result}, f, indent=2)
            logging.info("%s at step %d: %s", name, step,
                         " ".join(f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float)))

    def _zero_shot(self, state: TrainState, step: int) -> dict:
        z = self.config.eval.zero_shot
        t0 = time.time()
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        protos = zeroshot.class_prototypes(lambda ids, mask: self.encode_text(variables, ids, mask), self.tokenize,
                                           list(z.classes), z.templates, language=z.language)
        embeddings, labels = self._gather(self.encode_image, variables,
                                          pipeline.heldout_batches(self.config, self.config.eval.batch_size))
        scale = float(np.exp(np.clip(jax.device_get(state.params["logit_scale"]), 0.0, losses.LOGIT_SCALE_MAX)))
        result = eval_metrics.classification_metrics(labels, zeroshot.zero_shot_probs(embeddings, protos, scale))
        result["num_examples"] = int(len(labels))
        result["num_classes"] = len(z.classes)
        self._report(z.name, step, result, classes=list(z.classes), seed=z.seed, language=z.language,
                     templates=list(z.templates), seconds=time.time() - t0)
        return result

    def _multilabel(self, state: TrainState, step: int) -> dict:
        """Sigmoid heads on the pre-projection image feature over the synthetic findings (macro AUC,
        mAP). The pretraining state is never touched: `multilabel.finetune` copies the tower's
        variables before its donating step (the original fine-tunes the model in place)."""
        config, out = self.config, {}
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        label = lambda example: example["labels"]  # noqa: E731
        data = {}
        for split in ("train", "test"):
            batches = pipeline.heldout_batches(config, config.eval.batch_size, pipeline.multilabel_source(config, split),
                                               label)
            if config.eval.finetune.enabled:
                batches = list(batches)  # fine-tuning needs the images themselves
                data[split + "_images"] = np.concatenate([b[0][b[2]] for b in batches])
            data[split] = self._gather(self.image_features, variables, batches)
        if config.eval.linear_probe.enabled:
            lp = config.eval.linear_probe
            t0 = time.time()
            result = multilabel.linear_probe(*data["train"], *data["test"], l2=lp.l2, steps=lp.steps, lr=lp.lr,
                                             seed=config.seed)
            self._report("multilabel_linear_probe", step, result, seconds=time.time() - t0)
            out.update({f"linear_probe/{k}": v for k, v in result.items()})
        if config.eval.finetune.enabled:
            ft = config.eval.finetune
            t0 = time.time()
            tower = {"params": state.params["img"], "batch_stats": state.batch_stats.get("img", {})}
            result = multilabel.finetune(
                self._tower_features, tower, data["train_images"], data["train"][1], data["test_images"],
                data["test"][1], feature_dim=data["train"][0].shape[1], steps=ft.steps, batch_size=ft.batch_size,
                lr=ft.lr, weight_decay=ft.weight_decay, seed=config.seed)
            self._report("multilabel_finetune", step, result, seconds=time.time() - t0)
            out.update({f"finetune/{k}": v for k, v in result.items()})
        return out

    def _mlm_eval(self, state: TrainState, step: int) -> dict:
        """Masked-token loss and accuracy over the held-out texts (fixed masks), all tokens pooled."""
        t0 = time.time()
        nll_sum = correct = count = 0.0
        for batch in pipeline.mlm_heldout_batches(self.config, self.tokenize.path, self.config.eval.batch_size):
            batch = pipeline.make_global(batch, self.batch_sharding)
            logits = self.mlm_logits(state.params, batch["input_ids"], batch["attention_mask"])
            loss, accuracy = losses.token_cross_entropy(logits, batch["mlm_labels"], batch["mlm_weights"])
            n = float(jnp.sum(batch["mlm_weights"]))
            nll_sum, correct, count = nll_sum + float(loss) * n, correct + float(accuracy) * n, count + n
        result = {"loss": nll_sum / max(count, 1.0), "accuracy": correct / max(count, 1.0),
                  "num_masked_tokens": int(count)}
        self._report("mlm_heldout", step, result, heldout_texts=self.config.mlm.heldout_size, seconds=time.time() - t0)
        return {f"mlm/{k}": v for k, v in result.items()}

    def _captions(self, state: TrainState, step: int) -> dict:
        """KeepFIT V2: generate captions for held-out expert images (greedy, or beam search with
        `eval.captions.beam_size` > 1) and score them against the corpus captions."""
        c = self.config.eval.captions
        t0 = time.time()
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        source = pipeline.caption_source(self.config)
        memory, indices = self._gather(self.image_tokens, variables,
                                       pipeline.heldout_batches(self.config, self.config.eval.batch_size, source,
                                                                lambda example: example["index"]))
        tok = self.tokenize.tokenizer
        ids = {name: tok.token_to_id(name) for name in ("[CLS]", "[SEP]", "[PAD]")}
        hypotheses = []
        for start in range(0, len(memory), self.config.eval.batch_size):
            chunk = jnp.asarray(memory[start:start + self.config.eval.batch_size])

            def log_probs(tokens, t, chunk=chunk):
                mem = jnp.repeat(chunk, tokens.shape[0] // chunk.shape[0], axis=0)  # beams share their image
                return jax.nn.log_softmax(self.caption_logits(state.params, mem, tokens)[:, t - 1], axis=-1)

            args = dict(batch_size=len(chunk), max_len=c.max_len, bos_id=ids["[CLS]"], eos_id=ids["[SEP]"],
                        pad_id=ids["[PAD]"])
            tokens = caption_decoder.greedy_decode(log_probs, **args) if c.beam_size == 1 else \
                caption_decoder.beam_search(log_probs, beam_size=c.beam_size, **args)
            hypotheses += tok.decode_batch(tokens.tolist(), skip_special_tokens=True)
        references = [source.record(int(i))["caption"] for i in indices]
        result = caption_metrics.caption_metrics(hypotheses, references)
        result["num_examples"] = len(references)
        examples = [{"index": int(i), "generated": h, "reference": r}
                    for i, h, r in list(zip(indices, hypotheses, references))[:12]]
        self._report("captions", step, result, beam_size=c.beam_size, seconds=time.time() - t0, examples=examples)
        return {f"captions/{k}": v for k, v in result.items()}

    def _tower_features(self, variables, images, train: bool):
        """(pre-projection features, new BatchNorm statistics or None) of the image tower alone."""
        if not train:
            return self.model.img.apply(variables, images, train=False), None
        features, updates = self.model.img.apply(variables, images, train=True, mutable=["batch_stats"])
        return features, updates.get("batch_stats", {})


def _check_queue_fraction(m, train_size: int):
    """The queue must stay well under the training set (`momentum.queue_max_fraction`): the paper's
    65,536 of 451,956 pairs is 0.145; at the dataset's size it would hold every example's own key
    from the last epoch, a negative drawn from a model one epoch old."""
    if m.queue_size and m.queue_size > m.queue_max_fraction * train_size:
        raise ConfigError(f"invalid config:\n  config.momentum.queue_size: {m.queue_size} is over "
                          f"momentum.queue_max_fraction={m.queue_max_fraction} of the {train_size} training examples "
                          f"(at most {int(m.queue_max_fraction * train_size)}); use a smaller queue")


def _progress(enabled: bool, start: int, total: int):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
