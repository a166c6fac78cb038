"""Config loading and the cross-field `validate(config)` run before anything is built.

Config files follow big_vision: `get_config(arg)` with `path.py:arg` on the command line. Every
default lives in `configs/common.py`; `validate` names each offending field so a wrong config fails
in a second with a readable message instead of minutes into a run.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os

import ml_collections

# The allowed values of each switch are owned by the module that implements it.
from retina_jax import evals, methods
from retina_jax.data.files import FORMATS as FILE_FORMATS, MIXING, ON_ERROR
from retina_jax.data.labels import LANGUAGES as REPORT_LANGUAGES, UNCERTAIN
from retina_jax.data.synthetic import MODALITIES
from retina_jax.data.transforms import AUGMENT_KINDS, PREPROCESS_MODES
from retina_jax.evals.zeroshot import LANGUAGES as PROMPT_LANGUAGES
from retina_jax.errors import ConfigError
from retina_jax.losses import WSCL_COUPLINGS
from retina_jax.models.bert import TEXT_POOLING_MODES
from retina_jax.models.dropout import DROPOUT_DRAWS
from retina_jax.models.knowledge_attention import KNOWLEDGE_SOFTMAX_AXES
from retina_jax.models.two_tower import IMAGE_TOWERS, PROJECTIONS
from retina_jax.sharding import PARAM_SHARDINGS, mesh_shape

LOSSES = ("flair", "clip", "wscl")
STREAMS = ("flair", "reports")
REPORT_LABELS = ("extract", "given")
LOGIT_SCALE_CLAMPS = ("before_forward", "after_step")
LOSS_SCOPES = ("global", "local")
DTYPES = ("float32", "bfloat16")
RESNET_DEPTHS = (18, 34, 50, 101, 152)


DATA_SOURCES = ("synthetic", "files")
log = logging.getLogger(__name__)


def load(spec: str) -> ml_collections.ConfigDict:
    """Load `path/to/config.py[:arg]` the way `--config` does (for tests, notebooks, evaluate)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location("_retina_jax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def from_run(workdir: str):
    """The config a run directory was trained with (its run_info.json), as `retina-jax evaluate` and
    `predict` read it: this version's defaults with the run's values; its own learned tokenizer;
    no model_init or resume (the run's own checkpoints hold every weight)."""
    from configs import common
    path = os.path.join(workdir, "run_info.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{workdir}: no run_info.json, so not a training run directory (train there first, or "
                          "pass --config)")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)["config"]
    config = common.get_config()
    values = flatten(saved)
    # Entries keyed by the user's names (datasets, added evaluators) are copied whole.
    free = {"data.datasets": saved["data"]["datasets"], "data.expert.datasets": saved["data"]["expert"]["datasets"]}
    with config.unlocked():
        for field, entries in free.items():
            node = config.data if field == "data.datasets" else config.data.expert
            node[field.rsplit(".", 1)[1]] = ml_collections.ConfigDict(entries)
        for name, entry in saved.get("evals", {}).items():
            if name not in config.evals:
                config.evals[name] = ml_collections.ConfigDict(entry)
    known = flatten(config)  # a run's config may hold fields this version no longer has
    dropped = sorted(k for k in values if k not in known)
    if dropped:
        log.warning("%s: fields this version does not have, ignored: %s", path, dropped)
    override(config, {k: v for k, v in values.items() if k in known})
    if config.text.tokenizer == "learn":  # the run learned its vocabulary into its workdir
        config.text.tokenizer = os.path.join(os.path.abspath(workdir), "tokenizer")
    config.model_init, config.model_init_trees, config.resume = "", (), ""
    return config


def override(config, fields: dict) -> ml_collections.ConfigDict:
    """Set dotted fields in place (`{'train.epochs': 2.0}`), as `--config.train.epochs=2` does."""
    for key, value in fields.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"config has no field {key!r}")
        node[leaf] = value
    return config


