"""grain input pipelines: the FLAIR categorical stream (docs/methods.md, "FLAIR"), ViLReF's report
stream ("ViLReF") and held-out eval sets.

Training stream: source -> shuffle -> per-example FLAIR transform (image preprocessing and
augmentation, prompt "A [ATR] fundus photograph of [CLS]" with the category sampled from the
example's list and optionally swapped for one of its expert descriptions) -> repeat with per-epoch
reseeding -> this process's rows of each global batch (`ProcessRows`) -> batch (tokenised per
batch) -> iterator. Every random choice is
drawn from grain's per-index generator, so a pipeline position reproduces the same batch, and the
iterator state saved with a checkpoint resumes the exact data position.

KeepFIT's expert stream (`data.expert`, docs/methods.md, "KeepFIT") is a second pipeline of image-caption pairs
drawn uniformly with replacement (no augmentation, captions as they are), zipped with the public
one: every element holds both batches (the expert ones under `expert_*` keys), so the one iterator
state saved with a checkpoint holds the position of both streams.

The report stream (`data.stream='reports'`) yields the image (ViLReF's augmentations), its report in
`data.reports.language` (optionally without its first `drop_chars` characters) and the multi-hot
finding labels the expert-knowledge extractor reads off that report.

Datasets on disk (`data.source='files'`: FLAIR/KeepFIT CSVs, MM-Retinal CSVs, ViLReF LMDB, JSON
lines, ArrayRecord shards) take the same transforms behind files.py's guard against bad input and
its dataset mixing; every batch then carries `skipped`, the bad examples passed over to fill it.

Each process builds its local slice of the global batch; `make_global` assembles the global
`jax.Array` sharded over the mesh's `data` axis.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import types

import grain
import jax
import numpy as np
from absl import logging

from retina_jax.data import files, knowledge, transforms
from retina_jax.data.render_cache import maybe_cached
from retina_jax.data.images import DataError
from retina_jax.data.labels import EYES, LabelExtractor, label_names, log_coverage
from retina_jax.data.synthetic import CorpusSpec, SyntheticFundus
from retina_jax.data.text_corpus import TextSource, WholeWordMask, read_text_folder
from retina_jax.data.tokenizer import Tokenize, learn_wordpiece

_SPACES = re.compile(r"\s+")


# KeepFIT V2's modality-aware prompts (docs/methods.md, "KeepFIT V2"): a template's `{modality}` names the
# example's imaging modality, e.g. "A {atr} {modality} of {cls}" -> "A fluorescein angiography of ...".
MODALITY_NAMES = {"CFP": "fundus photograph", "FFA": "fluorescein angiography", "OCT": "OCT scan"}


def make_prompt(template: str, atr: str, cls: str, modality: str = "CFP") -> str:
    if modality not in MODALITY_NAMES:
        raise ValueError(f"unknown modality {modality!r}; known: {sorted(MODALITY_NAMES)}")
    # FLAIR collapses the double space left by an empty attribute.
    return _SPACES.sub(" ", template.format(atr=atr, cls=cls, modality=MODALITY_NAMES[modality])).strip()


def synthetic_source(config) -> SyntheticFundus:
    s = config.data.synthetic
    return _synthetic(config, CorpusSpec(
        seed=s.seed, size=s.size, image_size=s.image_size, comorbidity_prob=s.comorbidity_prob,
        attribute_prob=s.attribute_prob, expert_fraction=s.expert_fraction, difficulty=s.difficulty))


def _synthetic(config, spec: CorpusSpec):
    """The source of a synthetic corpus, drawn once into `data.synthetic.cache_dir` when one is set."""
    return maybe_cached(SyntheticFundus(spec), config.data.synthetic.cache_dir)


def expert_source(config, seed: int | None = None, size: int | None = None) -> SyntheticFundus:
    """KeepFIT's expert image-caption set (MM-Retinal's role) for the embedded default: a synthetic
    corpus of its own seed in which every example carries an expert caption, in the modalities of
    `data.expert.modalities` (CFP only for KeepFIT; CFP, FFA and OCT for KeepFIT V2)."""
    e, s = config.data.expert, config.data.synthetic
    return _synthetic(config, CorpusSpec(
        seed=e.seed if seed is None else seed, size=e.size if size is None else size, image_size=s.image_size,
        comorbidity_prob=s.comorbidity_prob, attribute_prob=s.attribute_prob, expert_fraction=1.0,
        difficulty=s.difficulty, modalities=tuple(e.modalities), modality_weights=tuple(e.modality_weights) or None))


def caption_source(config) -> SyntheticFundus:
    """KeepFIT V2's held-out caption split: the expert set's kind of data from `heldout.captions.seed`."""
    return expert_source(config, seed=config.heldout.captions.seed, size=config.heldout.captions.size)


def heldout_source(config) -> SyntheticFundus:
    """The held-out zero-shot task: one condition per image, seeds never used for training."""
    z = config.heldout.conditions
    return _synthetic(config, CorpusSpec(
        seed=z.seed, size=z.size, image_size=config.data.synthetic.image_size, conditions=tuple(z.classes),
        comorbidity_prob=0.0, attribute_prob=0.0, expert_fraction=0.0, difficulty=z.difficulty,
        single_condition=True))


def vocabulary_texts(config) -> list[str]:
    """Texts a learned vocabulary must cover: every prompt word, description, attribute and
    zero-shot template (Chinese texts too when the run trains on Chinese reports), the classes and
    descriptions of the tasks it evaluates on, and up to `text.vocab_corpus_size` examples of every
    corpus it trains on: the synthetic corpus, or with data.source='files' each dataset on disk
    (read without decoding an image)."""
    modalities = MODALITY_NAMES if "{modality}" in config.data.prompt_template else ("CFP",)
    texts = [make_prompt(config.data.prompt_template, atr, "", modality)
             for atr in ("",) + knowledge.ATTRIBUTES for modality in modalities]
    texts += [t.format("") for t in config.prompts.templates]
    for name, descriptions in knowledge.CATEGORY_DESCRIPTIONS.items():
        texts.append(name)
        texts.extend(descriptions)
    chinese = config.data.stream == "reports" and config.data.reports.language == "zh"
    if chinese or config.prompts.language == "zh":
        texts += [d for descriptions in knowledge.CATEGORY_DESCRIPTIONS_ZH.values() for d in descriptions]
    texts += _task_texts(config)
    n = config.text.vocab_corpus_size

    def report_texts(record):  # this order is the one every demo's vocabulary was learned with
        return [record["report_en"], *([record["report_zh"]] if chinese else []), record["caption"]]

    def caption_texts(record):
        return [record["caption"], *([record["report_zh"]] if chinese else [])]

    if config.data.source == "files":
        # A category or attribute reaches the text tower inside the prompt: its words are learned too.
        corpora = [(source, lambda r: [*report_texts(r), *r["categories"], *r["atributes"]])
                   for source in files.open_datasets(config).values()]
    else:
        corpora = [(synthetic_source(config), report_texts)]
    if config.data.expert.enabled and config.data.expert.datasets:
        corpora += [(source, caption_texts) for source in files.open_datasets(
            config, config.data.expert.datasets, "data.expert.datasets").values()]
    if (config.data.expert.enabled and not config.data.expert.datasets) or config.mlm.enabled:
        corpora.append((expert_source(config), lambda r: [r["caption"]]))
    for corpus, fields in corpora:
        texts += [t for i in range(min(n, len(corpus))) for t in fields(corpus.record(i))]
    if config.mlm.enabled and config.mlm.corpus != "synthetic":
        corpus = text_source(config)
        texts += [corpus[i] for i in range(min(n, len(corpus)))]
    return [t for t in texts if t]


def _task_texts(config) -> list[str]:
    """The class names and prompt texts of the shipped or user task files the run's evaluations use."""
    from retina_jax import evals
    from retina_jax.evals import tasks
    out = []
    for name in evals.active(config):
        task = config.evals[name].get("task", "")
        if task and (task.endswith(".json") or task in tasks.list_tasks()):
            t = tasks.load_task(task)
            out += [*t.classes, *(d for ds in t.descriptions.values() for d in ds),
                    *(d for ds in t.descriptions_zh.values() for d in ds)]
    return out


