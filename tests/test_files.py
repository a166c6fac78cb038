"""Training from datasets on disk (data.source='files', retina_jax/data/files.py): every real format
feeds the trainer, bad input raises naming the file and row or is skipped and counted exactly (the
count survives a resume), and datasets mix as configured."""
import dataclasses
import os
from csv import reader as csv_reader
from csv import writer as csv_writer

import ml_collections
import numpy as np
import pytest
from test_keepfit import tiny_keepfit
from test_sources import ListSource, photograph_examples
from test_train import tiny_config, train_rows
from test_vilref import tiny_vilref

from retina_jax import checkpointing
from retina_jax.config import ConfigError, validate
from retina_jax.data.labels import label_names
from retina_jax.data import build, export, files, pipeline
from retina_jax.data.images import DataError
from retina_jax.data.synthetic import CorpusSpec, SyntheticFundus
from retina_jax.train import Trainer

CORPUS = SyntheticFundus(CorpusSpec(seed=5, size=24, image_size=32, expert_fraction=1.0))
LONGER = SyntheticFundus(CorpusSpec(seed=5, size=32, image_size=32, expert_fraction=1.0))  # CORPUS + 8 more
# 21 synthetic examples and the three real photographs (full size, decoded and resized by the pipeline).
MIXED = ListSource([CORPUS[i] for i in range(21)] + photograph_examples())


def entry(fmt, path, **extra):
    return ml_collections.ConfigDict(dict(format=fmt, path=path, **extra))


def with_datasets(config, datasets, **expert):
    config.data.source = "files"
    for name, e in datasets.items():
        config.data.datasets[name] = e
    for name, e in expert.items():
        config.data.expert.datasets[name] = e
    return config


@dataclasses.dataclass
class FakeTokenize:
    """Collate's tokenizer without a vocabulary: the prompts' lengths as ids (enough to batch)."""

    def __call__(self, texts):
        ids = np.zeros((len(texts), 8), np.int32)
        ids[:, 0] = [len(t) for t in texts]
        return ids, np.ones_like(ids)


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    """24 examples in every format: MIXED (with the real photographs) in the CSV, JSONL and ArrayRecord
    ones; the synthetic CORPUS in the LMDB, whose test matches every batch text to its stored labels
    (test_sources round-trips the photographs through the LMDB)."""
    root = tmp_path_factory.mktemp("formats")
    out = {
        "flair_csv": export.write_flair_csv(MIXED, str(root / "flair")),
        "jsonl": export.write_jsonl(MIXED, str(root / "jsonl"), language="zh"),
        "mmretinal_csv": export.write_mmretinal_csv(MIXED, str(root / "mm")),
        "vilref_lmdb": export.write_vilref_lmdb(CORPUS, str(root / "lmdb")),
    }
    build.build(MIXED, str(root / "ar"), split="train", progress=False)
    out["arrayrecord"] = str(root / "ar")
    return root, out


def test_flair_stream_trains_from_csv_jsonl_and_arrayrecord(on_disk, tmp_path):
    _, paths = on_disk
    # test_train's tiny run (72 examples = its 4 steps an epoch, so the same compiled step).
    config = with_datasets(tiny_config(**{"train.epochs": 0.5, "train.eval_at_end": False}),
                           {"csv": entry("flair_csv", paths["flair_csv"]), "jsonl": entry("jsonl", paths["jsonl"]),
                            "ar": entry("arrayrecord", paths["arrayrecord"])})
    validate(config, 8)
    # FLAIR's ban list drops the CSV's out-of-distribution rows (macular hole, myopia, ...).
    config.data.ood_ban = True
    banned = files.open_datasets(config)["csv"].banned
    assert 0 < banned < 24
    config.data.ood_ban = False
    trainer = Trainer(config, str(tmp_path / "run"))
    assert trainer.steps_per_epoch == 72 // 16  # one epoch = every dataset's examples together
    trainer.train()
    rows = train_rows(trainer.workdir)
    assert len(rows) == 2 and all(np.isfinite(r["train/loss"]) for r in rows)
    assert "train/skipped_examples" not in rows[0]  # on_error='raise': nothing is ever skipped


def test_keepfit_expert_stream_reads_an_mmretinal_csv(on_disk):
    _, paths = on_disk
    config = with_datasets(tiny_keepfit(**{"data.expert.batch_size": 8}), {"csv": entry("flair_csv", paths["flair_csv"])},
                           mm=entry("mmretinal_csv", paths["mmretinal_csv"]))
    batch = next(_stream(config))
    captions = {MIXED[i]["caption"] for i in range(len(MIXED))}
    assert batch["expert_image"].shape == (8, 32, 32, 3) and int(batch[files.SKIPPED]) == 0
    # FakeTokenize's first id is the prompt's length: every expert prompt is one of the CSV's captions.
    assert set(batch["expert_input_ids"][:, 0]) <= {len(c) for c in captions}