def validate(config, num_devices: int) -> None:
    """Raise ConfigError naming every field that makes the config unrunnable on `num_devices`."""
    errors: list[str] = []

    def check(ok: bool, field: str, why: str):
        if not ok:
            errors.append(f"config.{field}: {why}")

    data, fsdp = mesh_shape(config.mesh, num_devices)
    check(config.mesh.fsdp >= 1 and num_devices % max(config.mesh.fsdp, 1) == 0, "mesh.fsdp",
          f"{config.mesh.fsdp} must be >= 1 and divide the {num_devices} devices")
    check(config.mesh.data == -1 or (config.mesh.data >= 1 and data * fsdp <= num_devices), "mesh.data",
          f"{config.mesh.data} x mesh.fsdp={fsdp} devices requested, {num_devices} available (-1 = all)")
    check(config.mesh.param_sharding in PARAM_SHARDINGS, "mesh.param_sharding",
          f"{config.mesh.param_sharding!r} not in {PARAM_SHARDINGS}")
    batch_shards = data * fsdp
    check(config.data.batch_size > 0 and batch_shards > 0 and config.data.batch_size % max(batch_shards, 1) == 0,
          "data.batch_size", f"global batch {config.data.batch_size} must be a positive multiple of the "
          f"{batch_shards} devices of the data x fsdp mesh")
    check(config.data.source in DATA_SOURCES, "data.source", f"{config.data.source!r} not in {DATA_SOURCES}")
    check(config.data.source != "files" or bool(config.data.datasets), "data.datasets",
          "data.source='files' needs at least one dataset (name -> format, path, image_root)")
    for field, datasets in (("data.datasets", config.data.datasets), ("data.expert.datasets", config.data.expert.datasets)):
        for name, entry in datasets.items():
            entry = entry if hasattr(entry, "get") else {}  # not a ConfigDict: every field is reported missing
            check(entry.get("format") in FILE_FORMATS, f"{field}.{name}.format",
                  f"{entry.get('format')!r} not in {FILE_FORMATS}")
            check(bool(entry.get("path")), f"{field}.{name}.path", "must be set")
            check(float(entry.get("weight", 1.0)) > 0, f"{field}.{name}.weight", "must be > 0")
    check(config.data.mixing in MIXING, "data.mixing", f"{config.data.mixing!r} not in {MIXING}")
    check(config.data.on_error in ON_ERROR, "data.on_error", f"{config.data.on_error!r} not in {ON_ERROR}")
    check(config.data.image_size >= 32, "data.image_size", f"{config.data.image_size} < 32")
    check(config.data.synthetic.size >= config.data.batch_size, "data.synthetic.size",
          f"{config.data.synthetic.size} examples cannot fill one global batch of {config.data.batch_size}")
    check(0.0 <= config.data.synthetic.difficulty <= 1.0, "data.synthetic.difficulty", "must be in [0, 1]")
    check("{cls}" in config.data.prompt_template and "{atr}" in config.data.prompt_template,
          "data.prompt_template", "must contain {atr} and {cls}")
    check(config.data.worker_count >= -1, "data.worker_count", "must be >= 0, or -1 for one per CPU core less one")
    check(config.text.tokenizer == "learn" or os.path.isdir(config.text.tokenizer), "text.tokenizer",
          f"{config.text.tokenizer!r} is neither 'learn' nor an existing tokenizer directory")
    check(2 <= config.text.max_len <= config.model.txt.max_position_embeddings, "text.max_len",
          f"{config.text.max_len} must be in [2, model.txt.max_position_embeddings="
          f"{config.model.txt.max_position_embeddings}]")
    check(config.model.txt.dropout_draw in DROPOUT_DRAWS, "model.txt.dropout_draw",
          f"{config.model.txt.dropout_draw!r} not in {DROPOUT_DRAWS}")
    check(config.model.txt.pooling in TEXT_POOLING_MODES, "model.txt.pooling",
          f"{config.model.txt.pooling!r} not in {TEXT_POOLING_MODES}")
    check(config.model.txt.hidden_size % config.model.txt.num_attention_heads == 0, "model.txt.num_attention_heads",
          f"hidden_size {config.model.txt.hidden_size} is not divisible by {config.model.txt.num_attention_heads} heads")
    img = config.model.img
    check(img.name in IMAGE_TOWERS, "model.img.name", f"{img.name!r} not in {IMAGE_TOWERS}")
    check(img.name != "resnet" or img.depth in RESNET_DEPTHS, "model.img.depth", f"{img.depth} not in {RESNET_DEPTHS}")
    check(img.name != "vit" or config.data.image_size % img.vit.patch_size == 0, "data.image_size",
          f"{config.data.image_size} is not a multiple of model.img.vit.patch_size={img.vit.patch_size}")
    check(img.name != "vit" or img.vit.width % img.vit.heads == 0, "model.img.vit.heads",
          f"width {img.vit.width} is not divisible by {img.vit.heads} heads")
    check(img.name != "clip_resnet" or config.data.image_size % 32 == 0, "data.image_size",
          f"{config.data.image_size} is not a multiple of 32 (CLIP ModifiedResNet's attention-pool grid)")
    for field in ("img_projection", "txt_projection"):
        check(config.model[field] in PROJECTIONS, f"model.{field}", f"{config.model[field]!r} not in {PROJECTIONS}")
    check(config.model.txt_projection != "none" or config.model.txt.hidden_size == config.model.embed_dim,
          "model.txt_projection", f"'none' needs model.txt.hidden_size == model.embed_dim={config.model.embed_dim}")
    check(config.model.img_projection != "none" or img.name == "clip_resnet"
          and img.clip_resnet.output_dim == config.model.embed_dim, "model.img_projection",
          "'none' needs the clip_resnet tower with clip_resnet.output_dim == model.embed_dim")
    check(config.model.knowledge.softmax_axis in KNOWLEDGE_SOFTMAX_AXES, "model.knowledge.softmax_axis",
          f"{config.model.knowledge.softmax_axis!r} not in {KNOWLEDGE_SOFTMAX_AXES}")
    check(config.data.preprocess in PREPROCESS_MODES, "data.preprocess",
          f"{config.data.preprocess!r} not in {PREPROCESS_MODES}")
    check(config.model.compute_dtype in DTYPES, "model.compute_dtype", f"{config.model.compute_dtype!r} not in {DTYPES}")
    check(config.loss.name in LOSSES, "loss.name", f"{config.loss.name!r} not in {LOSSES}")
    check(config.loss.scope in LOSS_SCOPES, "loss.scope", f"{config.loss.scope!r} not in {LOSS_SCOPES}")
    check(config.data.stream in STREAMS, "data.stream", f"{config.data.stream!r} not in {STREAMS}")
    r = config.data.reports
    check(r.language in REPORT_LANGUAGES, "data.reports.language", f"{r.language!r} not in {REPORT_LANGUAGES}")
    check(r.labels in REPORT_LABELS, "data.reports.labels", f"{r.labels!r} not in {REPORT_LABELS}")
    check(r.drop_chars >= 0, "data.reports.drop_chars", "must be >= 0 (0 = keep the whole report)")
    check(r.uncertain in UNCERTAIN, "data.reports.uncertain", f"{r.uncertain!r} not in {UNCERTAIN}")
    check(0.0 < r.cup_disc_threshold <= 1.0, "data.reports.cup_disc_threshold", f"{r.cup_disc_threshold} not in (0, 1]")
    check(config.data.augment.kind in AUGMENT_KINDS, "data.augment.kind",
          f"{config.data.augment.kind!r} not in {AUGMENT_KINDS}")
    lo, hi = config.data.augment.crop_scale
    check(0 < lo <= hi <= 1, "data.augment.crop_scale", f"({lo}, {hi}) must satisfy 0 < min <= max <= 1")
    check(config.loss.name != "flair" or config.data.stream == "flair", "loss.name",
          "'flair' needs the category ids of data.stream='flair'")
    check(config.loss.name != "wscl" or config.data.stream == "reports", "loss.name",
          "'wscl' needs the label vectors of data.stream='reports'")
    e = config.data.expert
    unknown = sorted(set(e.modalities) - set(MODALITIES))
    check(bool(e.modalities) and not unknown, "data.expert.modalities",
          f"{tuple(e.modalities)} must be a non-empty subset of {MODALITIES}")
    check(not e.modality_weights or len(e.modality_weights) == len(e.modalities), "data.expert.modality_weights",
          f"{len(e.modality_weights)} weights for {len(e.modalities)} modalities (() = uniform)")
    check(not config.model_init_trees or bool(config.model_init), "model_init_trees",
          f"{tuple(config.model_init_trees)} given without model_init")
    check(config.loss.wscl.coupling in WSCL_COUPLINGS, "loss.wscl.coupling",
          f"{config.loss.wscl.coupling!r} not in {WSCL_COUPLINGS}")
    check(0.0 <= config.loss.wscl.alpha <= 1.0, "loss.wscl.alpha", "must be in [0, 1]")
    errors += methods.check(config, num_devices)
    check(config.model.logit_scale_clamp in LOGIT_SCALE_CLAMPS, "model.logit_scale_clamp",
          f"{config.model.logit_scale_clamp!r} not in {LOGIT_SCALE_CLAMPS}")
    check(config.prompts.language in PROMPT_LANGUAGES, "prompts.language",
          f"{config.prompts.language!r} not in {PROMPT_LANGUAGES}")
    check(len(config.prompts.templates) > 0 and all("{}" in t for t in config.prompts.templates),
          "prompts.templates", "needs at least one template, each with {} for the class text")
    h, train_seeds = config.heldout, (config.data.synthetic.seed, e.seed)
    check(h.conditions.seed not in train_seeds, "heldout.conditions.seed",
          f"held-out seed {h.conditions.seed} equals a training corpus seed {train_seeds}")
    check(len(h.conditions.classes) >= 2, "heldout.conditions.classes", "needs at least 2 classes")
    check(h.findings.train_size > 0 and h.findings.test_size > 0, "heldout.findings.train_size",
          "train_size and test_size must be > 0")
    check(not {h.findings.seed, h.findings.seed + 1} & set(train_seeds), "heldout.findings.seed",
          f"its seeds {h.findings.seed} and {h.findings.seed + 1} must differ from the training corpus seeds {train_seeds}")
    check(h.captions.seed not in train_seeds, "heldout.captions.seed",
          f"{h.captions.seed} must differ from the training and expert corpus seeds {train_seeds}")
    check(h.captions.size > 0, "heldout.captions.size", "must be > 0")
    check(h.batch_size > 0 and h.batch_size % max(batch_shards, 1) == 0, "heldout.batch_size",
          f"{h.batch_size} must be a positive multiple of the {batch_shards} data x fsdp devices")
    errors += evals.check(config)
    check(config.optim.lr > 0, "optim.lr", "must be > 0")
    check(config.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables)")
    check(config.optim.warmup_steps >= 0 or config.optim.schedule_epochs >= config.optim.warmup_epochs, "optim.schedule_epochs",
          f"cosine horizon {config.optim.schedule_epochs} is shorter than warm-up {config.optim.warmup_epochs}")
    check(config.train.epochs > 0, "train.epochs", "must be > 0")
    check(config.train.checkpoint_every > 0, "train.checkpoint_every", "must be > 0")
    check(config.train.log_every > 0, "train.log_every", "must be > 0")
    check(not config.train.wandb or importlib.util.find_spec("wandb") is not None, "train.wandb",
          f"{config.train.wandb!r} asked for, but wandb is not installed (pip install wandb)")
    check(config.train.stop_check_every > 0, "train.stop_check_every", "must be > 0")
    check(not config.resume or os.path.isdir(config.resume), "resume",
          f"{config.resume!r} is not a checkpoint directory")
    check(not config.model_init or os.path.isdir(config.model_init), "model_init",
          f"{config.model_init!r} is not a checkpoint directory: train the stage it starts from first (e.g. "
          "configs/vilref.py:stage=clip for ViLReF, :stage=text for KeepFIT V2) or convert a checkpoint there")
    if config.model_init and os.path.isdir(config.model_init):
        errors += manifest_mismatches(config, config.model_init)
    if errors:
        raise ConfigError(f"invalid config: {errors[0]}" if len(errors) == 1 else
                          "invalid config:\n  " + "\n  ".join(errors))