def prepare_tokenizer(config, workdir: str) -> str:
    """The tokenizer directory for this run: the configured one, or a vocabulary learned once per run."""
    if config.text.tokenizer != "learn":
        return config.text.tokenizer
    path = f"{workdir}/tokenizer"
    if jax.process_index() == 0 and not os.path.isdir(path):
        learn_wordpiece(vocabulary_texts(config), path, vocab_size=config.text.vocab_size,
                        lowercase=config.text.lowercase, max_len=config.text.max_len)
    _sync("tokenizer")
    return path


def _sync(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _augmented_image(image: np.ndarray, rng: np.random.Generator, image_size: int, preprocess: str, augment):
    """Source uint8 image -> the float32 model input with the configured augmentation (or none)."""
    if augment is not None:
        image = transforms.augment_source(image, rng, augment)
    canvas = transforms.to_canvas(image, image_size, preprocess)
    if augment is not None:
        canvas = transforms.augment(canvas, rng, augment)
    return transforms.normalize(canvas, preprocess)


@dataclasses.dataclass
class FlairTransform:
    """Example -> {'image', 'prompt', 'category_id'}; picklable for grain worker processes."""
    image_size: int
    preprocess: str
    augment: dict | None
    template: str
    description_swap: bool

    def __post_init__(self):
        self._category_index = {c: i for i, c in enumerate(knowledge.category_vocabulary())}
        self._augment = types.SimpleNamespace(**self.augment) if self.augment else None

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        image = _augmented_image(example["image"], rng, self.image_size, self.preprocess, self._augment)
        categories, atributes = example["categories"], example["atributes"]
        where = example.get("where", f"example {example.get('index')}")
        if not categories:
            raise DataError(f"{where}: no category")
        category = categories[rng.integers(len(categories))]
        if category not in self._category_index:
            raise DataError(f"{where}: unknown category {category!r}")
        atr = atributes[rng.integers(len(atributes))] if atributes else ""
        text = category
        if self.description_swap:
            choices = [category] + list(knowledge.CATEGORY_DESCRIPTIONS[category])
            text = choices[rng.integers(len(choices))]
        # FLAIR's categorical datasets are colour photographs and carry no modality field.
        modality = example.get("modality", "CFP")
        return {"image": image, "prompt": make_prompt(self.template, atr, text, modality),
                # The ORIGINAL category (before the description swap) defines the loss's positives.
                "category_id": np.int32(self._category_index[category])}


def report_text(example: dict, language: str, drop_chars: int) -> str:
    """The report a ViLReF example is paired with; an empty one is an error naming the example."""
    text = example[f"report_{language}"][drop_chars:].strip()
    if not text:
        where = example.get("where", f"example {example.get('index')}")
        raise DataError(f"{where}: empty {language} report"
                         + (f" after dropping its first {drop_chars} characters" if drop_chars else ""))
    return text


@dataclasses.dataclass
class ReportTransform:
    """Example -> {'image', 'prompt' (the report), 'labels' [C]}; picklable for grain worker processes."""
    image_size: int
    preprocess: str
    augment: dict | None
    language: str
    drop_chars: int
    extractor: LabelExtractor | None  # None: the example's own ground-truth labels
    per_eye: bool = True  # label from the image's own eye section when the example names its eye

    # Reports whose extracted labels are kept: a report recurs every epoch, and extracting 64 cost
    # the ViLReF demo's pipeline 4 ms a batch.
    CACHE_SIZE = 1 << 17

    def __post_init__(self):
        self._augment = types.SimpleNamespace(**self.augment) if self.augment else None
        self._labels = {}

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        image = _augmented_image(example["image"], rng, self.image_size, self.preprocess, self._augment)
        text = report_text(example, self.language, self.drop_chars)
        # ViLReF labels the FULL report (the extractor needs no prefix dropped).
        eye = example.get("eye") if self.per_eye and example.get("eye") in EYES else None
        labels = example["labels"] if self.extractor is None else self._extract(example[f"report_{self.language}"], eye)
        return {"image": image, "prompt": text, "labels": np.asarray(labels, np.float32)}

    def _extract(self, report: str, eye: str | None) -> np.ndarray:
        if (labels := self._labels.get((report, eye))) is None:
            if len(self._labels) >= self.CACHE_SIZE:
                self._labels.clear()
            labels = self._labels[report, eye] = self.extractor.extract(report, eye=eye)
        return labels


def merge_streams(pair: tuple[dict, dict]) -> dict:
    """(public batch, expert batch) -> one dict, the expert arrays under `expert_*` keys and the
    expert stream's skip count as the batch's."""
    public, expert = pair
    expert = dict(expert)
    skipped = expert.pop(files.SKIPPED)
    return {**public, **{f"expert_{k}": v for k, v in expert.items()}, files.SKIPPED: skipped}


@dataclasses.dataclass
class Collate:
    """Stack a list of examples and tokenise their texts in one call."""
    tokenize: Tokenize

    def __call__(self, examples: list[dict]) -> dict:
        ids, mask = self.tokenize([e["prompt"] for e in examples])
        batch = {"image": np.stack([e["image"] for e in examples]), "input_ids": ids, "attention_mask": mask}
        for key in ("category_id", "labels"):
            if key in examples[0]:
                batch[key] = np.stack([e[key] for e in examples])
        return batch


@dataclasses.dataclass
class DrawExpertBatch:
    """Batch position -> this process's rows of a global batch of `global_batch` expert examples
    drawn uniformly WITH replacement from the whole expert corpus (KeepFIT samples its expert batch
    so), collated: images without augmentation, the captions as they are (no prompt template). The
    draws come from grain's per-position generator, the same on every process, so a position always
    yields the same global batch whatever the number of processes; each process reads only its rows.
    A bad file (data.on_error='skip') is replaced by a further draw from this process's generator."""
    source: SyntheticFundus
    process_index: int
    process_count: int
    global_batch: int
    image_size: int
    preprocess: str
    collate: Collate

    def __call__(self, position: int, rng: np.random.Generator) -> dict:
        local = self.global_batch // self.process_count
        everyone = rng.integers(len(self.source), size=self.global_batch)
        draws = [int(d) for d in everyone[self.process_index * local:(self.process_index + 1) * local]]
        examples, skipped = [], 0
        while draws:
            index = draws.pop(0)
            example = self.source[index]
            if files.SKIPPED in example:  # a bad file under data.on_error='skip': draw another
                skipped += 1
                logging.warning("skipped a bad expert example (data.on_error='skip'): %s", example[files.SKIPPED])
                if skipped > 100 * local:
                    raise DataError(f"expert stream: {skipped} bad examples drawn while filling one batch; "
                                    f"last: {example[files.SKIPPED]}")
                draws.append(int(rng.integers(len(self.source))))
                continue
            caption = example["caption"].strip()
            if not caption:
                where = example.get("where", f"expert example {index} of {self.source!r}")
                raise DataError(f"{where}: empty caption")
            examples.append({"image": transforms.preprocess(example["image"], self.image_size, self.preprocess),
                             "prompt": caption})
        return {**self.collate(examples), files.SKIPPED: np.int64(skipped)}


class ProcessRows(grain.MapDataset):
    """This process's rows of every global batch of `parent`, a stream of examples in global order:
    row j of local batch n is `parent[n * global_batch + process_index * local + j]`.

    Every process walks the same global order (one shuffle, one per-index augmentation seed), so a
    global batch holds the same examples in the same order whatever the number of processes (the
    losses of 2 processes x 4 devices equal those of 1 x 8), and each process reads and decodes
    only its own rows, disjoint from the others'."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        self._global = global_batch
        self._local = global_batch // process_count
        self._offset = process_index * self._local

    def __len__(self) -> int:
        return len(self._parent) // self._global * self._local

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._local)
        return self._parent[batch * self._global + self._offset + row]


def process_rows(ds: grain.MapDataset, global_batch: int) -> grain.MapDataset:
    """`ProcessRows` of this process (`ds` itself on one process)."""
    local_batch_size(global_batch)  # checks the split
    if jax.process_count() == 1:
        return ds
    return ProcessRows(ds, global_batch, jax.process_index(), jax.process_count())


def local_batch_size(global_batch: int) -> int:
    if global_batch % jax.process_count():
        raise ValueError(f"global batch {global_batch} is not divisible by {jax.process_count()} processes")
    return global_batch // jax.process_count()


def label_extractor(config) -> LabelExtractor | None:
    """The report stream's label extractor (None when the corpus's own labels are used)."""
    r = config.data.reports
    if config.data.stream != "reports" or r.labels != "extract":
        return None
    return LabelExtractor.load(r.language, uncertain=r.uncertain, cup_disc_threshold=r.cup_disc_threshold)


def num_labels(config) -> int:
    """C, the length of the report stream's multi-hot label vectors."""
    return len(label_names())


