"""Zero-shot classification with prompt-ensemble class prototypes (METHODS.md section 1).

The prototype of a class is the MEAN (not re-normalised, as FLAIR) of the text embeddings of
`"A fundus photograph of d"` for the class name and each of its expert descriptions; the score of
an image is `s * zimg @ proto.T` followed by a softmax over classes.
"""
from __future__ import annotations

import numpy as np

from retina_jax.data import knowledge


def class_prompts(classes, templates, descriptions=None, *, require_descriptions: bool = True) -> list[list[str]]:
    """Per class, every template (a str or a sequence of them) filled with its name and descriptions.

    With `require_descriptions=False` a class missing from the dictionary is prompted by its name only
    (the predictor's free-form classes); otherwise it is an error, as in the evaluation tasks.
    """
    descriptions = knowledge.CATEGORY_DESCRIPTIONS if descriptions is None else descriptions
    templates = [templates] if isinstance(templates, str) else list(templates)
    prompts = []
    for name in classes:
        if name not in descriptions and require_descriptions:
            raise KeyError(f"zero-shot class {name!r} has no entry in the descriptions dictionary")
        texts = [name] + list(descriptions.get(name, ()))
        prompts.append([t.format(d) for t in templates for d in texts])
    return prompts


def class_prototypes(encode_text, tokenize, classes, templates, descriptions=None, *,
                     require_descriptions: bool = True) -> np.ndarray:
    """[C, D] prototypes; `encode_text(ids, mask) -> [N, D]` normalised embeddings."""
    protos = []
    for prompts in class_prompts(classes, templates, descriptions, require_descriptions=require_descriptions):
        ids, mask = tokenize(prompts)
        protos.append(np.asarray(encode_text(ids, mask)).mean(axis=0))
    return np.stack(protos)


def zero_shot_probs(zimg: np.ndarray, prototypes: np.ndarray, scale: float) -> np.ndarray:
    logits = scale * np.asarray(zimg, np.float64) @ np.asarray(prototypes, np.float64).T  # [N, C]
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)
