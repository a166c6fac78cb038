"""The public face of a trained model for evaluation and transfer (docs/architecture.md,
"Evaluators"): embed images and texts, the image tower's pre-projection features, its spatial
tokens, the caption decoder's and masked-LM's logits, and the tokenizer. Evaluators and the
transfer suite use this, never the trainer.

`Encoder(model, tokenize, mesh)` compiles its functions once; `encoder.at(params, batch_stats)`
binds one set of variables (a train state's, or a checkpoint's) for one evaluation. Image batches
are laid out over the mesh's batch axes and every process gets every valid row back (`gather`).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from retina_jax import losses, sharding


class Encoder:
    def __init__(self, model, tokenize, mesh):
        self.model, self.tokenize = model, tokenize
        self.batch_sharding = sharding.batch_sharding(mesh)
        rows = self.batch_sharding
        self._text = jax.jit(lambda v, ids, mask: model.apply(v, ids, mask, method="encode_text"))
        self._image = jax.jit(lambda v, img: model.apply(v, img, method="encode_image"), out_shardings=rows)
        self._features = jax.jit(lambda v, img: model.apply(v, img, method="image_features"), out_shardings=rows)
        # KeepFIT V2: the caption decoder's image memory and logits; stage `text`'s masked-LM logits.
        self._tokens = jax.jit(lambda v, img: model.apply(v, img, method="encode_image_tokens")[1],
                               out_shardings=rows)
        self._caption_logits = jax.jit(lambda p, mem, tokens: model.apply({"params": p}, mem, tokens,
                                                                          method="caption_logits"))
        self._mlm_logits = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))
        self.variables = None

    def at(self, params, batch_stats, *, step: int = 0, checkpoint: str = "") -> "Encoder":
        """This encoder with one model's variables bound (shares the compiled functions); `step` and
        `checkpoint` (its run directory) are what the reports name."""
        bound = object.__new__(Encoder)
        bound.__dict__.update(self.__dict__)
        bound.variables = {"params": params, "batch_stats": batch_stats}
        bound.step, bound.checkpoint = step, checkpoint
        bound.cache = {}  # what several evaluators of one evaluation share (e.g. gathered features)
        return bound

    # ------------------------------------------------------------------------------ texts
    def embed_texts(self, ids, mask):
        """Projected, unit-norm text embeddings of tokenised texts."""
        return self._text(self.variables, ids, mask)

    @property
    def logit_scale(self) -> float:
        """exp of the clamped learned temperature (the zero-shot softmax's scale)."""
        raw = jax.device_get(self.variables["params"]["logit_scale"])
        return float(np.exp(np.clip(raw, 0.0, losses.LOGIT_SCALE_MAX)))

    # ------------------------------------------------------------------------------ images
    def embed_images(self, batches):
        """(projected unit-norm embeddings, labels) of (images, labels, valid) batches."""
        return self.gather(self._image, batches)

    def image_features(self, batches):
        """(pre-projection image-tower features, labels) of (images, labels, valid) batches."""
        return self.gather(self._features, batches)

    def image_tokens(self, batches):
        """(spatial image tokens [N, T, D] for the caption decoder, labels)."""
        return self.gather(self._tokens, batches)

    def gather(self, fn, batches):
        """`fn(variables, images)` over (images, labels, valid) batches of this process; every
        process gets all valid rows of all processes."""
        outputs, labels = [], []
        for images, y, valid in batches:
            out = fn(self.variables, jax.make_array_from_process_local_data(self.batch_sharding, images))
            out, y, valid = (multihost_utils.process_allgather(a, tiled=True) if jax.process_count() > 1
                             else np.asarray(a) for a in (out, y, valid))
            outputs.append(np.asarray(out)[valid])
            labels.append(np.asarray(y)[valid])
        return np.concatenate(outputs), np.concatenate(labels)

    def image_tower(self) -> dict:
        """The image tower's own variables (`tower_features`' first argument)."""
        return {"params": self.variables["params"]["img"], "batch_stats": self.variables["batch_stats"].get("img", {})}

    def tower_features(self, variables, images, train: bool):
        """(pre-projection features, new BatchNorm statistics or None) of the image tower alone with
        `variables` (fine-tuning trains a copy of `image_tower()`)."""
        if not train:
            return self.model.img.apply(variables, images, train=False), None
        features, updates = self.model.img.apply(variables, images, train=True, mutable=["batch_stats"])
        return features, updates.get("batch_stats", {})

    # ------------------------------------------------------------------------------ decoders
    def caption_logits(self, memory, tokens):
        return self._caption_logits(self.variables["params"], memory, tokens)

    def mlm_logits(self, ids, mask):
        return self._mlm_logits(self.variables["params"], ids, mask)