def log_label_coverage(config, extractor: LabelExtractor) -> dict:
    """Run the extractor over the first `coverage_size` reports and log how many got no label."""
    source = synthetic_source(config)
    n = min(config.data.reports.coverage_size, len(source))
    stats = extractor.coverage([source.record(i)[f"report_{config.data.reports.language}"] for i in range(n)])
    logging.info("%s", log_coverage(stats, config.data.reports.language))
    return stats


def train_transform(config):
    """The public stream's example transform for `data.stream`."""
    augment = config.data.augment.to_dict() if config.data.augment.enabled else None
    if config.data.stream == "reports":
        r = config.data.reports
        return ReportTransform(config.data.image_size, config.data.preprocess, augment, r.language, r.drop_chars,
                               label_extractor(config), r.per_eye)
    return FlairTransform(config.data.image_size, config.data.preprocess, augment, config.data.prompt_template,
                          config.data.description_swap)


def train_size(config, datasets: dict | None = None) -> int:
    """Examples in one epoch of the public stream (all processes together); `datasets`:
    the already opened `data.datasets` (`files.open_datasets`), opened here when None."""
    if config.data.source == "files":
        return sum(len(source) for source in (datasets or files.open_datasets(config)).values())
    return config.data.synthetic.size


def train_dataset(config, tokenize: Tokenize, datasets: dict | None = None,
                  expert_datasets: dict | None = None) -> grain.IterDataset:
    """The public training stream (+ the expert one); `datasets` as for `train_size` and
    `expert_datasets` (the opened `data.expert.datasets`), so a caller that opened them does not
    open (parse) every dataset again."""
    transform = train_transform(config)
    batch_size = local_batch_size(config.data.batch_size)
    if config.data.source == "files":
        # Datasets on disk: guarded against bad input, mixed, batched with a skip count.
        ds = process_rows(files.mixed_stream(config, datasets or files.open_datasets(config), transform),
                          config.data.batch_size)
        expert = expert_dataset(config, tokenize, None, expert_datasets) if config.data.expert.enabled else None
        it = files.SkipCountingBatch(ds.to_iter_dataset(), batch_size, Collate(tokenize), expert)
        return _prefetch(config, it)
    ds = grain.MapDataset.source(synthetic_source(config))
    if config.data.shuffle:
        ds = ds.shuffle(seed=config.seed)
    ds = ds.random_map(transform, seed=config.seed)
    ds = process_rows(ds.repeat(None), config.data.batch_size)
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=Collate(tokenize))
    if config.data.expert.enabled:
        ds = grain.experimental.ZipMapDataset([ds, expert_dataset(config, tokenize, len(ds), expert_datasets)]).map(
            merge_streams)
    return _prefetch(config, ds.to_iter_dataset())


