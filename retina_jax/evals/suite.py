"""The task-based evaluators (docs/methods.md, "FLAIR": Transfer protocols; "ViLReF": Evaluation):
each runs one protocol of a model on one task and writes its JSON and Markdown report with plots
under `out_dir/<task>/<name>.*`. They are registered evaluator types (evals/base.py) configured by
`config.evals.<name>` like every other evaluation, on demand through
`python -m retina_jax.evaluate --eval NAME` or during training.

Types (settings and defaults: configs/common.py `EVALUATORS`):
- classification, run per FLAIR fold (`splits.py`), scored by ACA, quadratic kappa, macro F1, AUC:
  `transfer_zero_shot` (prompt-ensemble prototypes), `transfer_linear_probe` (the one linear probe,
  `linear_probe.py`), `transfer_clip_adapter`, `transfer_tip_adapter`, `transfer_tip_adapter_f`
  (`adapters.py`), `transfer_finetune` (the one fine-tune, `finetune.py`, early stopping on the
  validation split);
- `multilabel_linear_probe`, `multilabel_finetune`: ViLReF's sigmoid heads with the same linear
  probe and fine-tune, macro AUC, mAP (also in training: configs/vilref.py);
- `transfer_retrieval`: image <-> report recall@1/5/10 (`retrieval.py`);
- `transfer_segmentation`: a U-Net decoder on the image tower (`segmentation_transfer.py`).

Tasks (`load_task`): the held-out synthetic ones, `config.heldout.conditions.name` (single-label
conditions, the default of every classification protocol), `synthetic_conditions_external` (the same
classes on another held-out draw, an external test set), `synthetic_dr_grade` (the DR grade of the
same images), `synthetic_findings` (the multi-label findings of `pipeline.multilabel_source`: its
fixed train and test corpora) and `synthetic_reports` (`size` image-report pairs of a held-out seed,
the report in the run's language), or a public task of `retina_jax.evals.tasks` (a FLAIR-format
dataframe) read from a data root.

External test sets (FLAIR's `--experiment_test`, `main_transferability.py`): the classification
protocols also score other tasks with the same classes (`test_task`), e.g. DeepDRiD's or MMAC's test
sets after adapting on their training sets. As in FLAIR, each fold's fitted adapter predicts every row
of each external task, and the external metrics are averaged over folds; the internal test split may
then be empty (`shots_test 0`). Here one fit per fold predicts the internal and the external rows
together (`_WithExternals`). A task file's own `splits.<protocol>.experiment_test` is not read:
external tests are named by the caller.

Split defaults per protocol (a task's `splits` and the entry's split fields override them),
`evals/tasks.py`'s: zero-shot 0 train / 100% test, 1 fold and the linear probe 80% / 20%, 5 folds
(FLAIR's README); the adapters 5 shots per class / 20%, 5 folds (KeepFIT's README). Ours: fine-tuning
70% train / 10% validation / 20% test, 1 fold (FLAIR's command-line default of 1 fold; the original's
default of no validation split cannot run), and a public multi-label task's seeded 80% / 20% split.

Tip-Adapter quirk kept (setting `test_augment`, default on): FLAIR's `TipAdapter.predict` passes the
test images through its pretraining augmentation (flip, small affine, colour jitter) even without
test-time augmentation; here each test image is augmented once with that recipe, from a fixed seed.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
import types
from typing import Callable, Sequence

import jax
import numpy as np
from absl import logging

from retina_jax.data import knowledge, pipeline, transforms
from retina_jax.data.synthetic import CorpusSpec, SyntheticFundus
from retina_jax.evals import adapters, finetune as finetune_lib, linear_probe, report, retrieval, splits, tasks, zeroshot
from retina_jax.evals import segmentation_transfer as segmentation_lib
from retina_jax.errors import ConfigError
from retina_jax.evals.base import Evaluator, register
from retina_jax.evals.metrics import classification_metrics, multilabel_metrics

KINDS = ("classification", "multilabel", "retrieval", "segmentation")
DR_GRADE_TASK = "synthetic_dr_grade"
FINDINGS_TASK = "synthetic_findings"
REPORTS_TASK = "synthetic_reports"
SEGMENTATION_TASK = "synthetic_lesions"
RETRIEVAL_SEED = 40_009  # the held-out image-report pairs; never a training seed (checked)
EXTERNAL_TASK = "synthetic_conditions_external"
EXTERNAL_SEED = 50_021  # its images: a second held-out draw of the zero-shot conditions (checked as above)
SPLIT_KEYS = ("shots_train", "shots_val", "shots_test", "folds", "balance")
RETRIEVAL_SIZE = 200


@dataclasses.dataclass
class TaskData:
    """A task the suite runs on. `source` is a random-access source (`len`, `record(i)` without the
    image, `[i]` with the uint8 RGB `image`), as `pipeline.heldout_batches` reads."""
    name: str
    kind: str
    source: object
    label: Callable[[dict], object]  # example -> class id [] or multi-hot [C] (retrieval: its index)
    classes: tuple[str, ...] = ()
    descriptions: dict | None = None  # zero-shot texts per class (a task file's); None: the built-in dictionary
    name_prompt: bool = True  # False: the class names are no zero-shot prompt (a task file's `name_prompt`)
    text: Callable[[dict], str] | None = None  # retrieval: example -> its paired text
    splits: dict = dataclasses.field(default_factory=dict)  # protocol -> split defaults (evals/tasks.py format)
    fixed_split: splits.Split | None = None  # a multi-label task with given train/test parts

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind {self.kind!r} not in {KINDS}")


class _Concat:
    """Two sources back to back (the multi-label task's train corpus, then its test corpus)."""

    def __init__(self, first, second):
        self.parts = (first, second)

    def __len__(self) -> int:
        return len(self.parts[0]) + len(self.parts[1])

    def _locate(self, index: int):
        first = len(self.parts[0])
        return (self.parts[0], index) if index < first else (self.parts[1], index - first)

    def record(self, index: int) -> dict:
        source, i = self._locate(int(index))
        return source.record(i)

    def __getitem__(self, index: int) -> dict:
        source, i = self._locate(int(index))
        return source[i]


class _Rows:
    """A `tasks.TaskSource` with the `record` access `pipeline.heldout_batches` reads labels through."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def record(self, index: int) -> dict:
        return self.source[index]

    def __getitem__(self, index: int) -> dict:
        return self.source[index]


def _conditions_task(config, size: int) -> TaskData:
    z = config.heldout.conditions
    classes = tuple(z.classes)
    return TaskData(z.name, "classification", pipeline.heldout_source(config),
                    lambda example: classes.index(example["conditions"][0]), classes)


def _dr_grade_task(config, size: int) -> TaskData:
    return TaskData(DR_GRADE_TASK, "classification", pipeline.heldout_source(config),
                    lambda example: example["dr_grade"], tuple(knowledge.DR_GRADE_CATEGORIES))


def _findings_task(config, size: int) -> TaskData:
    train, test = pipeline.multilabel_source(config, "train"), pipeline.multilabel_source(config, "test")
    fixed = splits.Split(seed=config.heldout.findings.seed, train=np.arange(len(train)),
                         val=np.zeros((0,), np.int64), test=len(train) + np.arange(len(test)))
    return TaskData(FINDINGS_TASK, "multilabel", _Concat(train, test), lambda example: example["labels"],
                    tuple(knowledge.FINDINGS), fixed_split=fixed)


def _external_conditions_task(config, size: int) -> TaskData:
    # The zero-shot task's classes on another held-out draw: the synthetic stand-in for an external
    # test set (FLAIR's --experiment_test) of the classification protocols.
    if EXTERNAL_SEED in (config.data.synthetic.seed, config.data.expert.seed, config.heldout.conditions.seed):
        raise ValueError(f"{EXTERNAL_TASK}: its seed {EXTERNAL_SEED} is a corpus seed of this config")
    z = config.heldout.conditions
    classes = tuple(z.classes)
    source = SyntheticFundus(dataclasses.replace(pipeline.heldout_source(config).spec, seed=EXTERNAL_SEED))
    return TaskData(EXTERNAL_TASK, "classification", source,
                    lambda example: classes.index(example["conditions"][0]), classes)


def _reports_task(config, size: int) -> TaskData:
    s = config.data.synthetic
    if RETRIEVAL_SEED in (s.seed, config.data.expert.seed):
        raise ValueError(f"{REPORTS_TASK}: its seed {RETRIEVAL_SEED} is a training corpus seed of this config "
                         "(config.data.synthetic.seed or config.data.expert.seed)")
    source = SyntheticFundus(CorpusSpec(
        seed=RETRIEVAL_SEED, size=size, image_size=s.image_size,
        comorbidity_prob=s.comorbidity_prob, attribute_prob=s.attribute_prob, expert_fraction=0.0,
        difficulty=s.difficulty))
    reports = config.data.stream == "reports"
    language = config.data.reports.language if reports else config.prompts.language
    drop = config.data.reports.drop_chars if reports else 0
    return TaskData(REPORTS_TASK, "retrieval", source, lambda example: example["index"],
                    text=lambda example: pipeline.report_text(example, language, drop))


def _segmentation_task(config, size: int) -> TaskData:
    # The images and masks come from `segmentation.synthetic_segmentation_data` (the multi-label
    # transfer's held-out corpora); the source here only names the test corpus.
    return TaskData(SEGMENTATION_TASK, "segmentation", pipeline.multilabel_source(config, "test"),
                    lambda example: example["index"], tuple(segmentation_lib.MASK_CLASSES))


# The held-out synthetic tasks by name (besides the config's own zero-shot task, named by
# `config.heldout.conditions.name`), and the one each kind of protocol runs on by default.
SYNTHETIC_TASKS: dict[str, Callable[..., TaskData]] = {
    DR_GRADE_TASK: _dr_grade_task, EXTERNAL_TASK: _external_conditions_task, FINDINGS_TASK: _findings_task,
    REPORTS_TASK: _reports_task, SEGMENTATION_TASK: _segmentation_task}
DEFAULT_TASKS = {"multilabel": FINDINGS_TASK, "retrieval": REPORTS_TASK, "segmentation": SEGMENTATION_TASK}


def synthetic_task_names(config) -> list[str]:
    return [config.heldout.conditions.name, *SYNTHETIC_TASKS]


# The entries `retina-jax train --task T` runs when --eval names none, by the task's kind.
TASK_ENTRIES = {"classification": ("transfer_zero_shot", "transfer_linear_probe"),
                "multilabel": ("multilabel_linear_probe",), "retrieval": ("transfer_retrieval",),
                "segmentation": ()}


def task_kind(config, name: str) -> str:
    """The kind of task `name` without reading its images: a held-out synthetic task's, or its task file's."""
    if name == config.heldout.conditions.name or name in (EXTERNAL_TASK, DR_GRADE_TASK):
        return "classification"
    if name in SYNTHETIC_TASKS:
        return next(kind for kind, task in DEFAULT_TASKS.items() if task == name)
    if name in tasks.list_tasks() or name.endswith(".json"):
        try:
            return tasks.load_task(name).kind
        except (OSError, ValueError) as e:
            raise ConfigError(f"--task {name!r}: {e}") from e
    raise ConfigError(f"--task {name!r}: unknown task; known: {synthetic_task_names(config) + tasks.list_tasks()} "
                      "or a task .json file (format: retina_jax/evals/tasks.py)")


def default_entries(config, name: str) -> list[str]:
    """The config.evals entries that evaluate task `name` when none is named (TASK_ENTRIES)."""
    kind = task_kind(config, name)
    entries = [e for e in TASK_ENTRIES[kind] if e in config.evals]
    if not entries:
        raise ConfigError(f"--task {name!r} is a {kind} task: name the entries that evaluate it with --eval")
    return entries


def runs_on_synthetic(config, name: str) -> bool:
    """Whether entry `name` evaluates on a held-out synthetic corpus: the in-training evaluators
    always; a task-based entry when its task is one of the synthetic tasks (or left to its default)."""
    settings = config.evals[name]
    if "task" not in settings:
        return True  # zero_shot, captions, mlm_heldout, transfer_segmentation: the held-out corpora
    return not settings.task or settings.task in synthetic_task_names(config)


def load_task(config, name: str, data_root: str | None = None, *, size: int = RETRIEVAL_SIZE) -> TaskData:
    """A task by name: a held-out synthetic task of `config` (`synthetic_task_names`; the images come
    from the config's held-out corpora; `size`: the image-report pairs of `synthetic_reports`) or a
    task of `retina_jax.evals.tasks` (a shipped name or a task file) read from `data_root`. A task
    file's split defaults and prompt texts are used for both."""
    registered = tasks.load_task(name) if name in tasks.list_tasks() or name.endswith(".json") else None
    if name in synthetic_task_names(config):
        data = (_conditions_task if name == config.heldout.conditions.name else SYNTHETIC_TASKS[name])(config, size)
        if registered is None or registered.classes != data.classes:
            return data  # e.g. a config whose zero-shot classes differ from the shipped task's
    elif registered is None:
        raise KeyError(f"unknown task {name!r}; known: {synthetic_task_names(config) + tasks.list_tasks()} or a "
                       "task .json file")
    elif data_root is None:
        raise ValueError(f"task {name!r} reads its images from a data root: pass data_root (--data_root)")
    else:
        data = TaskData(registered.name, registered.kind, _Rows(tasks.task_dataset(registered, data_root)),
                        lambda example: example["label"], registered.classes)
    descriptions = registered.descriptions if config.prompts.language == "en" else registered.descriptions_zh
    return dataclasses.replace(data, descriptions=descriptions or None, splits=registered.splits,
                               name_prompt=registered.name_prompt)


# FLAIR's pretraining augmentation (kornia `augmentations_pretraining`): the config defaults, whatever
# recipe the evaluated run trained with.
def check_external(task: TaskData, external: TaskData) -> None:
    """An external test task must be a classification task with `task`'s classes in the same order (FLAIR
    labels the external rows with the adapted task's targets)."""
    if external.kind != "classification" or task.kind != "classification":
        raise ValueError(f"external test task {external.name!r}: external tests apply to classification tasks "
                         f"({task.name!r} is {task.kind}, {external.name!r} is {external.kind})")
    if external.classes != task.classes:
        raise ValueError(f"external test task {external.name!r} has classes {list(external.classes)}, but "
                         f"{task.name!r} has {list(task.classes)}: an adapter predicts its own classes only")
    if external.name == task.name:
        raise ValueError(f"external test task {external.name!r} is the task itself")


def _flair_augment_recipe() -> types.SimpleNamespace:
    from configs import common
    return types.SimpleNamespace(**common.get_config().data.augment.to_dict())


def _augment_batch(images: np.ndarray, mode: str, rng: np.random.Generator, recipe) -> np.ndarray:
    """Preprocessed model inputs -> the same images augmented with FLAIR's recipe (in [0, 1] pixels)."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        canvas = image * transforms.CLIP_STD + transforms.CLIP_MEAN if mode == "clip" else image
        out[i] = transforms.normalize(transforms.augment(canvas, rng, recipe), mode)
    return out


class TaskFeatures:
    """The model's view of a task, each representation computed on first use and kept for every
    protocol run on the same task: labels, `zimg`, pre-projection `features`, the preprocessed
    `images` (fine-tuning), FLAIR-augmented `zimg_augmented`, zero-shot `prototypes` and `scale`.

    The preprocessed images stay in memory (one pass over the source renders or reads them once). On
    several processes every process reads its share of the rows and gets every row's embeddings and
    labels back (`Encoder.gather`), so the probes and adapters fit the same data everywhere.
    """

    def __init__(self, config, encoder, task: TaskData):
        self.config, self.encoder, self.task = config, encoder, task

    @functools.cached_property
    def _batches(self) -> list:
        config = self.config
        return list(pipeline.heldout_batches(config, config.heldout.batch_size, self.task.source, self.task.label))

    def _embed(self, method: str, batches=None) -> np.ndarray:
        out, labels = getattr(self.encoder, method)(self._batches if batches is None else batches)
        self.__dict__.setdefault("labels", labels)  # every process's rows, in the order of `out`
        return out

    @functools.cached_property
    def labels(self) -> np.ndarray:
        if jax.process_count() == 1:  # no forward pass needed
            return np.concatenate([y[valid] for _, y, valid in self._batches])
        self.zimg  # the labels of every process are gathered with the first representation computed
        return self.__dict__["labels"]

    @functools.cached_property
    def zimg(self) -> np.ndarray:
        return self._embed("embed_images")

    @functools.cached_property
    def features(self) -> np.ndarray:
        return self._embed("image_features")

    @functools.cached_property
    def images(self) -> np.ndarray:
        if jax.process_count() > 1:
            # Fine-tuning trains on the host from images this process alone read.
            raise RuntimeError(f"fine-tuning on task {self.task.name!r} runs in one process; run "
                               "retina_jax.evaluate on one host")
        return np.concatenate([images[valid] for images, _, valid in self._batches])

    @functools.cached_property
    def zimg_augmented(self) -> np.ndarray:
        rng, recipe, mode = np.random.default_rng(0), _flair_augment_recipe(), self.config.data.preprocess
        batches = [(_augment_batch(images, mode, rng, recipe), y, valid) for images, y, valid in self._batches]
        return self._embed("embed_images", batches)

    @functools.cached_property
    def prototypes(self) -> np.ndarray:
        z = self.config.prompts
        # A task file lists every class, possibly without descriptions (then prompted by its name alone).
        return zeroshot.class_prototypes(self.encoder.embed_texts, self.encoder.tokenize, list(self.task.classes), z.templates,
                                         self.task.descriptions, language=z.language,
                                         require_descriptions=self.task.descriptions is None,
                                         name_prompt=self.task.name_prompt)

    @property
    def scale(self) -> float:
        """exp(logit_scale) clipped to [0, ln 100] as the trainer's zero-shot evaluation uses it."""
        return self.encoder.logit_scale

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] normalised text embeddings, in chunks of the eval batch size padded to one shape."""
        size, out = self.config.heldout.batch_size, []
        for start in range(0, len(texts), size):
            chunk = list(texts[start:start + size])
            ids, mask = self.encoder.tokenize(chunk + [chunk[-1]] * (size - len(chunk)))
            out.append(np.asarray(self.encoder.embed_texts(ids, mask))[:len(chunk)])
        return np.concatenate(out)


class _WithExternals:
    """A task's features followed row-wise by those of its external test tasks, so that a protocol's
    one fit per fold also predicts the external rows (`offsets[i]`: where external i's rows start).
    Everything else (task, prototypes, scale, the model) is the task's own."""
    _ROWS = ("labels", "zimg", "features", "images", "zimg_augmented")

    def __init__(self, base: TaskFeatures, externals: Sequence[TaskFeatures]):
        self._parts = (base, *externals)
        self._base = base
        sizes = [len(f.task.source) for f in self._parts]
        self.offsets = np.cumsum(sizes)[:-1]

    def __getattr__(self, name):
        if name in self._ROWS:
            value = np.concatenate([getattr(f, name) for f in self._parts])
            setattr(self, name, value)  # computed once per representation
            return value
        return getattr(self._base, name)


# ------------------------------------------------------------------------------ task evaluators
def _split_list(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


class TaskEvaluator(Evaluator):
    """An evaluator that runs on one task (`settings.task`, '' = the type's held-out synthetic task)
    and writes its report under `out_dir/<task>/<name>.*` when `out_dir` is given. Subclasses set
    `kind` and implement `evaluate(ctx) -> (result entries, predictions to plot or None)`."""
    kind: str = ""
    split_fields = ("task", "test_task", "shots_train", "shots_val", "shots_test", "folds")

    @classmethod
    def check(cls, config, name, settings):
        return [f"config.evals.{name}: stage `text` trains the text tower alone; there is no image tower to "
                "evaluate"] if config.mlm.enabled else []

    def task_name(self) -> str:
        named = self.settings.get("task", "")
        if named:
            return named
        if self.kind == "classification":
            return self.config.heldout.conditions.name
        return DEFAULT_TASKS[self.kind]

    def features(self, encoder, name: str) -> TaskFeatures:
        """The model's view of task `name`, shared by every evaluator of one evaluation (`encoder.cache`)."""
        size = self.settings.get("size", RETRIEVAL_SIZE)
        key = ("task", name, self.data_root, size)
        if key not in encoder.cache:
            task = load_task(self.config, name, self.data_root, size=size)
            if task.kind != self.kind:
                raise ValueError(f"config.evals.{self.name}: type {self.type!r} runs on {self.kind} tasks; task "
                                 f"{name!r} is {task.kind}")
            encoder.cache[key] = TaskFeatures(self.config, encoder, task)
        return encoder.cache[key]

    def options(self) -> dict:
        return {k: v for k, v in self.settings.items() if k not in ("type", "every_steps", "at_end", *self.split_fields)}

    def run(self, encoder):
        ctx = self.features(encoder, self.task_name())
        t0 = time.time()
        result = {"task": ctx.task.name, "protocol": self.name, "type": self.type, "kind": ctx.task.kind,
                  "checkpoint": encoder.checkpoint, "step": encoder.step, "classes": list(ctx.task.classes),
                  "options": self.options()}
        entries, predictions = self.evaluate(ctx, encoder)
        result.update(entries)
        result["seconds"] = time.time() - t0
        extras = {"result": result}
        if self.out_dir and jax.process_index() == 0:
            extras["report"] = report.write_report(os.path.join(self.out_dir, ctx.task.name), result, predictions)
        return self.summary(result), extras

    def evaluate(self, ctx: TaskFeatures, encoder) -> tuple[dict, dict | None]:
        raise NotImplementedError

    def summary(self, result: dict) -> dict:
        """The flat metrics logged and returned: the first table's."""
        return dict(next(iter(result["metrics"].values())))


class FoldEvaluator(TaskEvaluator):
    """A classification protocol run per FLAIR fold and shot setting: `fit_predict(ctx, split)`
    maps one fold's split to ([N_test, C] test probabilities, extra per-fold values)."""
    kind = "classification"
    protocol: str = ""  # the key of its split defaults in a task file's `splits` (evals/tasks.py)
    default_splits: dict = {}

    def fit_predict(self, ctx: TaskFeatures, split: splits.Split) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    def evaluate(self, ctx, encoder):
        s = self.settings
        externals = [self.features(encoder, name) for name in _split_list(s.test_task)]
        for e in externals:
            check_external(ctx.task, e.task)
        settings = split_settings(self.protocol, self.default_splits, ctx.task, _split_list(s.shots_train) or None,
                                  s.shots_test or None, s.shots_val or None, s.folds or None)
        results, plotted = self._run_folds(ctx, settings, externals)
        entries = {"settings": results}
        if plotted is not None:
            predictions, entries["plotted"] = plotted
            return entries, predictions
        return entries, None

    def summary(self, result: dict) -> dict:
        out, several = {}, len(result["settings"]) > 1
        for s in result["settings"]:
            prefix = f"shots_{s['shots_train']}/" if several else ""
            for key, value in s.get("mean", {}).items():
                out[prefix + key] = value
                out[f"{prefix}{key}_std"] = s["std"][key]
            for name, e in s.get("external", {}).items():
                out.update({f"{prefix}external/{name}/{k}": v for k, v in e["mean"].items()})
        return out

    def _run_folds(self, ctx: TaskFeatures, settings: list[dict], externals: Sequence[TaskFeatures]):
        task, results, plotted = ctx.task, [], None
        num_classes = len(task.classes)
        joined = _WithExternals(ctx, externals) if externals else ctx
        external_rows = [np.arange(len(f.task.source)) + offset for f, offset in
                         zip(externals, joined.offsets if externals else ())]
        for s in settings:
            fold_list = splits.fold_splits(ctx.labels, s["folds"], s["shots_train"], s["shots_test"], s["shots_val"],
                                           task.classes, balance=s["balance"])
            folds, outside = [], {f.task.name: [] for f in externals}
            for k, split in enumerate(fold_list):
                if not len(split.test) and not externals:
                    raise ValueError(f"task {task.name!r}: empty test split for shots_test={s['shots_test']}")
                # One fit predicts the internal test rows, then every external task's rows.
                test = np.concatenate([split.test, *external_rows]).astype(np.int64)
                probs, extra = self.fit_predict(joined, dataclasses.replace(split, test=test))
                if probs.shape != (len(test), num_classes):
                    raise ValueError(f"{self.type} returned probabilities {probs.shape}, expected ({len(test)}, "
                                     f"{num_classes})")
                base = {"fold": k, "seed": split.seed, "num_train": len(split.train), "num_val": len(split.val)}
                parts = np.split(np.arange(len(test)), np.cumsum([len(split.test), *map(len, external_rows)])[:-1])
                for name, rows in [(None, parts[0]), *zip([f.task.name for f in externals], parts[1:])]:
                    if not len(rows):
                        continue  # no internal test split: the external tasks only
                    labels = joined.labels[test[rows]]
                    fold = {**base, "num_test": len(rows), **classification_metrics(labels, probs[rows]), **extra}
                    (folds if name is None else outside[name]).append(fold)
                    logging.info("%s fold %d (shots_train=%s)%s: %s", self.name, k, s["shots_train"],
                                 "" if name is None else f" external {name}", _metrics_line(fold))
                    if plotted is None:
                        plotted = ({"labels": labels, "probs": probs[rows]},
                                   f"fold 0 of shots_train={s['shots_train']}" + ("" if name is None else f" on {name}"))
            entry = {**s, "folds": folds, **(splits.fold_summary(folds) if folds else {})}
            if externals:
                entry["external"] = {name: {"folds": f, **splits.fold_summary(f)} for name, f in outside.items()}
            results.append(entry)
        return results, plotted


def _metrics_line(metrics: dict) -> str:
    return " ".join(f"{m}={metrics[m]:.4f}" for m in report.CLASSIFICATION_METRICS)


def split_settings(protocol: str, defaults: dict, task: TaskData, shots_train: Sequence[str] | str | None = None,
                   shots_test: str | None = None, shots_val: str | None = None,
                   folds: int | None = None) -> list[dict]:
    """One settings dict per `shots_train` value: the protocol's `defaults` < the task's
    `splits[protocol]` < the arguments given (None keeps the default)."""
    settings = dict(defaults)
    task_settings = task.splits.get(protocol, {})
    external = [k for k in ("experiment_val", "experiment_test") if task_settings.get(k)]
    if external:
        raise ValueError(f"task {task.name!r}: splits.{protocol}.{external[0]} is not read from a task file; name "
                         "the external test tasks instead (test_task, evaluate --test_task)")
    settings.update({k: task_settings[k] for k in SPLIT_KEYS if k in task_settings})
    given = {"shots_test": shots_test, "shots_val": shots_val, "folds": folds}
    settings.update({k: v for k, v in given.items() if v is not None})
    train = settings["shots_train"] if shots_train is None else shots_train
    out = []
    for value in [train] if isinstance(train, (str, int)) else list(train):
        s = {**settings, "shots_train": value}
        for key in ("shots_train", "shots_val", "shots_test"):
            s[key] = splits.check_shots(s[key], key)
        s["folds"] = int(s["folds"])
        if s["folds"] < 1:
            raise ValueError(f"folds must be >= 1, got {s['folds']}")
        if not isinstance(s["balance"], bool):
            raise ValueError(f"balance must be true or false, got {s['balance']!r}")
        out.append(s)
    return out


@register
class TransferZeroShot(FoldEvaluator):
    type, protocol, default_splits = "transfer_zero_shot", "zero_shot", tasks.ZERO_SHOT

    def fit_predict(self, ctx, split):
        return zeroshot.zero_shot_probs(ctx.zimg[split.test], ctx.prototypes, ctx.scale), {}


@register
class TransferLinearProbe(FoldEvaluator):
    """FLAIR's linear probe: the one linear probe (evals/linear_probe.py), softmax, balanced classes,
    on the raw pre-projection features."""
    type, protocol, default_splits = "transfer_linear_probe", "linear_probe", tasks.LINEAR_PROBE

    def fit_predict(self, ctx, split):
        return linear_probe.fit_predict(ctx.features[split.train], ctx.labels[split.train], ctx.features[split.test],
                                        num_classes=len(ctx.task.classes), c=self.settings.c, balanced=True,
                                        max_iter=self.settings.max_iter)


@register
class TransferClipAdapter(FoldEvaluator):
    type, protocol, default_splits = "transfer_clip_adapter", "clip_adapter", tasks.FEW_SHOT

    def fit_predict(self, ctx, split):
        s = self.settings
        params = adapters.train_clip_adapter(ctx.zimg[split.train], ctx.labels[split.train], ctx.prototypes, ctx.scale,
                                             epochs=s.epochs, lr=s.lr, ratio=s.ratio, seed=split.seed)
        return adapters.clip_adapter_probs(params, ctx.zimg[split.test], ctx.prototypes, ctx.scale, s.ratio), {}


@register
class TransferTipAdapter(FoldEvaluator):
    """Tip-Adapter's cache model; `search` tunes alpha and beta on the validation split."""
    type, protocol, default_splits = "transfer_tip_adapter", "tip_adapter", tasks.FEW_SHOT
    trained = False

    def fit_predict(self, ctx, split):
        s = self.settings
        values = adapters.one_hot(ctx.labels[split.train], len(ctx.task.classes))
        keys = ctx.zimg[split.train]
        if self.trained:
            keys = adapters.train_tip_adapter_f(keys, ctx.labels[split.train], ctx.prototypes, ctx.scale,
                                                epochs=s.epochs, lr=s.lr, alpha=s.alpha, beta=s.beta, seed=split.seed)
        alpha, beta = s.alpha, s.beta
        if s.search:
            alpha, beta = adapters.search_tip_hyperparameters(ctx.zimg[split.val], ctx.labels[split.val],
                                                              ctx.prototypes, keys, values)
        test = (ctx.zimg_augmented if s.test_augment else ctx.zimg)[split.test]
        return adapters.tip_adapter_probs(test, ctx.prototypes, keys, values, alpha, beta), {"alpha": alpha,
                                                                                             "beta": beta}


@register
class TransferTipAdapterF(TransferTipAdapter):
    """Tip-Adapter-F: the cache keys trained first."""
    type, protocol = "transfer_tip_adapter_f", "tip_adapter_f"
    trained = True


@register
class TransferFinetune(FoldEvaluator):
    """FLAIR's full fine-tune: the one fine-tune (evals/finetune.py), softmax, early stopping."""
    type, protocol = "transfer_finetune", "finetune"
    default_splits = {"shots_train": "70%", "shots_val": "10%", "shots_test": "20%", "folds": 1, "balance": False}

    def fit_predict(self, ctx, split):
        s, y = self.settings, ctx.labels
        out = finetune_lib.finetune(
            ctx.encoder.tower_features, ctx.encoder.image_tower(), ctx.images[split.train], y[split.train],
            ctx.images[split.val], y[split.val], ctx.images[split.test], num_classes=len(ctx.task.classes),
            epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, weight_decay=s.weight_decay, grad_clip=s.grad_clip,
            eps=s.eps, patience=s.patience, seed=split.seed, eval_batch_size=self.config.heldout.batch_size)
        return out.test_probs, {"best_epoch": out.best_epoch, "epochs_run": len(out.history),
                                "best_val_f1": out.history[out.best_epoch - 1]["val_score"]}


# ------------------------------------------------------------------------------- whole-task runs
class MultilabelEvaluator(TaskEvaluator):
    """ViLReF's multi-label transfer (docs/methods.md, "ViLReF": Evaluation) on the task's fixed
    train/test parts (the held-out findings corpora) or a seeded 80% / 20% split of a public task;
    `fit_scores(ctx, split) -> ([N_test, C] scores, extra metrics)`."""
    kind = "multilabel"
    split_fields = ("task",)

    def evaluate(self, ctx, encoder):
        split = ctx.task.fixed_split or splits.random_split(len(ctx.task.source), 0, "80%", "20%")
        scores, extra = self.fit_scores(ctx, split)
        metrics = {**multilabel_metrics(ctx.labels[split.test], scores), **extra}
        return ({"metrics": {self.name: metrics}, "split": {"num_train": len(split.train), "num_test": len(split.test)}},
                {"labels": ctx.labels[split.test], "scores": {self.name: scores}})


@register
class MultilabelLinearProbe(MultilabelEvaluator):
    """The one linear probe (evals/linear_probe.py), one sigmoid head per finding on train-standardised
    pre-projection features."""
    type, prefix = "multilabel_linear_probe", "linear_probe/"

    def fit_scores(self, ctx, split):
        x, y = ctx.features, ctx.labels
        return linear_probe.fit_predict(x[split.train], y[split.train], x[split.test], num_classes=y.shape[1],
                                        c=self.settings.c, standardize=True, max_iter=self.settings.max_iter)


@register
class MultilabelFinetune(MultilabelEvaluator):
    """The one fine-tune (evals/finetune.py) with sigmoid heads, on a copy of the tower (the original
    fine-tunes the pretraining model in place), no validation split: the last epoch's weights."""
    type, prefix = "multilabel_finetune", "finetune/"

    def fit_scores(self, ctx, split):
        s, y = self.settings, ctx.labels
        out = finetune_lib.finetune(
            ctx.encoder.tower_features, ctx.encoder.image_tower(), ctx.images[split.train], y[split.train],
            ctx.images[:0], y[:0], ctx.images[split.test], num_classes=y.shape[1], epochs=s.epochs,
            batch_size=s.batch_size, lr=s.lr, weight_decay=s.weight_decay, grad_clip=s.grad_clip, eps=s.eps,
            seed=self.config.seed, eval_batch_size=self.config.heldout.batch_size)
        return out.test_probs, {"train_loss_first": out.history[0]["train_loss"],
                                "train_loss_last": out.history[-1]["train_loss"]}


@register
class TransferRetrieval(TaskEvaluator):
    type, kind = "transfer_retrieval", "retrieval"
    split_fields = ("task",)

    def evaluate(self, ctx, encoder):
        texts = [ctx.task.text(ctx.task.source.record(int(i))) for i in ctx.labels]
        ranks = retrieval.retrieval_ranks(ctx.zimg, ctx.text_embeddings(texts), texts)
        return {"metrics": {"recall": retrieval.recall_summary(ranks)}}, {"ranks": ranks}


@register
class TransferSegmentation(TaskEvaluator):
    """Lesion/anatomy segmentation transfer: a U-Net decoder on the image tower (docs/methods.md, "ViLReF")."""
    type, kind = "transfer_segmentation", "segmentation"
    split_fields = ()

    def evaluate(self, ctx, encoder):
        s, config = self.settings, self.config
        size = config.data.image_size
        train = segmentation_lib.synthetic_segmentation_data(config, "train", s.train_size, size)
        test = segmentation_lib.synthetic_segmentation_data(config, "test", s.test_size, size)
        result = segmentation_lib.segmentation_transfer(
            encoder.model, encoder.variables, *train, *test, steps=s.steps, lr=s.lr, batch_size=s.batch_size,
            finetune_encoder=s.finetune, class_names=ctx.task.classes, seed=config.seed)
        return {"metrics": {"segmentation": result}}, None

    def summary(self, result):
        return {k: v for k, v in result["metrics"]["segmentation"].items() if isinstance(v, (int, float))}