def test_vilref_trains_from_an_lmdb_with_its_given_labels(on_disk, tmp_path):
    _, paths = on_disk
    # A queue of one batch: the LMDB holds only 24 pairs (momentum.queue_max_fraction).
    config = with_datasets(tiny_vilref(**{"train.epochs": 2.0, "optim.schedule_epochs": 12.0, "train.eval_at_end": False,
                                          "data.reports.labels": "given", "momentum.queue_size": 16,
                                          "momentum.queue_max_fraction": 1.0}),
                           {"lmdb": entry("vilref_lmdb", paths["vilref_lmdb"])})
    trainer = Trainer(config, str(tmp_path / "run"))
    batch = next(iter(pipeline.train_dataset(trainer.config, trainer.tokenize)))
    # The LMDB's stored multi-hot labels are the corpus's findings, row for row.
    want = {CORPUS.record(i)["report_zh"]: CORPUS.record(i)["labels"] for i in range(len(CORPUS))}
    texts = trainer.tokenize.tokenizer.decode_batch(batch["input_ids"].tolist(), skip_special_tokens=True)
    assert len(texts) == 16 and batch["labels"].shape == (16, len(label_names()))
    for text, labels in zip(texts, batch["labels"]):
        # (decoded: cut at text.max_len tokens, characters outside the tiny vocabulary dropped)
        match = [w for r, w in want.items() if r.startswith(text.replace(" ", "")[:12])]
        assert any(np.array_equal(w, labels) for w in match)
    trainer.train()
    assert len(train_rows(trainer.workdir)) == 2


def _broken_csv(tmp_path, bad, rows=8):
    """A FLAIR CSV of `rows` synthetic examples whose rows in `bad` point at a missing (odd) or
    truncated (even) image file."""
    csv = export.write_flair_csv(LONGER, str(tmp_path / "broken"), indices=range(rows))
    lines = open(csv, encoding="utf-8").read().splitlines()
    for row in bad:
        image = lines[row + 1].split(",")[1]
        path = os.path.join(os.path.dirname(csv), image)
        if row % 2:
            os.remove(path)
        else:
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])
    return csv


def _stream(config):
    return iter(pipeline.train_dataset(config, FakeTokenize()))


def test_bad_input_raises_naming_the_file_and_row_by_default(tmp_path):
    csv = _broken_csv(tmp_path, bad=(2,))
    config = with_datasets(tiny_keepfit(**{"data.expert.enabled": False, "data.shuffle": False, "data.ood_ban": False,
                                           "data.batch_size": 4}), {"csv": entry("flair_csv", csv)})
    with pytest.raises(DataError, match=r"dataframe\.csv row 2.*(truncated|decode)"):
        next(_stream(config))


def test_skipped_examples_are_counted_exactly_and_never_replaced_by_wrong_ones(tmp_path):
    csv = _broken_csv(tmp_path, bad=(2, 5))
    config = with_datasets(tiny_keepfit(**{"data.expert.enabled": False, "data.shuffle": False, "data.batch_size": 4, "data.ood_ban": False,
                                           "data.augment.enabled": False, "data.on_error": "skip"}),
                           {"csv": entry("flair_csv", csv)})
    it = _stream(config)
    batches = [next(it) for _ in range(3)]
    # Rows 0,1,[2],3,4 | [5],6,7,0,1 | [2],3,4,[5],6,7: the batches hold the good rows in order.
    assert [int(b[files.SKIPPED]) for b in batches] == [1, 1, 2]
    rows = [0, 1, 3, 4, 6, 7, 0, 1, 3, 4, 6, 7]
    images = np.concatenate([b["image"] for b in batches])
    for image, row in zip(images, rows):
        want = pipeline.train_transform(config)(CORPUS[row], np.random.default_rng(0))["image"]
        np.testing.assert_array_equal(image, want)


def test_skip_count_is_logged_checkpointed_and_restored_on_resume(tmp_path):
    csv = _broken_csv(tmp_path, bad=(2, 5), rows=32)
    # + a row the source drops when it parses the CSV (unknown category): counted once, at the start.
    with open(csv, "a", encoding="utf-8") as f:
        f.write("32,images/0000000.png,[],['unicorn disease']\n")
    # test_train's tiny run and schedule (12-step cosine, 4 warm-up steps): its compiled step.
    config = with_datasets(tiny_config(**{"data.shuffle": False, "data.ood_ban": False, "data.on_error": "skip",
                                          "train.epochs": 1.5, "optim.schedule_epochs": 6.0,
                                          "optim.warmup_epochs": 2.0, "train.checkpoint_every": 2,
                                          "train.eval_at_end": False}),
                           {"csv": entry("flair_csv", csv)})
    workdir = str(tmp_path / "run")
    trainer = Trainer(config, workdir)
    assert trainer.steps_per_epoch == 2  # 32 rows kept (the bad images are only found when read)
    assert len(trainer.bad_rows) == 1 and "row 32: unknown category ['unicorn disease']" in trainer.bad_rows[0]
    trainer.train()
    # The dropped row, then rows 0-17 less 2, 5 | 18-31, 0, 1 | 3, 4, 6-19 (2, 5 again) | 20-31, 0, 1, 3, 4 (2 again)
    assert [r["train/skipped_examples"] for r in train_rows(workdir)] == [3, 3, 5]
    mngr = checkpointing.manager(checkpointing.checkpoint_dir(workdir), read_only=True)
    assert checkpointing.restore_meta(mngr, 2) == {"skipped_examples": 3}
    mngr.close()
    # A longer run resumes from step 3 with the count of the first three steps (the dropped row
    # counted once, not again).
    config.train.epochs = 2.0
    Trainer(config, workdir).train()
    last = train_rows(workdir)[-1]
    assert last["step"] == 4 and last["train/skipped_examples"] == 6
    # By default the same CSV stops the run before the first step, naming the file and row.
    config.data.on_error = "raise"
    with pytest.raises(ValueError, match=r"data\.datasets\.csv .*row 32: unknown category"):
        Trainer(config, str(tmp_path / "raising"))


