"""Domain knowledge of the synthetic fundus corpus (FLAIR-style).

* ``FINDINGS``: the multi-hot label order ('normal' is index 0 and its own class).
* ``ATTRIBUTES``: image-quality attributes (FLAIR's ``atributes``).
* ``CONDITIONS``: primary conditions the generator can draw; ``CONDITION_FINDINGS`` maps each to the
  findings it draws (core findings always, optional ones sometimes).
* ``CATEGORY_DESCRIPTIONS``: FLAIR's "domain knowledge" dictionary, category -> 1..6 expert
  descriptions, loaded from ``knowledge/flair_descriptions.json``.
* ``CATEGORY_DESCRIPTIONS_ZH``: per condition, its Chinese name followed by Chinese expert
  descriptions (``knowledge/category_descriptions_zh.json``), for Chinese zero-shot prompts (ViLReF).
* Fixed synonym sets per finding and fixed negation cues, per language, so that a rule-based label
  extractor can recover the labels from the generated reports.
"""
from __future__ import annotations

import json
import os

FINDINGS: tuple[str, ...] = (
    'normal', 'microaneurysm', 'haemorrhage', 'hard exudate', 'cotton-wool spot',
    'neovascularization', 'drusen', 'geographic atrophy', 'enlarged cup', 'peripapillary atrophy',
    'tessellation', 'bone-spicule pigment', 'macular hole', 'arterial narrowing', 'av nicking',
    'cataract haze', 'laser scar',
)
FINDING_INDEX: dict[str, int] = {f: i for i, f in enumerate(FINDINGS)}

ATTRIBUTES: tuple[str, ...] = ('noisy', 'blurred', 'underexposed', 'overexposed')

CONDITIONS: tuple[str, ...] = (
    'normal', 'diabetic retinopathy', 'glaucoma', 'age-related macular degeneration', 'cataract',
    'pathologic myopia', 'retinitis pigmentosa', 'macular hole', 'hypertensive retinopathy',
)

# condition -> (core findings always drawn, optional findings drawn sometimes). For diabetic
# retinopathy the findings follow the sampled DR grade (see synthetic.py).
CONDITION_FINDINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    'normal': ((), ()),
    'diabetic retinopathy': (('microaneurysm',), ('haemorrhage', 'hard exudate', 'cotton-wool spot',
                                                  'neovascularization', 'laser scar')),
    'glaucoma': (('enlarged cup',), ()),
    'age-related macular degeneration': (('drusen',), ('geographic atrophy',)),
    'cataract': (('cataract haze',), ()),
    'pathologic myopia': (('tessellation', 'peripapillary atrophy'), ()),
    'retinitis pigmentosa': (('bone-spicule pigment', 'arterial narrowing'), ()),
    'macular hole': (('macular hole',), ()),
    'hypertensive retinopathy': (('arterial narrowing', 'av nicking'), ('haemorrhage', 'cotton-wool spot')),
}

DR_GRADE_CATEGORIES: tuple[str, ...] = (
    'no diabetic retinopathy', 'mild diabetic retinopathy', 'moderate diabetic retinopathy',
    'severe diabetic retinopathy', 'proliferative diabetic retinopathy',
)