def flatten(config) -> dict:
    """{'model.img.name': 'vit', ...}: every leaf of a ConfigDict (or dict) by its dotted name."""
    out = {}
    for key, value in (config.items() if hasattr(config, "items") else ()):
        if hasattr(value, "items"):
            out.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            out[key] = value
    return out


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-9 * max(1, abs(b))
    return a == b


def converted_overrides(path: str, suggested: bool = True) -> dict:
    """Dotted config values of a converted checkpoint (its manifest's config, and by default the
    original's suggested preprocessing), for `override` (ConfigDict turns JSON lists into tuples)."""
    from retina_jax import checkpointing
    manifest = checkpointing.read_manifest(path)
    if manifest is None:
        raise FileNotFoundError(f"{path}: no manifest.json (not a python -m retina_jax.convert output)")
    return {**(manifest["suggested"] if suggested else {}), **manifest["config"]}


def manifest_mismatches(config, path: str) -> list[str]:
    """Fields of `config` that differ from what a converted checkpoint at `path` requires.

    A converted checkpoint's manifest lists the architecture values (and the tokenizer) its trees
    were built for; each difference is named with the flag that fixes it, instead of a shape error later.
    """
    from retina_jax import checkpointing  # orbax import kept out of plain config loading
    manifest = checkpointing.read_manifest(path)
    if manifest is None:
        return []
    have = flatten(config)
    errors = []
    # manifest["config"] holds only what the trees' shapes and meaning depend on (architecture,
    # tokenizer); preprocessing, pooling and lengths are in manifest["suggested"], free to change.
    for key, want in sorted(manifest["config"].items()):
        if key not in have:
            errors.append(f"config.{key}: required by {path}/manifest.json but not a config field")
        elif key == "text.tokenizer" and have[key] != "learn" and os.path.realpath(have[key]) == os.path.realpath(want):
            continue
        elif not _same(have[key], want):
            errors.append(f"config.{key}: {have[key]!r}, but the checkpoint in model_init needs {want!r} "
                          f"(--config.{key}={want})")
    return errors