def test_keepfit_trains_with_an_mmretinal_expert_csv_and_counts_its_bad_rows(on_disk, tmp_path):
    _, paths = on_disk
    # An MM-Retinal CSV with one empty caption (dropped with on_error='skip') and one missing image
    # (skipped and redrawn when drawn).
    root = tmp_path / "mm"
    mm = export.write_mmretinal_csv(MIXED, str(root))
    with open(mm, newline="", encoding="utf-8") as f:
        table = list(csv_reader(f))
    table[3][table[0].index("caption")] = ""  # data row 2
    os.remove(root / table[5][table[0].index("image")])
    with open(mm, "w", newline="", encoding="utf-8") as f:
        csv_writer(f).writerows(table)
    # test_keepfit's tiny run: 64 public examples = its 4 steps an epoch (the same compiled step), 2 steps.
    config = with_datasets(tiny_keepfit(**{"train.epochs": 0.5, "train.eval_at_end": False, "data.ood_ban": False,
                                           "data.on_error": "skip"}),
                           {"csv": entry("flair_csv", paths["flair_csv"]), "jsonl": entry("jsonl", paths["jsonl"]),
                            "ar": entry("arrayrecord", paths["arrayrecord"])},
                           mm=entry("mmretinal_csv", mm))
    trainer = Trainer(config, str(tmp_path / "run"))
    assert trainer.steps_per_epoch == 4 and len(trainer.method.expert_datasets["mm"]) == len(MIXED) - 1
    assert len(trainer.bad_rows) == 1 and "row 2: empty caption" in trainer.bad_rows[0]
    trainer.train()
    rows = train_rows(trainer.workdir)
    assert len(rows) == 2 and all(np.isfinite(r["train/loss_mm"]) and r["train/loss_mm"] > 0 for r in rows)
    # The dropped row from the start, then each draw of the missing image (at most one per draw of 8 from 23).
    assert rows[0]["train/skipped_examples"] >= 1
    assert rows[-1]["train/skipped_examples"] >= rows[0]["train/skipped_examples"]


def test_datasets_mix_balanced_by_weights_or_by_size(tmp_path):
    small = export.write_flair_csv(CORPUS, str(tmp_path / "small"), indices=range(4))
    large = export.write_flair_csv(CORPUS, str(tmp_path / "large"), indices=range(4, 24))
    base = {"data.expert.enabled": False, "data.batch_size": 8, "data.augment.enabled": False, "data.ood_ban": False,
            "data.description_swap": False}

    def share(**extra):
        config = with_datasets(tiny_keepfit(**base, **extra),
                               {"small": entry("flair_csv", small, weight=3.0), "large": entry("flair_csv", large)})
        it = iter(pipeline.train_dataset(config, FakeTokenize()))
        # The image tells the dataset: rows 0-3 are the small one's.
        transform = pipeline.train_transform(config)
        want = [transform(CORPUS[i], np.random.default_rng(0))["image"] for i in range(4)]
        images = np.concatenate([next(it)["image"] for _ in range(6)])
        return np.mean([any(np.array_equal(image, w) for w in want) for image in images])

    assert share(**{"data.mixing": "balanced"}) == pytest.approx(0.5, abs=0.01)
    assert share(**{"data.mixing": "weights"}) == pytest.approx(0.75, abs=0.01)
    assert share(**{"data.mixing": "concat"}) == pytest.approx(4 / 24, abs=0.03)


def test_config_validation_names_the_dataset_fields(tmp_path):
    config = tiny_keepfit()
    config.data.source = "files"
    with pytest.raises(ConfigError, match=r"data\.datasets: data\.source='files' needs"):
        validate(config, 8)
    with_datasets(config, {"x": entry("parquet", "/nowhere")}, y=entry("mmretinal_csv", ""))
    config.data.mixing, config.data.on_error = "random", "ignore"
    with pytest.raises(ConfigError) as err:
        validate(config, 8)
    for field in ("data.datasets.x.format", "data.expert.datasets.y.path", "data.mixing", "data.on_error"):
        assert field in str(err.value)
    config = with_datasets(tiny_keepfit(), {"gone": entry("flair_csv", str(tmp_path / "missing.csv"))})
    with pytest.raises(ValueError, match=r"data\.datasets\.gone \(flair_csv at .*missing\.csv"):
        Trainer(config, str(tmp_path / "run"))
