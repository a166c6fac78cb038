"""Optimizer and learning-rate schedule from the config (docs/methods.md, "FLAIR", Training recipe).

AdamW with per-step linear warm-up followed by a cosine decay whose horizon (`schedule_epochs`) is
separate from the training length: FLAIR warms up for 1 epoch and decays over a 100-epoch cosine
while training only 15 epochs, so the learning rate barely decays. Gradients are clipped by global
norm before AdamW; weight decay applies to every parameter unless a path matches
`optim.wd_exclude` (FLAIR decays everything, including `logit_scale`; ViLReF excludes biases,
norms and `logit_scale`).
"""
from __future__ import annotations

import re

import jax
import optax


def param_path(path) -> str:
    """'/'-joined names of a pytree key path, e.g. 'txt/bert/encoder/layer_0/output/dense/bias'."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def make_schedule(optim_config, steps_per_epoch: int) -> optax.Schedule:
    # ViLReF warms up for a fixed 100 steps (`warmup_steps`); FLAIR for one epoch.
    warmup = optim_config.warmup_steps if optim_config.warmup_steps >= 0 else \
        int(round(optim_config.warmup_epochs * steps_per_epoch))
    horizon = max(int(round(optim_config.schedule_epochs * steps_per_epoch)), warmup + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim_config.lr, warmup_steps=warmup, decay_steps=horizon, end_value=0.0)


def weight_decay_mask(params, exclude_patterns) -> dict:
    """True where weight decay applies: every param whose path matches none of the patterns."""
    patterns = [re.compile(p) for p in exclude_patterns]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(p.search(param_path(path)) for p in patterns), params)


def make_optimizer(optim_config, steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(optim_config, steps_per_epoch)
    exclude = tuple(optim_config.wd_exclude)
    adamw = optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                        weight_decay=optim_config.weight_decay,
                        mask=lambda params: weight_decay_mask(params, exclude))
    if optim_config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim_config.grad_clip), adamw), schedule
    return adamw, schedule
