r"""Zero-shot prediction on real photographs with a retina_jax or converted checkpoint
(FLAIR's transfer protocol, docs/methods.md, "FLAIR"; CLIP/ViLReF preprocessing, "ViLReF").

  retina-jax predict --checkpoint workdirs/flair_demo \
      --image fundus1.jpg fundus2.png --classes "normal,diabetic retinopathy,glaucoma" [--json out.json]

`--checkpoint` is a training run's directory (its `run_info.json` config and learned tokenizer are
used) or a `python -m retina_jax.convert` output (its `manifest.json` gives the architecture and
the original's preprocessing). Images are preprocessed as the checkpoint's method expects
(`data.preprocess`: FLAIR = [0, 1] pixels, long side to the image size, zero-pad bottom/right;
CLIP/ViLReF = square bicubic resize and CLIP mean/std). Each class prototype is the mean text
embedding over every template and the class's name plus its expert descriptions (when the
dictionary knows the class); probabilities are `softmax(s * zimg @ proto.T)`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import numpy as np
from jax.sharding import AxisType
from PIL import Image, UnidentifiedImageError

from retina_jax import checkpointing, commands, sharding
from retina_jax.config import converted_overrides, flatten, from_run, override
from retina_jax.data import transforms
from retina_jax.data.tokenizer import Tokenize
from retina_jax.encoder import Encoder
from retina_jax.errors import CheckpointError, UserError
from retina_jax.evals import zeroshot
from retina_jax.models.two_tower import build_model


def read_image(path: str) -> np.ndarray:
    """uint8 RGB [H, W, 3]; errors name the file (missing, not an image, truncated)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def checkpoint_config(checkpoint: str, tokenizer: str | None = None):
    """The config a checkpoint directory was trained or converted with (common defaults + its values)."""
    if not os.path.isdir(checkpoint):
        raise CheckpointError(f"--checkpoint {checkpoint}: no such directory (a training run directory or a "
                              "retina-jax convert output)")
    if checkpointing.read_manifest(checkpoint) is not None:
        from configs import common
        config = override(common.get_config(), {k: v for k, v in converted_overrides(checkpoint).items()
                                                if k in flatten(common.get_config())})
    elif os.path.isfile(os.path.join(checkpoint, "run_info.json")):
        config = from_run(checkpoint)
    else:
        raise CheckpointError(f"--checkpoint {checkpoint}: neither a converted checkpoint (manifest.json) nor a "
                              "training run directory (run_info.json)")
    if tokenizer:
        config.text.tokenizer = tokenizer
    if config.text.tokenizer == "learn" or not os.path.isdir(config.text.tokenizer):
        raise CheckpointError(f"{checkpoint}: no tokenizer directory (text.tokenizer={config.text.tokenizer!r}); "
                              "pass --tokenizer DIR")
    return config