def worker_count(requested: int) -> int:
    """grain worker processes for `data.worker_count`: itself, or for -1 ('auto') one per CPU core
    this process may run on, less the one that drives the step (at least 1, at most 32)."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(32, cores - 1))


# grain's worker processes hand batches over in shared memory; the ones still in flight when a run
# stops (an error, the end of a run) are unlinked by Python's resource tracker at exit, as intended,
# which then warns of "leaked shared_memory objects" (grain issue #398). The filter is given to the
# tracker process alone (it is started with the interpreter's -W options) and only for its own module.
_TRACKER_FILTER = "ignore::UserWarning:multiprocessing.resource_tracker"


def quiet_resource_tracker() -> None:
    if _TRACKER_FILTER not in sys.warnoptions:
        sys.warnoptions.append(_TRACKER_FILTER)


def _prefetch(config, it: grain.IterDataset) -> grain.IterDataset:
    workers = worker_count(config.data.worker_count)
    if workers > 0:
        logging.info("input pipeline: %d grain worker process(es), %d batches buffered each (data.worker_count=%d)",
                     workers, config.data.worker_buffer_size, config.data.worker_count)
        quiet_resource_tracker()
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=config.data.worker_buffer_size))
    return it


def expert_dataset(config, tokenize: Tokenize, num_batches: int | None, datasets: dict | None = None) -> grain.MapDataset:
    """KeepFIT's expert stream: `num_batches` (as many as the public stream, which ZipMapDataset
    requires; None = unbounded) batches of `data.expert.batch_size` (global) expert pairs, from
    `data.expert.datasets` (e.g. MM-Retinal CSVs, guarded by `data.on_error`; `datasets`: those
    already opened) when set."""
    e = config.data.expert
    if e.datasets:
        opened = datasets or files.open_datasets(config, e.datasets, "data.expert.datasets")
        source = grain.MapDataset.concatenate(
            [grain.MapDataset.source(files.Guarded(s, config.data.on_error, config.data.fov_crop))
             for s in opened.values()])
    else:
        source = expert_source(config)
    local_batch_size(e.batch_size)  # checks the split over processes
    draw = DrawExpertBatch(source, jax.process_index(), jax.process_count(), e.batch_size,
                           config.data.image_size, config.data.preprocess, Collate(tokenize))
    return grain.MapDataset.range(sys.maxsize if num_batches is None else num_batches).random_map(
        draw, seed=config.seed + 1)


def text_source(config) -> TextSource:
    """KeepFIT V2 stage `text`'s whole corpus (data/text_corpus.py), held-out tail included."""
    if config.mlm.corpus == "synthetic":
        return TextSource(reports=synthetic_source(config), captions=expert_source(config), name="synthetic")
    return TextSource(read_text_folder(config.mlm.corpus), name=config.mlm.corpus)


