"""orbax checkpoints of the train state together with the grain iterator position.

One `CheckpointManager` per run directory saves a Composite of `state` (the TrainState pytree) and
`data` (the grain iterator state, one file per process), as maxtext does. Saves are atomic (orbax
writes to a temporary directory and renames it when complete), so a run killed mid-save still has
its previous checkpoint. Restores go to the abstract state's shardings, so a checkpoint written on
one mesh restores onto another.

Resume order (docs/architecture.md, "Resume order"): the workdir's own latest checkpoint > `config.resume` (another
run's checkpoint directory: full state and data position) > `config.model_init` (params and
batch_stats only) > scratch.

`config.model_init` also takes a converted checkpoint (`python -m retina_jax.convert`): a directory
with `manifest.json` (where it came from, which top-level param trees it holds, and the config
values the model must have to receive it) and `checkpoints/0` holding `{params, batch_stats}`.
A checkpoint may hold only some trees (e.g. `txt` from a Hugging Face BERT): each tree it holds
must match the model's exactly, the others keep their fresh initialisation and are logged.
"""
from __future__ import annotations

import json
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_utils

from retina_jax.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


class _OrbaxNotices(logging.Filter):
    """orbax warns about what this module asks for on purpose: opening a manager read-only (two
    warnings per open), reading the tree metadata of one item's directory, and restoring some of a
    checkpoint's items (the train state without the data iterator, the variables without Adam's
    moments). Only these messages are dropped; every other orbax warning still shows."""
    ASKED_FOR = ("CheckpointManagerOptions.read_only=True", "Given directory is read only",
                 "Metadata file does not exist", "was found in the checkpoint, but could not be restored")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (f"{os.sep}orbax{os.sep}" in record.pathname
                    and any(notice in str(record.msg) for notice in self.ASKED_FOR))


# absl.logging (what orbax logs through) writes to the `absl` logger whichever handler is installed.
logging.getLogger("absl").addFilter(_OrbaxNotices())


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(directory: str, *, max_to_keep: int | None = None, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           read_only=read_only, create=not read_only)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "data", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, *, force: bool = False,
         meta: dict | None = None) -> bool:
    """`meta`: small JSON counters that must survive a resume with the state (e.g. the number of
    bad examples skipped so far)."""
    args = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if meta is not None:
        args["meta"] = ocp.args.JsonSave(meta)
    return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def restore_meta(mngr: ocp.CheckpointManager, step: int | None = None) -> dict:
    """The `meta` item of a checkpoint; {} for checkpoints written before it existed."""
    step = mngr.latest_step() if step is None else step
    if step is None or not os.path.isdir(os.path.join(str(mngr.directory), str(step), "meta")):
        return {}
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def checked_step(mngr: ocp.CheckpointManager, step: int | None = None, what: str = "") -> int:
    """`step`, or the latest step, if a finalized checkpoint of it is in `mngr`'s directory."""
    steps = sorted(mngr.all_steps())
    if not steps:
        raise CheckpointError(f"{what}no finalized checkpoint in {mngr.directory}: train there first, or give "
                              "the run directory that holds checkpoints/")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise CheckpointError(f"{what}no checkpoint of step {step} in {mngr.directory}; kept steps: {steps}")
    return step


def restore(mngr: ocp.CheckpointManager, abstract_state, data_iter=None, step: int | None = None):
    """Restore `state` onto `abstract_state`'s shardings; restore `data_iter` in place if given."""
    step = checked_step(mngr, step)
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = mngr.restore(step, args=ocp.args.Composite(**args))
    return restored["state"]


MANIFEST = "manifest.json"
VARIABLE_TREES = ("params", "batch_stats")  # what model_init and the predictor read


def resolve(path: str) -> str:
    """A run's workdir or a converted checkpoint's directory -> its orbax checkpoint directory."""
    inner = os.path.join(path, "checkpoints")
    return inner if os.path.isdir(inner) else path


def read_manifest(path: str) -> dict | None:
    """The manifest of a converted checkpoint directory, or None for a plain run checkpoint."""
    for candidate in (os.path.join(path, MANIFEST), os.path.join(os.path.dirname(os.path.abspath(path)), MANIFEST)):
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as f:
                manifest = json.load(f)
            # The tokenizer travels inside the converted directory: stored relative, resolved here.
            for section in ("config", "suggested"):
                tok = manifest.get(section, {}).get("text.tokenizer")
                if tok and not os.path.isabs(tok):
                    manifest[section]["text.tokenizer"] = os.path.join(os.path.dirname(candidate), tok)
            return manifest
    return None


