"""Zero-shot classification with prompt-ensemble class prototypes (docs/methods.md, "FLAIR").

The prototype of a class is the MEAN (not re-normalised, as FLAIR) of the text embeddings of
every template filled with the class name and each of its expert descriptions; the score of an
image is `s * zimg @ proto.T` followed by a softmax over classes. ViLReF's Chinese prompt
ensembles ("ViLReF") use `language='zh'`: the texts of a class are its Chinese name and
descriptions (`knowledge.CATEGORY_DESCRIPTIONS_ZH`) instead of the English name and descriptions.
"""
from __future__ import annotations

import numpy as np

from retina_jax.data import knowledge


LANGUAGES = ("en", "zh")


def class_prompts(classes, templates, descriptions=None, *, require_descriptions: bool = True,
                  language: str = "en", name_prompt: bool = True) -> list[list[str]]:
    """Per class, every template (a str or a sequence of them) filled with each of its texts.

    With `require_descriptions=False` a class missing from the dictionary is prompted by its name only
    (the predictor's free-form classes); otherwise it is an error, as in the evaluation tasks.
    `name_prompt=False` leaves the class name out (English) or the Chinese name that starts the
    Chinese entry: FLAIR's MMAC grades, whose names "are not informative", are prompted by their
    descriptions alone; a class then left without a text is an error.
    """
    if language not in LANGUAGES:
        raise ValueError(f"zero-shot language {language!r} not in {LANGUAGES}")
    if descriptions is None:
        descriptions = knowledge.CATEGORY_DESCRIPTIONS if language == "en" else knowledge.CATEGORY_DESCRIPTIONS_ZH
    templates = [templates] if isinstance(templates, str) else list(templates)
    prompts = []
    for name in classes:
        if name not in descriptions and require_descriptions:
            raise KeyError(f"zero-shot class {name!r} has no entry in the {language} descriptions dictionary")
        # The Chinese dictionary starts with the class's Chinese name, which replaces the English one.
        texts = list(descriptions[name]) if language == "zh" and name in descriptions else \
            [name] + list(descriptions.get(name, ()))
        if not name_prompt:
            texts = texts[1:]
            if not texts:
                raise ValueError(f"zero-shot class {name!r}: name_prompt is false and it has no {language} description")
        prompts.append([t.format(d) for t in templates for d in texts])
    return prompts


def class_prototypes(encode_text, tokenize, classes, templates, descriptions=None, *,
                     require_descriptions: bool = True, language: str = "en", name_prompt: bool = True) -> np.ndarray:
    """[C, D] prototypes; `encode_text(ids, mask) -> [N, D]` normalised embeddings."""
    protos = []
    for prompts in class_prompts(classes, templates, descriptions, require_descriptions=require_descriptions,
                                 language=language, name_prompt=name_prompt):
        ids, mask = tokenize(prompts)
        protos.append(np.asarray(encode_text(ids, mask)).mean(axis=0))
    return np.stack(protos)


def zero_shot_probs(zimg: np.ndarray, prototypes: np.ndarray, scale: float) -> np.ndarray:
    logits = scale * np.asarray(zimg, np.float64) @ np.asarray(prototypes, np.float64).T  # [N, C]
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)