def mlm_split(config, split: str) -> grain.MapDataset:
    """'train': every text but the last `mlm.heldout_size`; 'heldout': those last ones."""
    source = text_source(config)
    cut = len(source) - config.mlm.heldout_size
    if cut < config.data.batch_size:
        raise ValueError(f"config.mlm: the corpus {source!r} leaves {cut} training texts after holding out "
                         f"mlm.heldout_size={config.mlm.heldout_size}; one global batch needs {config.data.batch_size}")
    ds = grain.MapDataset.source(source)
    return ds[:cut] if split == "train" else ds[cut:]


def mlm_dataset(config, tokenizer_path: str) -> grain.IterDataset:
    """Stage `text` training stream: the corpus shuffled, whole-word masked from grain's per-index
    generator (so a resumed iterator reproduces the same masks), this process's rows of each global
    batch (`ProcessRows`), batched."""
    ds = mlm_split(config, "train")
    if config.data.shuffle:
        ds = ds.shuffle(seed=config.seed)
    ds = ds.random_map(WholeWordMask(tokenizer_path, config.text.max_len, config.mlm.mask_prob), seed=config.seed)
    ds = process_rows(ds.repeat(None), config.data.batch_size)
    ds = ds.batch(local_batch_size(config.data.batch_size), drop_remainder=True)
    return ds.to_iter_dataset()