@dataclasses.dataclass
class Predictor:
    """A checkpoint's config and its model as the public `Encoder` (encoder.py) on one device: the
    same embeddings and temperature the evaluators use."""
    config: object
    encoder: Encoder

    @classmethod
    def load(cls, checkpoint: str, tokenizer: str | None = None, step: int | None = None) -> "Predictor":
        """`step`: a checkpoint the run kept (default the latest)."""
        config = checkpoint_config(checkpoint, tokenizer)
        tokenize = Tokenize(config.text.tokenizer, config.text.max_len)
        model = build_model(config.model, tokenize.vocab_size, config.data.image_size, config.text.max_len)
        size = config.data.image_size
        abstract = jax.eval_shape(lambda: model.init(
            jax.random.key(0), np.zeros((1, size, size, 3), np.float32),
            np.zeros((1, config.text.max_len), np.int32), np.ones((1, config.text.max_len), np.int32)))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params, batch_stats = checkpointing.init_from(checkpoint, abstract["params"], abstract.get("batch_stats", {}),
                                                      device, step=step, what=f"--checkpoint {checkpoint}")
        missing = [k for k, v in {**params, **batch_stats}.items()
                   if any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(v))]
        if missing:
            raise ValueError(f"{checkpoint} holds no {missing}: zero-shot prediction needs both towers, their "
                             "projections and logit_scale (a towers-only conversion trains on, it cannot predict)")
        mesh = jax.make_mesh((1, 1), sharding.BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                             devices=jax.devices()[:1])
        return cls(config, Encoder(model, tokenize, mesh).at(params, batch_stats, checkpoint=checkpoint))

    @property
    def model(self):
        return self.encoder.model

    @property
    def variables(self) -> dict:
        return self.encoder.variables

    @property
    def tokenize(self) -> Tokenize:
        return self.encoder.tokenize

    @property
    def scale(self) -> float:
        """exp of the clamped logit_scale, as every method uses it."""
        return self.encoder.logit_scale

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        return transforms.preprocess(image, self.config.data.image_size, self.config.data.preprocess)

    def embed_images(self, images: list[np.ndarray], batch_size: int = 8) -> np.ndarray:
        """uint8 RGB images of any size -> [N, D] unit-norm embeddings."""
        out = []
        for i in range(0, len(images), batch_size):
            batch = np.stack([self.preprocess(im) for im in images[i:i + batch_size]])
            out.append(self.encoder.embed_images([(batch, np.zeros(len(batch), np.int32), np.ones(len(batch), bool))])[0])
        return np.concatenate(out)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        ids, mask = self.tokenize(texts)
        return np.asarray(self.encoder.embed_texts(ids, mask))

    def prototypes(self, classes, templates=None, use_descriptions: bool = True, language: str | None = None
                   ) -> np.ndarray:
        """[C, D] class prototypes; templates and language default to the run's own zero-shot prompts
        (`prompts.templates` / `prompts.language`: Chinese for ViLReF)."""
        z = self.config.prompts
        descriptions = None if use_descriptions else {}
        return zeroshot.class_prototypes(self.encoder.embed_texts, self.tokenize,
                                         classes, tuple(templates or z.templates), descriptions,
                                         require_descriptions=False, language=language or z.language)

    def predict(self, paths, classes, templates=None, use_descriptions: bool = True, batch_size: int = 8,
                language: str | None = None) -> list[dict]:
        """Per image: {'image', 'probs': {class: p}, 'top'}; every image is read before any compute.
        Prompts as `prototypes`: the run's templates and language unless given (`language='zh'`:
        the classes' Chinese names and descriptions; English class names in, as the zero-shot
        evaluation takes them)."""
        if len(classes) < 2:
            raise ValueError(f"need at least 2 classes, got {list(classes)}")
        images = [read_image(p) for p in paths]
        probs = zeroshot.zero_shot_probs(self.embed_images(images, batch_size),
                                         self.prototypes(classes, templates, use_descriptions, language), self.scale)
        return [{"image": path, "probs": {c: float(p) for c, p in zip(classes, row)}, "top": classes[int(row.argmax())]}
                for path, row in zip(paths, probs)]


def format_table(results: list[dict], classes) -> str:
    name_width = max(len("image"), *(len(os.path.basename(r["image"])) for r in results))
    widths = [max(6, len(c)) for c in classes]
    lines = ["  ".join(["image".ljust(name_width)] + [c.rjust(w) for c, w in zip(classes, widths)] + ["top"])]
    for r in results:
        cells = [f"{r['probs'][c]:.4f}".rjust(w) for c, w in zip(classes, widths)]
        lines.append("  ".join([os.path.basename(r["image"]).ljust(name_width)] + cells + [r["top"]]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = commands.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="training run directory or converted checkpoint")
    parser.add_argument("--image", nargs="+", required=True, help="image files (JPEG, PNG, ...; any size)")
    parser.add_argument("--classes", required=True, help="comma-separated class names")
    parser.add_argument("--template", action="append",
                        help="prompt template(s) with {}; default: the run's prompts.templates")
    parser.add_argument("--language", choices=zeroshot.LANGUAGES,
                        help="prompt language; default: the run's prompts.language (zh for ViLReF)")
    parser.add_argument("--no_descriptions", action="store_true", help="prompt class names only (no expert descriptions)")
    parser.add_argument("--tokenizer", help="tokenizer directory, if the checkpoint carries none")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--step", type=int, help="the checkpoint of this step (one the run kept); default the latest")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    try:
        for t in args.template or ():
            if "{}" not in t:
                raise ValueError(f"--template {t!r} has no {{}} for the class text")
        predictor = Predictor.load(args.checkpoint, args.tokenizer, args.step)
        templates = tuple(args.template or predictor.config.prompts.templates)
        language = args.language or predictor.config.prompts.language
        print(f"prompts: language {language}, templates {list(templates)}", file=sys.stderr)
        results = predictor.predict(args.image, classes, templates, not args.no_descriptions, args.batch_size,
                                    language)
    except (UserError, FileNotFoundError, ValueError) as e:  # a missing image or class list included
        return commands.report_user_error(e)
    print(format_table(results, classes))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"checkpoint": os.path.abspath(args.checkpoint), "classes": classes, "templates": list(templates),
                       "language": language,
                       "preprocess": predictor.config.data.preprocess, "image_size": predictor.config.data.image_size,
                       "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
