"""Zero-shot classification with prompt-ensemble class prototypes (METHODS.md section 1).

The prototype of a class is the MEAN (not re-normalised, as FLAIR) of the text embeddings of
`"A fundus photograph of d"` for the class name and each of its expert descriptions; the score of
an image is `s * zimg @ proto.T` followed by a softmax over classes.
"""
from __future__ import annotations

import numpy as np

from retina_jax.data import knowledge


def class_prompts(classes, template: str, descriptions=None) -> list[list[str]]:
    descriptions = knowledge.CATEGORY_DESCRIPTIONS if descriptions is None else descriptions
    prompts = []
    for name in classes:
        if name not in descriptions:
            raise KeyError(f"zero-shot class {name!r} has no entry in the descriptions dictionary")
        prompts.append([template.format(d) for d in [name] + list(descriptions[name])])
    return prompts


def class_prototypes(encode_text, tokenize, classes, template: str, descriptions=None) -> np.ndarray:
    """[C, D] prototypes; `encode_text(ids, mask) -> [N, D]` normalised embeddings."""
    protos = []
    for prompts in class_prompts(classes, template, descriptions):
        ids, mask = tokenize(prompts)
        protos.append(np.asarray(encode_text(ids, mask)).mean(axis=0))
    return np.stack(protos)


def zero_shot_probs(zimg: np.ndarray, prototypes: np.ndarray, scale: float) -> np.ndarray:
    logits = scale * np.asarray(zimg, np.float64) @ np.asarray(prototypes, np.float64).T  # [N, C]
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)
