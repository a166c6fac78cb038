"""grain input pipelines: the FLAIR categorical stream (METHODS.md section 1) and held-out eval sets.

Training stream: source -> this process's shard -> shuffle -> per-example FLAIR transform (image
preprocessing and augmentation, prompt "A [ATR] fundus photograph of [CLS]" with the category
sampled from the example's list and optionally swapped for one of its expert descriptions) ->
repeat with per-epoch reseeding -> batch (tokenised per batch) -> iterator. Every random choice is
drawn from grain's per-index generator, so a pipeline position reproduces the same batch, and the
iterator state saved with a checkpoint resumes the exact data position.

Each process builds its local slice of the global batch; `make_global` assembles the global
`jax.Array` sharded over the mesh's `data` axis.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types

import grain
import jax
import numpy as np

from retina_jax.data import knowledge, transforms
from retina_jax.data.synthetic import CorpusSpec, SyntheticFundus
from retina_jax.data.tokenizer import Tokenize, learn_wordpiece

_SPACES = re.compile(r"\s+")


def make_prompt(template: str, atr: str, cls: str) -> str:
    # FLAIR collapses the double space left by an empty attribute.
    return _SPACES.sub(" ", template.format(atr=atr, cls=cls)).strip()


def synthetic_source(config) -> SyntheticFundus:
    s = config.data.synthetic
    return SyntheticFundus(CorpusSpec(
        seed=s.seed, size=s.size, image_size=s.image_size, comorbidity_prob=s.comorbidity_prob,
        attribute_prob=s.attribute_prob, expert_fraction=s.expert_fraction, difficulty=s.difficulty))


def heldout_source(config) -> SyntheticFundus:
    """The held-out zero-shot task: one condition per image, seeds never used for training."""
    z = config.eval.zero_shot
    return SyntheticFundus(CorpusSpec(
        seed=z.seed, size=z.size, image_size=config.data.synthetic.image_size, conditions=tuple(z.classes),
        comorbidity_prob=0.0, attribute_prob=0.0, expert_fraction=0.0, difficulty=z.difficulty,
        single_condition=True))


def vocabulary_texts(config) -> list[str]:
    """Texts a learned vocabulary must cover: every prompt word, description, attribute and report."""
    texts = [make_prompt(config.data.prompt_template, atr, "") for atr in ("",) + knowledge.ATTRIBUTES]
    for name, descriptions in knowledge.CATEGORY_DESCRIPTIONS.items():
        texts.append(name)
        texts.extend(descriptions)
    source = synthetic_source(config)
    for i in range(min(config.text.vocab_corpus_size, len(source))):
        record = source.record(i)
        texts.append(record["report_en"])
        if record["caption"]:
            texts.append(record["caption"])
    return texts


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
        image = transforms.to_canvas(example["image"], self.image_size, self.preprocess)
        if self._augment is not None:
            image = transforms.augment(image, rng, self._augment)
        image = transforms.normalize(image, self.preprocess)
        categories, atributes = example["categories"], example["atributes"]
        if not categories:
            raise ValueError(f"example {example.get('index')} has no category")
        category = categories[rng.integers(len(categories))]
        if category not in self._category_index:
            raise ValueError(f"example {example.get('index')}: unknown category {category!r}")
        atr = atributes[rng.integers(len(atributes))] if atributes else ""
        text = category
        if self.description_swap:
            choices = [category] + list(knowledge.CATEGORY_DESCRIPTIONS[category])
            text = choices[rng.integers(len(choices))]
        return {"image": image, "prompt": make_prompt(self.template, atr, text),
                # The ORIGINAL category (before the description swap) defines the loss's positives.
                "category_id": np.int32(self._category_index[category])}


@dataclasses.dataclass
class Collate:
    """Stack a list of examples and tokenise their prompts in one call."""
    tokenize: Tokenize

    def __call__(self, examples: list[dict]) -> dict:
        ids, mask = self.tokenize([e["prompt"] for e in examples])
        return {"image": np.stack([e["image"] for e in examples]),
                "input_ids": ids, "attention_mask": mask,
                "category_id": np.stack([e["category_id"] for e in examples])}


def local_batch_size(global_batch: int) -> int:
    if global_batch % jax.process_count():
        raise ValueError(f"global batch {global_batch} is not divisible by {jax.process_count()} processes")
    return global_batch // jax.process_count()


def train_dataset(config, tokenize: Tokenize) -> grain.IterDataset:
    source = synthetic_source(config)
    ds = grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]
    if config.data.shuffle:
        ds = ds.shuffle(seed=config.seed)
    augment = config.data.augment.to_dict() if config.data.augment.enabled else None
    ds = ds.random_map(FlairTransform(config.data.image_size, config.data.preprocess, augment, config.data.prompt_template,
                                      config.data.description_swap), seed=config.seed)
    ds = ds.repeat(None)
    ds = ds.batch(local_batch_size(config.data.batch_size), drop_remainder=True, batch_fn=Collate(tokenize))
    it = ds.to_iter_dataset()
    if config.data.worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.data.worker_count, per_worker_buffer_size=config.data.worker_buffer_size))
    return it


def make_global(batch: dict, sharding) -> dict:
    """Local numpy batch of this process -> global jax.Arrays sharded over the data axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def heldout_batches(config, batch_size: int):
    """Yield (images [b, S, S, 3] float32, labels [b], valid [b]) of the held-out task for this process.

    Every process yields the same number of batches; the last one is zero-padded to `batch_size`
    and `valid` marks the real rows.
    """
    source = heldout_source(config)
    classes = list(config.eval.zero_shot.classes)
    indices = np.arange(len(source))[jax.process_index()::jax.process_count()]
    local = local_batch_size(batch_size)
    num_batches = -(-len(source) // batch_size)
    for b in range(num_batches):
        chunk = indices[b * local:(b + 1) * local]
        images = np.zeros((local, config.data.image_size, config.data.image_size, 3), np.float32)
        labels = np.zeros((local,), np.int32)
        valid = np.zeros((local,), bool)
        for row, i in enumerate(chunk):
            example = source[int(i)]
            images[row] = transforms.preprocess(example["image"], config.data.image_size, config.data.preprocess)
            labels[row] = classes.index(example["conditions"][0])
            valid[row] = True
        yield images, labels, valid