def check_new_output(out_dir: str) -> None:
    """A conversion never overwrites: refuse a directory that holds a checkpoint already."""
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise FileExistsError(f"{out_dir} already holds a converted checkpoint; choose another --out")
    if os.path.exists(os.path.join(out_dir, "checkpoints")):
        raise FileExistsError(f"{out_dir}/checkpoints exists without {MANIFEST} (an interrupted conversion, or "
                              "a training run): remove it or choose another --out")


def save_variables(out_dir: str, variables: dict, manifest: dict) -> str:
    """Write converted `{params, batch_stats}` and `manifest.json` to `out_dir` (model_init-loadable).

    orbax writes the step atomically; the manifest is written (atomically) only after it, so a
    directory with a manifest always holds a complete checkpoint.
    """
    out_dir = os.path.abspath(out_dir)
    check_new_output(out_dir)
    state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    mngr = manager(os.path.join(out_dir, "checkpoints"), async_save=False)
    mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    mngr.wait_until_finished()
    mngr.close()
    tmp = os.path.join(out_dir, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, default=str)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))
    return out_dir


def restore_variables(directory: str, sharding, step: int | None = None, what: str = "config.model_init") -> dict:
    """`params` and `batch_stats` of another run's or a converted checkpoint (config.model_init, the
    predictor). Only those two trees are read (orbax partial restore): a run's Adam moments, EMA
    copy and queues stay on disk."""
    # orbax reads a relative path's tree metadata as None: `model_init=workdirs/...` is relative.
    directory = os.path.abspath(resolve(directory))
    mngr = manager(directory, read_only=True)
    try:
        step = checked_step(mngr, step, what=f"{what}: ")
    finally:
        mngr.close()
    path = os.path.join(directory, str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    saved = checkpointer.metadata(path).item_metadata
    saved = getattr(saved, "tree", saved)
    if saved is None:
        raise CheckpointError(f"{what}: no readable train state at {path}")
    # A model without BatchNorm (ViT) saved an empty batch_stats tree, which orbax may not list.
    wanted = {k: saved[k] for k in VARIABLE_TREES if saved.get(k)}
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), wanted)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=checkpoint_utils.construct_restore_args(target), partial_restore=True))
    return {"params": restored["params"], "batch_stats": restored.get("batch_stats", {}) or {}}


def _shapes(tree) -> dict[str, tuple]:
    return {jax.tree_util.keystr(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(tree)}


def init_from(path: str, params: dict, batch_stats: dict, sharding, trees=(), *, step: int | None = None,
              what: str = "config.model_init") -> tuple[dict, dict]:
    """`config.model_init`: replace the trees of `params` / `batch_stats` that `path` holds.

    `trees` (`config.model_init_trees`) restricts the load to those top-level trees, each of which
    the checkpoint must hold (KeepFIT V2 carries only `txt` from stage `text`, not its MLM head).

    Strict per top-level tree: a tree the model lacks, or a held tree whose leaves or shapes differ
    from the model's, is a ConfigError listing them. Trees the checkpoint does not hold keep their
    fresh initialisation (logged), so towers-only checkpoints load explicitly, never silently.
    """
    loaded = restore_variables(path, sharding, step, what)
    if trees:
        absent = sorted(set(trees) - set(loaded["params"]))
        if absent:
            raise ConfigError(f"config.model_init_trees={tuple(trees)}: {absent} not in the checkpoint at {path} "
                             f"(it holds {sorted(loaded['params'])})")
        loaded = {what: {k: v for k, v in tree.items() if k in trees} for what, tree in loaded.items()}
    merged = {}
    for what, fresh, got in (("params", params, loaded["params"]), ("batch_stats", batch_stats, loaded["batch_stats"])):
        unexpected = sorted(set(got) - set(fresh))
        problems = [f"{what}/{k}: not a tree of this model (its trees: {sorted(fresh)})" for k in unexpected]
        for key in sorted(set(got) & set(fresh)):
            want, have = _shapes(fresh[key]), _shapes(got[key])
            missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
            wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
            problems += [f"{what}/{key}{k}: missing from the checkpoint" for k in missing[:20]]
            problems += [f"{what}/{key}{k}: in the checkpoint, not in the model" for k in extra[:20]]
            problems += [f"{what}/{key}{k}: checkpoint shape {have[k]} vs model {want[k]}" for k in wrong[:20]]
        if problems:
            raise ConfigError(f"{what}={path}: {len(problems)} mismatches with the model "
                             "(check the config against the checkpoint's manifest.json):\n  " + "\n  ".join(problems))
        merged[what] = {k: (got[k] if k in got else v) for k, v in fresh.items()}
        kept = sorted(set(fresh) - set(got))
        log.info("model_init %s: %s loaded from %s%s", what, sorted(set(got)) or "nothing", path,
                 f"; freshly initialised: {kept}" if kept else "")
    return merged["params"], merged["batch_stats"]