# Fixed small synonym sets (plural/phrase forms as they appear in reports). The first entry is canonical.
FINDING_SYNONYMS_EN: dict[str, tuple[str, ...]] = {
    'microaneurysm': ('microaneurysms', 'micro-aneurysms', 'microaneurysm'),
    'haemorrhage': ('haemorrhages', 'hemorrhages', 'retinal haemorrhages', 'intraretinal haemorrhages'),
    'hard exudate': ('hard exudates', 'lipid exudates', 'yellow hard exudates'),
    'cotton-wool spot': ('cotton-wool spots', 'cotton wool spots', 'nerve fibre layer infarcts'),
    'neovascularization': ('neovascularization', 'neovascularisation', 'new vessels'),
    'drusen': ('drusen', 'drusen deposits', 'macular drusen'),
    'geographic atrophy': ('geographic atrophy', 'geographic atrophic patch'),
    'enlarged cup': ('enlarged cup', 'enlarged optic cup', 'increased cupping'),
    'peripapillary atrophy': ('peripapillary atrophy', 'parapapillary atrophy', 'peripapillary atrophic crescent'),
    'tessellation': ('tessellation', 'tessellated fundus', 'tigroid fundus'),
    'bone-spicule pigment': ('bone-spicule pigmentation', 'bone spicule pigment', 'bone-spicule pigment clumps'),
    'macular hole': ('macular hole', 'full-thickness macular hole'),
    'arterial narrowing': ('arterial narrowing', 'attenuated arterioles', 'narrowed arteries'),
    'av nicking': ('av nicking', 'arteriovenous nicking', 'a-v nicking'),
    'cataract haze': ('media haze', 'lens opacity', 'hazy media'),
    'laser scar': ('laser scars', 'photocoagulation scars', 'laser photocoagulation marks'),
}
FINDING_SYNONYMS_ZH: dict[str, tuple[str, ...]] = {
    'microaneurysm': ('微血管瘤', '微动脉瘤'),
    'haemorrhage': ('出血', '视网膜出血', '点片状出血'),
    'hard exudate': ('硬性渗出', '黄色硬性渗出'),
    'cotton-wool spot': ('棉絮斑', '软性渗出斑'),
    'neovascularization': ('新生血管', '视网膜新生血管'),
    'drusen': ('玻璃膜疣', '黄斑区玻璃膜疣'),
    'geographic atrophy': ('地图样萎缩', '地图状萎缩'),
    'enlarged cup': ('视杯扩大', '视杯凹陷扩大'),
    'peripapillary atrophy': ('视盘周围萎缩', '视盘旁萎缩弧'),
    'tessellation': ('豹纹状眼底', '豹纹状改变'),
    'bone-spicule pigment': ('骨细胞样色素沉着', '骨细胞样色素'),
    'macular hole': ('黄斑裂孔', '黄斑全层裂孔'),
    'arterial narrowing': ('动脉变细', '动脉狭窄'),
    'av nicking': ('动静脉交叉压迫', '动静脉压迹'),
    'cataract haze': ('屈光介质混浊', '晶状体混浊'),
    'laser scar': ('激光斑', '激光瘢痕'),
}
# Negation cues: every negated finding in a report is preceded (same clause) by one of these.
NEGATION_CUES_EN: tuple[str, ...] = ('no', 'without', 'absence of')
NEGATION_CUES_ZH: tuple[str, ...] = ('未见', '无', '没有')

CONDITION_NAMES_ZH: dict[str, str] = {
    'normal': '正常眼底',
    'diabetic retinopathy': '糖尿病视网膜病变',
    'glaucoma': '青光眼',
    'age-related macular degeneration': '年龄相关性黄斑变性',
    'cataract': '白内障',
    'pathologic myopia': '病理性近视',
    'retinitis pigmentosa': '视网膜色素变性',
    'macular hole': '黄斑裂孔',
    'hypertensive retinopathy': '高血压视网膜病变',
}
DR_GRADE_NAMES_EN: tuple[str, ...] = (
    'no diabetic retinopathy', 'mild non-proliferative diabetic retinopathy',
    'moderate non-proliferative diabetic retinopathy', 'severe non-proliferative diabetic retinopathy',
    'proliferative diabetic retinopathy',
)
DR_GRADE_NAMES_ZH: tuple[str, ...] = (
    '无糖尿病视网膜病变', '轻度非增殖期糖尿病视网膜病变', '中度非增殖期糖尿病视网膜病变',
    '重度非增殖期糖尿病视网膜病变', '增殖期糖尿病视网膜病变',
)

_DESCRIPTIONS_PATH = os.path.join(os.path.dirname(__file__), 'knowledge', 'flair_descriptions.json')


_DESCRIPTIONS_ZH_PATH = os.path.join(os.path.dirname(__file__), 'knowledge', 'category_descriptions_zh.json')


def read_json_file(path: str, what: str):
    """A JSON data file; a missing file or invalid JSON is an error naming `what` and the path."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f'{what} not found: {path}') from None
    except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from None


def _load_descriptions(path: str) -> dict[str, list[str]]:
    with open(path, encoding='utf-8') as f:
        data = json.load(f)
    for name, descs in data.items():
        if not isinstance(descs, list) or not 1 <= len(descs) <= 6 or not all(isinstance(d, str) and d for d in descs):
            raise ValueError(f'{path}: category {name!r} needs 1..6 non-empty descriptions')
    return data


CATEGORY_DESCRIPTIONS: dict[str, list[str]] = _load_descriptions(_DESCRIPTIONS_PATH)
CATEGORY_DESCRIPTIONS_ZH: dict[str, list[str]] = _load_descriptions(_DESCRIPTIONS_ZH_PATH)

_missing = (set(CONDITIONS) | set(DR_GRADE_CATEGORIES) | set(FINDINGS)) - set(CATEGORY_DESCRIPTIONS)
if _missing:
    raise ValueError(f'{_DESCRIPTIONS_PATH} lacks categories {sorted(_missing)}')
_missing = set(CONDITIONS) - set(CATEGORY_DESCRIPTIONS_ZH)
if _missing:
    raise ValueError(f'{_DESCRIPTIONS_ZH_PATH} lacks conditions {sorted(_missing)}')


def category_vocabulary() -> list[str]:
    """Sorted category names; the integer id of a category is its index here."""
    return sorted(CATEGORY_DESCRIPTIONS)
