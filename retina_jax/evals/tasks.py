"""Evaluation tasks in the original projects' experiment-definition format (docs/methods.md, "FLAIR",
Transfer protocols, and "ViLReF"; docs/data.md, "Real formats", for the dataframe format).

A task is what FLAIR's `local_data/experiments.py` `get_experiment_setting(experiment)` returns (the dataframe,
the task type and the `targets` dict: category name -> class index), plus the zero-shot prompt texts of its
classes and the split protocol defaults, so that a user who holds the datasets runs them by name:

    task = load_task('25_REFUGE')                      # or load_task('my_task.json')
    source = task_dataset(task, '/data/FUNDUS')        # {'index', 'image', 'label', 'where'} per row

Shipped tasks live in `evals/tasks/`, one JSON file per task named after it; a user's own task file has the same
format. Fields (the file's keys are the `Task` fields):

* `name`, `source` ('FLAIR' | 'KeepFIT' | 'ViLReF' | 'synthetic', or any name for a user's task), `kind`
  ('classification' | 'multilabel' | 'segmentation'), `reference` (the original files), `notes`.
* `classes`: class names in the original label order (FLAIR's `targets` keys by index).
* `targets` (optional; default each class name -> its index): category names -> class index. Several names may
  reach one class (RFMiD's column abbreviations and FLAIR's names for them); a class name must reach its own index.
* `other_categories` (optional): categories a row may carry that decide no label (MESSIDOR's DME status after
  the DR grade; RFMiD's Disease_Risk markers).
* `dataframe`: a FLAIR-format CSV (`image`, `atributes`, `categories`) relative to the dataframe root, which
  defaults to the data root; image paths in it are relative to the data root, as FLAIR's `PATH_DATASETS`. The
  shipped FLAIR/KeepFIT tasks expect FLAIR's `local_data/dataframes/` copied to `<data_root>/dataframes/` (or
  `dataframe_root=` pointing at FLAIR's `local_data`). `null` for the built-in synthetic tasks.
* `descriptions`: class -> expert descriptions. FLAIR's zero-shot prompts of a class are its dictionary entry
  plus its name (`compute_text_embeddings(domain_knowledge=True)`); the name is added by
  `zeroshot.class_prompts`, so the stored descriptions leave it out and the prompt sets are equal.
  `name_prompt: false` marks classes whose name the original leaves OUT of the prompts (FLAIR's MMAC grades).
* `descriptions_zh`: Chinese prompts where the original has them, each list starting with the class's Chinese
  name (the convention of `knowledge/category_descriptions_zh.json` and `zeroshot.class_prompts(language='zh')`).
* `splits`: protocol name -> defaults of FLAIR's split protocol (`shots_train` / `shots_val` / `shots_test` as a
  count or 'N%', `folds`, `balance`). External test sets (FLAIR's `--experiment_test`) are separate tasks named in
  the `notes` of the task they test.

Labels follow FLAIR's `get_dataloader_splits`: a classification row's label is `targets[categories[0]]` (its
FIRST category; MESSIDOR rows list the DR grade and then the DME status). A multi-label row sets the class of
every category in `targets`. A row whose label cannot be read that way is a `DataError` naming the row.

What is not public is said in each task's `notes`: ViLReF's evaluation module ships only as compiled .pyc, so
its RFMiD task follows the same group's RET-CLIP code and has no Chinese prompts; the few-shot defaults come from
KeepFIT's README (shown there for CLIP-Adapter). FLAIR's IDRiD segmentation dataframes have no experiment entry
in `experiments.py`, so no segmentation task ships.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from retina_jax.data import knowledge
from retina_jax.data.images import DataError
from retina_jax.data.sources import FlairCsvSource

__all__ = ['KINDS', 'Task', 'TaskSource', 'list_tasks', 'load_task', 'save_task', 'task_dataset', 'task_label']

KINDS: tuple[str, ...] = ('classification', 'multilabel', 'segmentation')
TASKS_DIR = os.path.join(os.path.dirname(__file__), 'tasks')

# FLAIR's protocols (readme.md commands; main_transferability.py's defaults for what they leave out).
ZERO_SHOT = {'shots_train': '0%', 'shots_val': '0%', 'shots_test': '100%', 'folds': 1, 'balance': False}
LINEAR_PROBE = {'shots_train': '80%', 'shots_val': '0%', 'shots_test': '20%', 'folds': 5, 'balance': False}
# KeepFIT's README few-shot command (clipAdapter): 5 shots per class, 20% test, 5 folds.
FEW_SHOT = {'shots_train': 5, 'shots_val': '0%', 'shots_test': '20%', 'folds': 5, 'balance': False}
FLAIR_PROTOCOLS = {'zero_shot': ZERO_SHOT, 'linear_probe': LINEAR_PROBE, 'clip_adapter': FEW_SHOT,
                   'tip_adapter': FEW_SHOT, 'tip_adapter_f': FEW_SHOT}

_REQUIRED = ('name', 'source', 'kind', 'dataframe', 'classes', 'descriptions', 'splits')
_OPTIONAL = ('descriptions_zh', 'targets', 'other_categories', 'name_prompt', 'reference', 'notes')
_SHOTS = re.compile(r'(\d+(?:\.\d+)?)%')


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[str, ...]
    descriptions: dict[str, tuple[str, ...]]   # every class, possibly ()
    kind: str
    dataframe: str | None
    splits: dict
    source: str
    descriptions_zh: dict[str, tuple[str, ...]]
    targets: dict[str, int]
    other_categories: tuple[str, ...] = ()
    name_prompt: bool = True
    reference: str = ''
    notes: str = ''


def _strings(value, where: str, field: str, *, allow_empty: bool = True) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(s, str) and s.strip() for s in value) or \
            (not allow_empty and not value):
        raise ValueError(f"{where}: field '{field}' must be a {'' if allow_empty else 'non-empty '}list of non-empty "
                         f"strings, got {value!r}")
    return tuple(value)


def _text(data: dict, where: str, field: str, *, optional: bool = False) -> str | None:
    value = data.get(field)
    if optional and value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field '{field}' must be a non-empty string{' or null' if optional else ''}, "
                         f"got {value!r}")
    return value


def _prompt_dict(value, classes: tuple[str, ...], where: str, field: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: field '{field}' must be an object class -> list of strings, got {value!r}")
    unknown = [k for k in value if k not in classes]
    if unknown:
        raise ValueError(f"{where}: field '{field}': {unknown} are not classes of the task")
    return {c: _strings(value[c], where, f'{field}.{c}') for c in classes if c in value}


def _shots(value, where: str, field: str):
    # FLAIR's get_shots reads 'N%' or a count (given on its command line as a string).
    ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or \
        (isinstance(value, str) and (value.isdigit() or (m := _SHOTS.fullmatch(value)) is not None
                                     and float(m.group(1)) <= 100))
    if not ok:
        raise ValueError(f"{where}: field '{field}' must be a count >= 0 or a percentage 'N%', got {value!r}")


def _splits(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: field 'splits' must be an object protocol -> settings, got {value!r}")
    for protocol, settings in value.items():
        field = f'splits.{protocol}'
        if not isinstance(settings, dict):
            raise ValueError(f"{where}: field '{field}' must be an object, got {settings!r}")
        for key in ('shots_train', 'shots_val', 'shots_test'):
            if key in settings:
                _shots(settings[key], where, f'{field}.{key}')
        folds = settings.get('folds', 1)
        if not isinstance(folds, int) or isinstance(folds, bool) or folds < 1:
            raise ValueError(f"{where}: field '{field}.folds' must be an integer >= 1, got {folds!r}")
        if not isinstance(settings.get('balance', False), bool):
            raise ValueError(f"{where}: field '{field}.balance' must be true or false, got {settings['balance']!r}")
    return value


def _parse(data, where: str) -> Task:
    """A validated Task from a task file's JSON object; every error names `where` and the field."""
    if not isinstance(data, dict):
        raise ValueError(f'{where}: expected a JSON object describing one task, got {type(data).__name__}')
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ValueError(f'{where}: unknown field(s) {unknown}; known: {sorted(_REQUIRED + _OPTIONAL)}')
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f'{where}: missing field(s) {missing}')
    name, source = _text(data, where, 'name'), _text(data, where, 'source')
    if data['kind'] not in KINDS:
        raise ValueError(f"{where}: field 'kind' must be one of {list(KINDS)}, got {data['kind']!r}")
    dataframe = _text(data, where, 'dataframe', optional=True)
    classes = _strings(data['classes'], where, 'classes', allow_empty=False)
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    if duplicates:
        raise ValueError(f"{where}: field 'classes': duplicate class(es) {duplicates}")
    descriptions = _prompt_dict(data['descriptions'], classes, where, 'descriptions')
    descriptions_zh = _prompt_dict(data.get('descriptions_zh', {}), classes, where, 'descriptions_zh')
    targets = data.get('targets')
    if targets is None:
        targets = {c: i for i, c in enumerate(classes)}
    elif not isinstance(targets, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(classes) for v in targets.values()):
        raise ValueError(f"{where}: field 'targets' must map category names to class indices 0..{len(classes) - 1}, "
                         f"got {targets!r}")
    wrong = [c for i, c in enumerate(classes) if targets.get(c) != i]
    if wrong:
        raise ValueError(f"{where}: field 'targets': every class name must map to its own index; wrong for {wrong}")
    other = _strings(data.get('other_categories', []), where, 'other_categories')
    both = sorted(set(other) & set(targets))
    if both:
        raise ValueError(f"{where}: field 'other_categories': {both} are also targets")
    name_prompt = data.get('name_prompt', True)
    if not isinstance(name_prompt, bool):
        raise ValueError(f"{where}: field 'name_prompt' must be true or false, got {name_prompt!r}")
    unprompted = [c for c in classes if not name_prompt and not descriptions.get(c)]
    if unprompted:
        raise ValueError(f"{where}: field 'descriptions': {unprompted} would have no prompt (name_prompt is false)")
    for field in ('reference', 'notes'):
        if not isinstance(data.get(field, ''), str):
            raise ValueError(f"{where}: field '{field}' must be a string, got {data[field]!r}")
    return Task(name=name, classes=classes, descriptions={c: descriptions.get(c, ()) for c in classes},
                kind=data['kind'], dataframe=dataframe, splits=_splits(data['splits'], where), source=source,
                descriptions_zh=descriptions_zh, targets=dict(targets), other_categories=other,
                name_prompt=name_prompt, reference=data.get('reference', ''), notes=data.get('notes', ''))


