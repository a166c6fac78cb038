"""FLAIR (Silva-Rodriguez et al., 2023; docs/methods.md, "FLAIR"): image-text pretraining where the
positives of an image are all texts of its category.

The public stream pairs each image with a FLAIR prompt built from its category ("A [ATR] fundus
photograph of [CLS]", the category swapped for one of its expert descriptions). The loss is CLIP's
symmetric cross-entropy with a soft target, `target[i, j] = [cat_i == cat_j] / #{k: cat_k == cat_i}`
(`losses.flair_loss`); `loss.name='clip'` keeps only the paired text as positive. The temperature
`logit_scale` is clamped to [0, ln 100] in place before every forward, as FLAIR does.
"""
from __future__ import annotations

from retina_jax.methods.base import TwoTowerMethod


class Flair(TwoTowerMethod):
    name = "flair"
    losses = ("flair", "clip")

