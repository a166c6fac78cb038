r"""Convert a released PyTorch / Hugging Face checkpoint into one `config.model_init` loads
(docs/methods.md, "Checkpoint interoperability").

  python -m retina_jax.convert --from flair flair_resnet.pth --tokenizer Bio_ClinicalBERT/ --out ckpt/flair
  python -m retina_jax.convert --from keepfit keepfit.pth --tokenizer Bio_ClinicalBERT/ --out ckpt/keepfit
  python -m retina_jax.convert --from vilref vilref_vit_b16.pt --tokenizer chinese-roberta-wwm-ext/ --out ckpt/vilref
  python -m retina_jax.convert --from hf-bert Bio_ClinicalBERT/ --out ckpt/bert
  python -m retina_jax.convert --from torchvision-resnet resnet50-0676ba61.pth --out ckpt/resnet50
  python -m retina_jax.convert --from openai-clip ViT-B-16.pt --image_size 384 --out ckpt/clip

The output directory holds `checkpoints/0` (the `params` / `batch_stats` trees), `manifest.json`
(source, trees, the config values the model needs, the original's preprocessing, and every key
left out on purpose with its reason) and, when a tokenizer is known, `tokenizer/`. The command
prints the flags that train on from it (`--config.model_init=DIR` plus the manifest's config) and
the predictor reads it directly (`python -m retina_jax.predict --checkpoint DIR`).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import shutil
import sys

import jax
import numpy as np

from retina_jax import checkpointing, commands
from retina_jax.models import importers
from retina_jax.models.checkpoint_io import read_state_dict

SOURCES = ("flair", "keepfit", "vilref", "hf-bert", "torchvision-resnet", "openai-clip")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
FORMAT = "retina_jax/converted-v1"


def _sha256(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_tokenizer(src: str, out_dir: str) -> str:
    files = [f for f in _TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
    if not any(f in files for f in ("tokenizer.json", "vocab.txt")):
        raise FileNotFoundError(f"--tokenizer {src}: no tokenizer.json or vocab.txt in it")
    dst = os.path.join(out_dir, "tokenizer")
    os.makedirs(dst, exist_ok=True)
    for f in files:
        shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
    return dst


def _vocab_size(tokenizer_dir: str) -> int:
    from retina_jax.data.tokenizer import load_tokenizer
    return load_tokenizer(tokenizer_dir, 8).get_vocab_size()


def convert(source_kind: str, source: str, out_dir: str, *, tokenizer: str | None = None,
            image_size: int | None = None, trust_pickle: bool = False, text_heads: int | None = None,
            image_heads: int | None = None, text_config: str | None = None) -> dict:
    """Convert `source` and write `out_dir`; returns the manifest. Head counts are not in the
    weights: `text_config` (the text tower's Hugging Face config.json), `text_heads` and
    `image_heads` give them; otherwise the original's rule is assumed and listed in the manifest's
    `assumed`."""
    if source_kind not in SOURCES:
        raise ValueError(f"--from {source_kind!r} not in {SOURCES}")
    checkpointing.check_new_output(out_dir)  # before the (slow) reading and converting
    state, hf_config = read_state_dict(source, trust_pickle=trust_pickle)
    num_keys = len(state)
    txt_config = _read_json(text_config) if text_config else None
    if image_heads and source_kind not in ("vilref", "openai-clip"):
        raise ValueError(f"--image_heads applies to CLIP-layout towers (vilref, openai-clip), not {source_kind}")
    if (text_heads or txt_config) and source_kind in ("openai-clip", "torchvision-resnet"):
        raise ValueError(f"--text_heads / --text_config: {source_kind} has no text tower to import")
    if source_kind in ("flair", "keepfit"):
        converted = importers.import_flair(state, knowledge=source_kind == "keepfit", text_config=txt_config,
                                             text_heads=text_heads)
    elif source_kind == "vilref":
        converted = importers.import_vilref(state, image_size=image_size, image_heads=image_heads,
                                              text_config=txt_config, text_heads=text_heads)
    elif source_kind == "openai-clip":
        converted = importers.import_openai_clip(state, image_size=image_size, image_heads=image_heads)
    elif source_kind == "torchvision-resnet":
        converted = importers.import_torchvision_resnet(state)
    else:
        if hf_config is None:
            raise FileNotFoundError(f"--from hf-bert needs a Hugging Face directory with config.json: {source}")
        converted = importers.import_hf_bert(state, txt_config or hf_config, text_heads)
        tokenizer = tokenizer or source  # HF directories carry their tokenizer
    if image_size and source_kind not in ("vilref", "openai-clip"):
        raise ValueError(f"--image_size only applies to CLIP-layout towers (vilref, openai-clip), not {source_kind}")

    config, suggested = dict(converted.config), dict(converted.suggested)
    if "txt" in converted.variables["params"]:
        if tokenizer is None:
            print(f"note: no --tokenizer given; set config.text.tokenizer to the {source_kind} tokenizer "
                  "directory when training or predicting", file=sys.stderr)
        else:
            rows = converted.variables["params"]["txt"]["embeddings"]["word_embeddings"]["embedding"].shape[0]
            if not os.path.isdir(tokenizer):
                raise FileNotFoundError(f"--tokenizer {tokenizer}: not a directory")
            vocab = _vocab_size(tokenizer)
            if vocab != rows:
                raise ValueError(f"--tokenizer {tokenizer}: vocabulary of {vocab} tokens, but the "
                                 f"checkpoint's word embeddings have {rows} rows")
            os.makedirs(out_dir, exist_ok=True)
            _copy_tokenizer(tokenizer, out_dir)
            config["text.tokenizer"] = "tokenizer"  # relative to the manifest (read_manifest resolves it)
    params, batch_stats = converted.variables["params"], converted.variables["batch_stats"]
    count = lambda tree: int(sum(np.size(a) for a in jax.tree.leaves(tree)))
    manifest = {
        "format": FORMAT, "from": source_kind, "source": os.path.abspath(source),
        "source_sha256": _sha256(source), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "source_keys": num_keys,
        "contains": {"params": {k: count(v) for k, v in params.items()},
                     "batch_stats": {k: count(v) for k, v in batch_stats.items()}},
        "config": config, "suggested": suggested, "dropped": converted.dropped, "assumed": converted.assumed,
    }
    checkpointing.save_variables(out_dir, converted.variables, manifest)
    return manifest


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--text_config {path}: not a file (a Hugging Face config.json)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--text_config {path}: not JSON ({e})") from e


def train_flags(manifest: dict, out_dir: str) -> str:
    flags = [f"--config.model_init={os.path.abspath(out_dir)}"]
    for key, value in manifest["config"].items():
        if key == "text.tokenizer":
            value = os.path.join(os.path.abspath(out_dir), value)
        if isinstance(value, list):
            value = "(" + ",".join(str(v) for v in value) + (",)" if len(value) == 1 else ")")
        flags.append(f"--config.{key}={value}")
    return " ".join(shlex.quote(f) for f in flags)  # tuples' parentheses must survive the shell


def main(argv=None) -> int:
    parser = commands.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source_kind", required=True, choices=SOURCES)
    parser.add_argument("source", help="checkpoint file (.pt/.pth/.bin/.safetensors) or Hugging Face directory")
    parser.add_argument("--out", required=True, help="output directory (must not hold a converted checkpoint)")
    parser.add_argument("--tokenizer", help="tokenizer directory (tokenizer.json or vocab.txt) to ship with it")
    parser.add_argument("--image_size", type=int, help="CLIP towers: resample the learned positions to this size")
    parser.add_argument("--text_heads", type=int, help="text tower attention heads (default: config.json, else "
                        "hidden size / 64)")
    parser.add_argument("--text_config", help="the text tower's Hugging Face config.json (heads, eps, ...)")
    parser.add_argument("--image_heads", type=int, help="CLIP image tower attention heads (default: CLIP's rule)")
    parser.add_argument("--trust_pickle", action="store_true",
                        help="allow torch checkpoints that pickle non-tensor objects (executes code from the file)")
    args = parser.parse_args(argv)
    try:
        manifest = convert(args.source_kind, args.source, args.out, tokenizer=args.tokenizer,
                           image_size=args.image_size, trust_pickle=args.trust_pickle, text_heads=args.text_heads,
                           image_heads=args.image_heads, text_config=args.text_config)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.source_kind} checkpoint {args.source} ({manifest['source_keys']} keys) -> {args.out}")
    for collection, trees in manifest["contains"].items():
        for tree, n in trees.items():
            print(f"  {collection}/{tree}: {n:,} values")
    for key, why in manifest["dropped"].items():
        print(f"  left out {key}: {why}")
    for field, why in manifest["assumed"].items():
        print(f"  assumed {field} = {why}")
    print("train on from it with:\n  retina-jax train --config configs/<method>.py "
          + train_flags(manifest, args.out))
    print(f"predict with:\n  retina-jax predict --checkpoint {args.out} --image IMAGE --classes \"a,b\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