def mlm_heldout_batches(config, tokenizer_path: str, batch_size: int):
    """Yield this process's held-out masked batches (fixed masks: seed `heldout.conditions.seed`), the
    last one zero-padded; padded rows have all-zero `mlm_weights`, so they add nothing."""
    texts = mlm_split(config, "heldout")
    mask = WholeWordMask(tokenizer_path, config.text.max_len, config.mlm.mask_prob)
    indices = np.arange(len(texts))[jax.process_index()::jax.process_count()]
    local = local_batch_size(batch_size)
    pad = {k: np.zeros_like(v) for k, v in mask(texts[0], np.random.default_rng(0)).items()}
    for b in range(-(-len(texts) // batch_size)):
        rows = [mask(texts[int(i)], np.random.default_rng([config.heldout.conditions.seed, int(i)]))
                for i in indices[b * local:(b + 1) * local]]
        rows += [pad] * (local - len(rows))
        yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def make_global(batch: dict, sharding) -> dict:
    """Local numpy batch of this process -> global jax.Arrays sharded over the data axis (the skip
    count `skipped` is host bookkeeping and stays behind)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items() if k != files.SKIPPED}


def multilabel_source(config, split: str) -> SyntheticFundus:
    """Held-out images with their ground-truth finding labels for ViLReF's multi-label transfer:
    split 'train' (seed `heldout.findings.seed`) trains the head, 'test' (the next seed) tests it."""
    f = config.heldout.findings
    seed, size = {"train": (f.seed, f.train_size), "test": (f.seed + 1, f.test_size)}[split]
    return _synthetic(config, CorpusSpec(
        seed=seed, size=size, image_size=config.data.synthetic.image_size,
        comorbidity_prob=config.data.synthetic.comorbidity_prob, expert_fraction=0.0,
        difficulty=config.data.synthetic.difficulty))


def heldout_batches(config, batch_size: int, source: SyntheticFundus | None = None, label=None):
    """Yield (images [b, S, S, 3] float32, labels [b, ...], valid [b]) of a held-out set for this process.

    Default: the zero-shot task, labelled by its condition's class index; `label(example)` gives
    other labels (the multi-label findings). Every process yields the same number of batches; the
    last one is zero-padded to `batch_size` and `valid` marks the real rows.
    """
    if source is None:
        source = heldout_source(config)
        classes = list(config.heldout.conditions.classes)
        label = lambda example: classes.index(example["conditions"][0])  # noqa: E731
    indices = np.arange(len(source))[jax.process_index()::jax.process_count()]
    local = local_batch_size(batch_size)
    num_batches = -(-len(source) // batch_size)
    label_shape = np.shape(label(source.record(0)))  # no rendering
    for b in range(num_batches):
        chunk = indices[b * local:(b + 1) * local]
        images = np.zeros((local, config.data.image_size, config.data.image_size, 3), np.float32)
        labels = np.zeros((local, *label_shape), np.int32)
        valid = np.zeros((local,), bool)
        for row, i in enumerate(chunk):
            example = source[int(i)]
            images[row] = transforms.preprocess(example["image"], config.data.image_size, config.data.preprocess)
            labels[row] = label(example)
            valid[row] = True
        yield images, labels, valid