def _synthetic_tasks() -> dict[str, dict]:
    """The held-out synthetic tasks (docs/data.md, "The synthetic corpus"), in the task-file format."""
    from configs import common  # the trainer's zero-shot classes live with the config defaults

    def task(name, classes, kind, zh, splits, reference, notes):
        return {'name': name, 'source': 'synthetic', 'kind': kind, 'dataframe': None, 'classes': list(classes),
                'descriptions': {c: list(knowledge.CATEGORY_DESCRIPTIONS[c]) for c in classes},
                'descriptions_zh': {c: list(t) for c, t in zh.items()}, 'splits': splits,
                'reference': reference, 'notes': notes}

    protocols = {k: dict(v) for k, v in FLAIR_PROTOCOLS.items()}
    conditions = common.SYNTHETIC_TASK_CLASSES
    findings_zh = {f: knowledge.FINDING_SYNONYMS_ZH[f] for f in knowledge.FINDINGS[1:]}
    return {t['name']: t for t in (
        task('synthetic_conditions', conditions, 'classification',
             {c: knowledge.CATEGORY_DESCRIPTIONS_ZH[c] for c in conditions}, protocols,
             'configs/common.py heldout.conditions; retina_jax/data/pipeline.py heldout_source',
             'The trainer\'s held-out zero-shot task: one condition per image, from seeds training never uses.'),
        task('synthetic_dr_grade', knowledge.DR_GRADE_CATEGORIES, 'classification',
             {c: (zh,) for c, zh in zip(knowledge.DR_GRADE_CATEGORIES, knowledge.DR_GRADE_NAMES_ZH)}, protocols,
             'retina_jax/data/knowledge.py DR_GRADE_CATEGORIES; retina_jax/data/synthetic.py record dr_grade',
             'DR grade of held-out synthetic images (record["dr_grade"] indexes the classes).'),
        task('synthetic_findings', knowledge.FINDINGS, 'multilabel',
             {'normal': knowledge.CATEGORY_DESCRIPTIONS_ZH['normal'], **findings_zh}, {},
             'retina_jax/data/knowledge.py FINDINGS; retina_jax/data/pipeline.py multilabel_source',
             'Multi-hot findings of held-out synthetic images (record["labels"]); the train/test corpora and their '
             'sizes come from config heldout.findings.'),
    )}


