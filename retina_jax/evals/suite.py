"""The transfer-evaluation suite (docs/methods.md, "FLAIR": Transfer protocols; "ViLReF": Evaluation):
one call runs one protocol of a checkpoint on one task and writes its JSON and Markdown report.

Protocols (`PROTOCOLS`, a registry: a new protocol such as segmentation is one entry there, its
held-out synthetic task one in `SYNTHETIC_TASKS` and `DEFAULT_TASKS`):
- classification, run per FLAIR fold (`splits.py`), scored by ACA, quadratic kappa, macro F1, AUC:
  `zero_shot` (prompt-ensemble prototypes), `linear_probe`, `clip_adapter`, `tip_adapter`,
  `tip_adapter_f` (`adapters.py`), `finetune` (`finetune.py`, early stopping on the validation split);
- `multilabel`: ViLReF's sigmoid heads (`multilabel.py`: linear probe and fine-tuning), macro AUC, mAP;
- `retrieval`: image <-> report recall@1/5/10 (`retrieval.py`).

Tasks (`load_task`): the held-out synthetic ones, `config.eval.zero_shot.name` (single-label
conditions, the default of every classification protocol), `synthetic_conditions_external` (the same
classes on another held-out draw, an external test set), `synthetic_dr_grade` (the DR grade of the
same images), `synthetic_findings` (the multi-label findings of `pipeline.multilabel_source`: its
fixed train and test corpora) and `synthetic_reports` (`retrieval_size` image-report pairs of a
held-out seed, the report in the run's language), or a public task of `retina_jax.evals.tasks` (a
FLAIR-format dataframe) read from a data root.

External test sets (FLAIR's `--experiment_test`, `main_transferability.py`): the classification
protocols also score other tasks with the same classes (`externals`; CLI `--test_task`), e.g.
DeepDRiD's or MMAC's test sets after adapting on their training sets. As in FLAIR, each fold's fitted
adapter predicts every row of each external task, and the external metrics are averaged over folds;
the internal test split may then be empty (`shots_test 0`). Here one fit per fold predicts the
internal and the external rows together (`_WithExternals`). A task file's own
`splits.<protocol>.experiment_test` is not read: external tests are named by the caller.

Split defaults per protocol (a task's `splits` and the caller override them), `evals/tasks.py`'s:
zero-shot 0 train / 100% test, 1 fold and the linear probe 80% / 20%, 5 folds (FLAIR's README); the
adapters 5 shots per class / 20%, 5 folds (KeepFIT's README). Ours: fine-tuning 70% train / 10%
validation / 20% test, 1 fold (FLAIR's command-line default of 1 fold; the original's default of no
validation split cannot run), and a public multi-label task's seeded 80% / 20% split.

Tip-Adapter quirk kept (switch `tip_test_augment`, default on): FLAIR's `TipAdapter.predict` passes the
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
from retina_jax.evals import adapters, finetune as finetune_lib, multilabel, report, retrieval, splits, tasks, zeroshot
from retina_jax.evals import segmentation_transfer as segmentation_lib
from retina_jax.evals.metrics import classification_metrics

KINDS = ("classification", "multilabel", "retrieval", "segmentation")
DR_GRADE_TASK = "synthetic_dr_grade"
FINDINGS_TASK = "synthetic_findings"
REPORTS_TASK = "synthetic_reports"
SEGMENTATION_TASK = "synthetic_lesions"
RETRIEVAL_SEED = 40_009  # the held-out image-report pairs; never a training seed (checked)
EXTERNAL_TASK = "synthetic_conditions_external"
EXTERNAL_SEED = 50_021  # its images: a second held-out draw of the zero-shot conditions (checked as above)
SPLIT_KEYS = ("shots_train", "shots_val", "shots_test", "folds", "balance")


@dataclasses.dataclass(frozen=True)
class Options:
    """Protocol hyperparameters; the defaults are the originals' (adapters.py, finetune.py)."""
    linear_probe_c: float = adapters.LINEAR_PROBE_C
    linear_probe_max_iter: int = adapters.LINEAR_PROBE_MAX_ITER
    adapter_epochs: int = adapters.ADAPTER_EPOCHS
    adapter_lr: float = adapters.ADAPTER_LR
    clip_adapter_ratio: float = adapters.CLIP_ADAPTER_RATIO
    tip_alpha: float = adapters.TIP_ALPHA
    tip_beta: float = adapters.TIP_BETA
    tip_search: bool = False  # Tip-Adapter's alpha/beta grid search on the validation split
    tip_test_augment: bool = True  # FLAIR's augmented Tip-Adapter test features (module docstring)
    finetune_epochs: int = finetune_lib.FINETUNE_EPOCHS
    finetune_lr: float = finetune_lib.FINETUNE_LR
    finetune_batch_size: int = finetune_lib.FINETUNE_BATCH_SIZE
    finetune_patience: int = finetune_lib.FINETUNE_PATIENCE
    finetune_weight_decay: float = finetune_lib.FINETUNE_WEIGHT_DECAY
    retrieval_size: int = 200
    # Segmentation transfer (evals/segmentation_transfer.py): decoder training on the held-out corpus's masks.
    segmentation_train_size: int = 256
    segmentation_test_size: int = 128
    segmentation_steps: int = 300
    segmentation_lr: float = 1e-3
    segmentation_batch_size: int = 16
    segmentation_finetune: bool = False  # False: frozen image tower, only the U-Net decoder trains

    @classmethod
    def parse(cls, items: Sequence[str]) -> Options:
        """`['adapter_epochs=10', 'tip_search=true']` -> Options; unknown keys and bad values name the item."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for item in items:
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in fields:
                raise ValueError(f"option {item!r}: expected key=value with key one of {sorted(fields)}")
            kind = type(fields[key].default)
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"option {item!r}: expected true or false")
                values[key] = value.lower() in ("true", "1")
            else:
                try:
                    values[key] = kind(value)
                except ValueError as e:
                    raise ValueError(f"option {item!r}: not a valid {kind.__name__}") from e
        return cls(**values)


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


def _conditions_task(config, options: Options) -> TaskData:
    z = config.eval.zero_shot
    classes = tuple(z.classes)
    return TaskData(z.name, "classification", pipeline.heldout_source(config),
                    lambda example: classes.index(example["conditions"][0]), classes)


def _dr_grade_task(config, options: Options) -> TaskData:
    return TaskData(DR_GRADE_TASK, "classification", pipeline.heldout_source(config),
                    lambda example: example["dr_grade"], tuple(knowledge.DR_GRADE_CATEGORIES))


def _findings_task(config, options: Options) -> TaskData:
    train, test = pipeline.multilabel_source(config, "train"), pipeline.multilabel_source(config, "test")
    fixed = splits.Split(seed=config.eval.linear_probe.seed, train=np.arange(len(train)),
                         val=np.zeros((0,), np.int64), test=len(train) + np.arange(len(test)))
    return TaskData(FINDINGS_TASK, "multilabel", _Concat(train, test), lambda example: example["labels"],
                    tuple(knowledge.FINDINGS), fixed_split=fixed)


def _external_conditions_task(config, options: Options) -> TaskData:
    # The zero-shot task's classes on another held-out draw: the synthetic stand-in for an external
    # test set (FLAIR's --experiment_test) of the classification protocols.
    if EXTERNAL_SEED in (config.data.synthetic.seed, config.data.expert.seed, config.eval.zero_shot.seed):
        raise ValueError(f"{EXTERNAL_TASK}: its seed {EXTERNAL_SEED} is a corpus seed of this config")
    z = config.eval.zero_shot
    classes = tuple(z.classes)
    source = SyntheticFundus(dataclasses.replace(pipeline.heldout_source(config).spec, seed=EXTERNAL_SEED))
    return TaskData(EXTERNAL_TASK, "classification", source,
                    lambda example: classes.index(example["conditions"][0]), classes)


def _reports_task(config, options: Options) -> TaskData:
    s, z = config.data.synthetic, config.eval.zero_shot
    if RETRIEVAL_SEED in (s.seed, config.data.expert.seed):
        raise ValueError(f"{REPORTS_TASK}: its seed {RETRIEVAL_SEED} is a training corpus seed of this config "
                         "(config.data.synthetic.seed or config.data.expert.seed)")
    source = SyntheticFundus(CorpusSpec(
        seed=RETRIEVAL_SEED, size=options.retrieval_size, image_size=s.image_size,
        comorbidity_prob=s.comorbidity_prob, attribute_prob=s.attribute_prob, expert_fraction=0.0,
        difficulty=s.difficulty))
    reports = config.data.stream == "reports"
    language = config.data.reports.language if reports else z.language
    drop = config.data.reports.drop_chars if reports else 0
    return TaskData(REPORTS_TASK, "retrieval", source, lambda example: example["index"],
                    text=lambda example: pipeline.report_text(example, language, drop))


def _segmentation_task(config, options: Options) -> TaskData:
    # The images and masks come from `segmentation.synthetic_segmentation_data` (the multi-label
    # transfer's held-out corpora); the source here only names the test corpus.
    return TaskData(SEGMENTATION_TASK, "segmentation", pipeline.multilabel_source(config, "test"),
                    lambda example: example["index"], tuple(segmentation_lib.MASK_CLASSES))


# The held-out synthetic tasks by name (besides the config's own zero-shot task, named by
# `config.eval.zero_shot.name`), and the one each kind of protocol runs on by default.
SYNTHETIC_TASKS: dict[str, Callable[..., TaskData]] = {
    DR_GRADE_TASK: _dr_grade_task, EXTERNAL_TASK: _external_conditions_task, FINDINGS_TASK: _findings_task,
    REPORTS_TASK: _reports_task, SEGMENTATION_TASK: _segmentation_task}
DEFAULT_TASKS = {"multilabel": FINDINGS_TASK, "retrieval": REPORTS_TASK, "segmentation": SEGMENTATION_TASK}


def synthetic_task_names(config) -> list[str]:
    return [config.eval.zero_shot.name, *SYNTHETIC_TASKS]


def load_task(config, name: str, data_root: str | None = None, options: Options = Options()) -> TaskData:
    """A task by name: a held-out synthetic task of `config` (`synthetic_task_names`; the images come
    from the config's held-out corpora) or a task of `retina_jax.evals.tasks` (a shipped name or a task
    file) read from `data_root`. A task file's split defaults and prompt texts are used for both."""
    registered = tasks.load_task(name) if name in tasks.list_tasks() or name.endswith(".json") else None
    if name in synthetic_task_names(config):
        data = (_conditions_task if name == config.eval.zero_shot.name else SYNTHETIC_TASKS[name])(config, options)
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
    descriptions = registered.descriptions if config.eval.zero_shot.language == "en" else registered.descriptions_zh
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

    The preprocessed images stay in memory (one pass over the source renders or reads them once).
    """

    def __init__(self, config, encoder, task: TaskData):
        if jax.process_count() > 1:
            # The protocols fit on the host (sklearn, single-sample adapters) from this process's rows.
            raise RuntimeError("the transfer suite runs in a single process; run retina_jax.evaluate on one host")
        self.config, self.encoder, self.task = config, encoder, task

    @functools.cached_property
    def _batches(self) -> list:
        config = self.config
        return list(pipeline.heldout_batches(config, config.eval.batch_size, self.task.source, self.task.label))

    @functools.cached_property
    def labels(self) -> np.ndarray:
        return np.concatenate([y[valid] for _, y, valid in self._batches])

    @functools.cached_property
    def zimg(self) -> np.ndarray:
        return self.encoder.embed_images(self._batches)[0]

    @functools.cached_property
    def features(self) -> np.ndarray:
        return self.encoder.image_features(self._batches)[0]

    @functools.cached_property
    def images(self) -> np.ndarray:
        return np.concatenate([images[valid] for images, _, valid in self._batches])

    @functools.cached_property
    def zimg_augmented(self) -> np.ndarray:
        rng, recipe, mode = np.random.default_rng(0), _flair_augment_recipe(), self.config.data.preprocess
        batches = [(_augment_batch(images, mode, rng, recipe), y, valid) for images, y, valid in self._batches]
        return self.encoder.embed_images(batches)[0]

    @functools.cached_property
    def prototypes(self) -> np.ndarray:
        z = self.config.eval.zero_shot
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
        size, out = self.config.eval.batch_size, []
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


# ----------------------------------------------------------------------------- classification
def _zero_shot(ctx: TaskFeatures, split: splits.Split, options: Options):
    return zeroshot.zero_shot_probs(ctx.zimg[split.test], ctx.prototypes, ctx.scale), {}


def _linear_probe(ctx: TaskFeatures, split: splits.Split, options: Options):
    clf = adapters.fit_linear_probe(ctx.features[split.train], ctx.labels[split.train], c=options.linear_probe_c,
                                    max_iter=options.linear_probe_max_iter)
    return adapters.linear_probe_probs(clf, ctx.features[split.test], len(ctx.task.classes)), \
        {"iterations": int(np.max(clf.n_iter_))}


def _clip_adapter(ctx: TaskFeatures, split: splits.Split, options: Options):
    params = adapters.train_clip_adapter(ctx.zimg[split.train], ctx.labels[split.train], ctx.prototypes, ctx.scale,
                                         epochs=options.adapter_epochs, lr=options.adapter_lr,
                                         ratio=options.clip_adapter_ratio, seed=split.seed)
    return adapters.clip_adapter_probs(params, ctx.zimg[split.test], ctx.prototypes, ctx.scale,
                                       options.clip_adapter_ratio), {}


def _tip(ctx: TaskFeatures, split: splits.Split, options: Options, trained: bool):
    num_classes = len(ctx.task.classes)
    values = adapters.one_hot(ctx.labels[split.train], num_classes)
    keys = ctx.zimg[split.train]
    if trained:
        keys = adapters.train_tip_adapter_f(keys, ctx.labels[split.train], ctx.prototypes, ctx.scale,
                                            epochs=options.adapter_epochs, lr=options.adapter_lr,
                                            alpha=options.tip_alpha, beta=options.tip_beta, seed=split.seed)
    alpha, beta = options.tip_alpha, options.tip_beta
    if options.tip_search:
        alpha, beta = adapters.search_tip_hyperparameters(ctx.zimg[split.val], ctx.labels[split.val], ctx.prototypes,
                                                          keys, values)
    test = (ctx.zimg_augmented if options.tip_test_augment else ctx.zimg)[split.test]
    return adapters.tip_adapter_probs(test, ctx.prototypes, keys, values, alpha, beta), {"alpha": alpha, "beta": beta}


def _finetune(ctx: TaskFeatures, split: splits.Split, options: Options):
    y = ctx.labels
    out = finetune_lib.finetune(
        ctx.encoder.tower_features, ctx.encoder.image_tower(), ctx.images[split.train], y[split.train],
        ctx.images[split.val], y[split.val], ctx.images[split.test], num_classes=len(ctx.task.classes),
        epochs=options.finetune_epochs, batch_size=options.finetune_batch_size, lr=options.finetune_lr,
        weight_decay=options.finetune_weight_decay, patience=options.finetune_patience, seed=split.seed,
        eval_batch_size=ctx.config.eval.batch_size)
    return out.test_probs, {"best_epoch": out.best_epoch, "epochs_run": len(out.history),
                            "best_val_f1": out.history[out.best_epoch - 1]["val_f1"]}


# ------------------------------------------------------------------------------- whole-task runs
def _multilabel(ctx: TaskFeatures, settings: list[dict], options: Options) -> dict:
    """ViLReF's multi-label transfer with the config's `eval.linear_probe` / `eval.finetune` settings."""
    config, task = ctx.config, ctx.task
    split = task.fixed_split or splits.random_split(len(task.source), 0, settings[0]["shots_train"],
                                                    settings[0]["shots_test"])
    x, y = ctx.features, ctx.labels
    lp, ft = config.eval.linear_probe, config.eval.finetune
    scores = {"linear_probe": {}, "finetune": {}}
    probe = multilabel.linear_probe(x[split.train], y[split.train], x[split.test], y[split.test], l2=lp.l2,
                                    steps=lp.steps, lr=lp.lr, seed=config.seed, scores_out=scores["linear_probe"])
    tuned = multilabel.finetune(
        ctx.encoder.tower_features, ctx.encoder.image_tower(), ctx.images[split.train], y[split.train],
        ctx.images[split.test], y[split.test], feature_dim=x.shape[1], steps=ft.steps, batch_size=ft.batch_size,
        lr=ft.lr, weight_decay=ft.weight_decay, seed=config.seed, scores_out=scores["finetune"])
    return {"metrics": {"linear_probe": probe, "finetune": tuned},
            "predictions": {"labels": y[split.test], "scores": {k: v["scores"] for k, v in scores.items()}},
            "split": {"num_train": len(split.train), "num_test": len(split.test)},
            "config": {"eval.linear_probe": {k: lp[k] for k in ("l2", "steps", "lr")},
                       "eval.finetune": {k: ft[k] for k in ("steps", "batch_size", "lr", "weight_decay")}}}


def _retrieval(ctx: TaskFeatures, settings: list[dict], options: Options) -> dict:
    texts = [ctx.task.text(ctx.task.source.record(int(i))) for i in ctx.labels]
    ranks = retrieval.retrieval_ranks(ctx.zimg, ctx.text_embeddings(texts), texts)
    return {"metrics": {"recall": retrieval.recall_summary(ranks)},
            "predictions": {"ranks": ranks}}


def _segmentation(ctx: TaskFeatures, settings: list[dict], options: Options) -> dict:
    """Lesion/anatomy segmentation transfer: a U-Net decoder on the image tower (docs/methods.md, "ViLReF")."""
    config = ctx.config
    size = config.data.image_size
    train = segmentation_lib.synthetic_segmentation_data(config, "train", options.segmentation_train_size, size)
    test = segmentation_lib.synthetic_segmentation_data(config, "test", options.segmentation_test_size, size)
    result = segmentation_lib.segmentation_transfer(
        ctx.encoder.model, ctx.encoder.variables, *train, *test, steps=options.segmentation_steps, lr=options.segmentation_lr,
        batch_size=options.segmentation_batch_size, finetune_encoder=options.segmentation_finetune,
        class_names=ctx.task.classes, seed=config.seed)
    return {"metrics": {"segmentation": result}}


@dataclasses.dataclass(frozen=True)
class Protocol:
    """`kind`: the task kind it runs on. A `per_fold` protocol maps (features, split, options) to
    ([N_test, C] test probabilities, extra per-fold values) and the suite runs its folds and shot
    settings; otherwise `run(features, settings, options)` returns {'metrics': {table: {name: value}}, ...}
    and optionally 'predictions', the arrays `report.write_report` plots for that kind."""
    kind: str
    run: Callable
    per_fold: bool
    splits: dict  # default split settings
    options: tuple[str, ...] = ()  # the `Options` fields it reads (recorded in its report)


_ADAPTER = ("adapter_epochs", "adapter_lr")
_TIP = ("tip_alpha", "tip_beta", "tip_search", "tip_test_augment")
PROTOCOLS: dict[str, Protocol] = {
    "zero_shot": Protocol("classification", _zero_shot, True, tasks.ZERO_SHOT),
    "linear_probe": Protocol("classification", _linear_probe, True, tasks.LINEAR_PROBE,
                             ("linear_probe_c", "linear_probe_max_iter")),
    "clip_adapter": Protocol("classification", _clip_adapter, True, tasks.FEW_SHOT,
                             _ADAPTER + ("clip_adapter_ratio",)),
    "tip_adapter": Protocol("classification", functools.partial(_tip, trained=False), True, tasks.FEW_SHOT, _TIP),
    "tip_adapter_f": Protocol("classification", functools.partial(_tip, trained=True), True, tasks.FEW_SHOT,
                              _ADAPTER + _TIP),
    "finetune": Protocol("classification", _finetune, True,
                         {"shots_train": "70%", "shots_val": "10%", "shots_test": "20%", "folds": 1, "balance": False},
                         tuple(f.name for f in dataclasses.fields(Options) if f.name.startswith("finetune_"))),
    "multilabel": Protocol("multilabel", _multilabel, False,
                           {"shots_train": "80%", "shots_val": "0", "shots_test": "20%", "folds": 1, "balance": False}),
    "retrieval": Protocol("retrieval", _retrieval, False, {}, ("retrieval_size",)),
    "segmentation": Protocol("segmentation", _segmentation, False, {},
                             tuple(f.name for f in dataclasses.fields(Options) if f.name.startswith("segmentation_"))),
}


def default_task(config, protocol: str) -> str:
    """The held-out synthetic task a protocol runs on when none is named."""
    kind = get_protocol(protocol).kind
    if kind == "classification":
        return config.eval.zero_shot.name
    if kind not in DEFAULT_TASKS:
        raise ValueError(f"protocol {protocol!r} has no synthetic default task: name one with --task")
    return DEFAULT_TASKS[kind]


def get_protocol(name: str) -> Protocol:
    """The registered protocol `name`; an unknown name is an error listing the known ones."""
    if name not in PROTOCOLS:
        raise KeyError(f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def split_settings(protocol: str, task: TaskData, shots_train: Sequence[str] | str | None = None,
                   shots_test: str | None = None, shots_val: str | None = None,
                   folds: int | None = None) -> list[dict]:
    """One settings dict per `shots_train` value: protocol defaults < the task's `splits[protocol]` <
    the arguments given (None keeps the default). A protocol without split defaults (retrieval scores
    every pair) gets one empty settings dict."""
    settings = dict(get_protocol(protocol).splits)
    if not settings:
        return [{}]
    task_settings = task.splits.get(protocol, {})
    external = [k for k in ("experiment_val", "experiment_test") if task_settings.get(k)]
    if external:
        raise ValueError(f"task {task.name!r}: splits.{protocol}.{external[0]} is not read from a task file; name "
                         "the external test tasks instead (run_protocol externals=, --test_task)")
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


def _run_folds(protocol: Protocol, ctx: TaskFeatures, settings: list[dict], options: Options,
               externals: Sequence[TaskFeatures] = ()):
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
            probs, extra = protocol.run(joined, dataclasses.replace(split, test=test), options)
            if probs.shape != (len(test), num_classes):
                raise ValueError(f"protocol returned probabilities {probs.shape}, expected ({len(test)}, "
                                 f"{num_classes})")
            base = {"fold": k, "seed": split.seed, "num_train": len(split.train), "num_val": len(split.val)}
            parts = np.split(np.arange(len(test)), np.cumsum([len(split.test), *map(len, external_rows)])[:-1])
            for name, rows in [(None, parts[0]), *zip([f.task.name for f in externals], parts[1:])]:
                if not len(rows):
                    continue  # no internal test split: the external tasks only
                labels = joined.labels[test[rows]]
                fold = {**base, "num_test": len(rows), **classification_metrics(labels, probs[rows]), **extra}
                (folds if name is None else outside[name]).append(fold)
                logging.info("fold %d (shots_train=%s)%s: %s", k, s["shots_train"],
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


def run_protocol(config, encoder, protocol: str, task: TaskData, out_dir: str, *, checkpoint: str = "",
                 step: int = 0,
                 shots_train: Sequence[str] | str | None = None, shots_test: str | None = None,
                 shots_val: str | None = None, folds: int | None = None, options: Options = Options(),
                 features: TaskFeatures | None = None, externals: Sequence[TaskData | TaskFeatures] = ()) -> dict:
    """Run `protocol` on `task` with a model (`encoder`, bound to the variables of `checkpoint` at
    `step`); writes
    `<out_dir>/<task>/<protocol>.json`, `.md` and plots, and returns the result (with `report`: the paths).

    `features` shares the model's outputs on `task` between protocols (built here when None);
    `externals` are external test tasks (or their features), scored per fold by the adapted model
    (module docstring): each settings entry of the result then has `external[name]` with its folds,
    mean and std.
    """
    spec = get_protocol(protocol)
    if task.kind != spec.kind:
        raise ValueError(f"protocol {protocol!r} runs on {spec.kind} tasks; task {task.name!r} is {task.kind}")
    ctx = features if features is not None else TaskFeatures(config, encoder, task)
    if ctx.task is not task:
        raise ValueError(f"features were computed for task {ctx.task.name!r}, not {task.name!r}")
    externals = [e if isinstance(e, TaskFeatures) else TaskFeatures(config, encoder, e) for e in externals]
    for e in externals:
        check_external(task, e.task)
    if externals and not spec.per_fold:
        raise ValueError(f"protocol {protocol!r}: external test tasks apply to the per-fold classification "
                         "protocols")
    settings = split_settings(protocol, task, shots_train, shots_test, shots_val, folds)
    t0 = time.time()
    result = {"task": task.name, "protocol": protocol, "kind": task.kind, "checkpoint": checkpoint,
              "step": step, "classes": list(task.classes),
              "options": {k: getattr(options, k) for k in spec.options}}
    predictions = None
    if spec.per_fold:
        result["settings"], plotted = _run_folds(spec, ctx, settings, options, externals)
        if plotted is not None:
            predictions, result["plotted"] = plotted
    else:
        result.update(spec.run(ctx, settings, options))
        predictions = result.pop("predictions", None)  # arrays for the report's plots, not JSON
    result["seconds"] = time.time() - t0
    paths = report.write_report(os.path.join(out_dir, task.name), result, predictions)
    return {**result, "report": paths}