def _shipped() -> list[str]:
    return sorted(f[:-len('.json')] for f in os.listdir(TASKS_DIR) if f.endswith('.json'))


def list_tasks() -> list[str]:
    """Names `load_task` accepts: the built-in synthetic tasks and the shipped task files."""
    return sorted(set(_synthetic_tasks()) | set(_shipped()))


def _read(path: str) -> Task:
    return _parse(knowledge.read_json_file(path, 'task file'), path)


def load_task(name_or_path: str) -> Task:
    """A task by name (`list_tasks()`) or from a task file (a path to a .json file)."""
    if name_or_path.endswith('.json') or '/' in name_or_path or os.sep in name_or_path:
        return _read(name_or_path)
    synthetic = _synthetic_tasks()
    if name_or_path in synthetic:
        return _parse(synthetic[name_or_path], f'built-in task {name_or_path}')
    if name_or_path not in _shipped():
        raise ValueError(f'unknown task {name_or_path!r}; available: {", ".join(list_tasks())} '
                         '(or a path to a task .json file)')
    path = os.path.join(TASKS_DIR, name_or_path + '.json')
    task = _read(path)
    if task.name != name_or_path:
        raise ValueError(f"{path}: field 'name' is {task.name!r}, but the file is named after {name_or_path!r}")
    return task


def save_task(task: Task, path: str) -> None:
    """Write `task` as a task file `load_task(path)` reads back equal (a start for a user's own task)."""
    data = dataclasses.asdict(task)
    data['classes'] = list(task.classes)
    data['other_categories'] = list(task.other_categories)
    for field in ('descriptions', 'descriptions_zh'):
        data[field] = {c: list(t) for c, t in data[field].items()}
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write('\n')


def task_label(task: Task, categories: list[str], where: str) -> int | np.ndarray:
    """A row's label from its category list, as FLAIR's `get_dataloader_splits`: classification ->
    `targets[categories[0]]`; multi-label -> uint8 multi-hot over the classes of every category in `targets`
    (`other_categories` set nothing; any other category is an error, so a typo never becomes a negative)."""
    if task.kind == 'classification':
        if not categories or categories[0] not in task.targets:
            first = repr(categories[0]) if categories else 'none (empty list)'
            raise DataError(f'{where}: task {task.name} labels a row by its FIRST category (as FLAIR does); it is '
                            f'{first}, not one of {list(task.targets)}')
        return task.targets[categories[0]]
    if task.kind == 'multilabel':
        if not categories:
            raise DataError(f'{where}: no category, so no label for task {task.name}')
        y = np.zeros(len(task.classes), np.uint8)
        for c in categories:
            if c in task.targets:
                y[task.targets[c]] = 1
            elif c not in task.other_categories:
                raise DataError(f'{where}: category {c!r} is neither a target of task {task.name} '
                                f'({list(task.targets)}) nor one of its other_categories {list(task.other_categories)}')
        return y
    raise ValueError(f'task {task.name}: a {task.kind} task has no per-row label from categories')


class TaskSource:
    """grain random-access source of a task's rows: {'index', 'image' (uint8 [H, W, 3]), 'label' (int, or uint8
    multi-hot for a multi-label task), 'where' ('<csv> row N')}. The CSV text is validated when the source is
    built (`FlairCsvSource`: every category must be a target or one of `other_categories`); the label of a row
    is read with its image, so a classification row whose FIRST category is one of `other_categories` is a
    `DataError` when that row is read. Picklable for grain worker processes."""

    def __init__(self, task: Task, source: FlairCsvSource):
        self.task, self.source = task, source

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self):
        return f'TaskSource({self.task.name!r}, {self.source!r})'

    def __getitem__(self, index: int) -> dict:
        record = self.source[index]
        return {'index': record['index'], 'image': record['image'], 'where': record['where'],
                'label': task_label(self.task, record['categories'], record['where'])}


def task_dataset(task: Task, data_root: str, *, dataframe_root: str | None = None) -> TaskSource:
    """The rows of `task`'s FLAIR-format dataframe (`dataframe_root`, default `data_root`, joined with
    `task.dataframe`; an absolute `dataframe` is used as it is), images relative to `data_root`."""
    if task.dataframe is None:
        raise ValueError(f'task {task.name!r} ({task.source}) has no dataframe: its images are the held-out synthetic '
                         'corpus (retina_jax.data.pipeline); to read an exported copy (python -m '
                         'retina_jax.data.export --format flair_csv), save the task with save_task, set its '
                         "'dataframe' and load that file")
    if task.kind == 'segmentation':
        raise ValueError(f'task {task.name!r} is a segmentation task: FlairCsvSource reads categories, not masks')
    csv_path = os.path.join(data_root if dataframe_root is None else dataframe_root, task.dataframe)
    # The rows' categories beyond the label-deciding ones (MESSIDOR's DME status) must be accepted as well.
    vocabulary = tuple(task.targets) + task.other_categories
    return TaskSource(task, FlairCsvSource(csv_path, data_root, ood_ban=False, vocabulary=vocabulary))
