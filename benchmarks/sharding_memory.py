"""Per-device memory of the compiled train step at full size: replicated vs FSDP, remat, bf16.

Compiles (never runs) the ViLReF paper configuration's train step (`configs/vilref.py`: CLIP
ViT-B/16 image tower at 224 px, 12-layer BERT-base text tower, batch 256) on 8 devices for each
variant and reports XLA's memory analysis per device: arguments (the train state's share plus the
batch's), temporaries (activations kept for the backward pass, the logits blocks, collectives'
buffers) and outputs, and which [rows, columns] blocks of the contrastive logits it holds.
On CPU the 8 devices are faked (`XLA_FLAGS=--xla_force_host_platform_device_count=8`); the
figures are XLA's buffer assignment for those devices, the same program a GPU/TPU would be handed
up to backend-specific fusion.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sharding_memory.py
  ... --variants replicate,fsdp,fsdp_remat,fsdp_remat_bf16 --batch-size 256
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import time

import jax
import numpy as np
from absl import flags, logging

from retina_jax import config as config_lib
from retina_jax.data import pipeline
from retina_jax.train import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDP = {"mesh.data": 1, "mesh.fsdp": -1, "mesh.param_sharding": "fsdp"}  # mesh.fsdp -1: every device
VARIANTS = {
    "replicate": {},
    "fsdp": FSDP,
    "fsdp_remat": {**FSDP, "model.remat": True},
    "fsdp_remat_bf16": {**FSDP, "model.remat": True, "model.compute_dtype": "bfloat16"},
}


def logits_blocks(hlo: str, batch: int, devices: int) -> dict:
    """Whether the compiled program holds [B/n, K] blocks of a logits matrix and any whole [B, K] one
    (K = B, or B + queue for WSCL): 2-D f32 results of the batch's rows against >= B columns."""
    shapes = {(int(r), int(c)) for r, c in re.findall(r"= f32\[(\d+),(\d+)\]", hlo)}
    return {"row_blocks": sorted(s for s in shapes if s[0] == batch // devices and s[1] >= batch),
            "whole": sorted(s for s in shapes if s[0] == batch and s[1] >= batch)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default="workdirs/sharding_memory.json")
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()
    logging.set_verbosity(logging.WARNING)
    n = jax.device_count()
    results = {}
    batch = None
    for name in args.variants.split(","):
        extra = dict(VARIANTS[name])
        if extra.get("mesh.fsdp") == -1:
            extra["mesh.fsdp"] = n
        config = config_lib.load(os.path.join(REPO, "configs", "vilref.py"))
        config_lib.override(config, {"data.batch_size": args.batch_size, "data.worker_count": 0,
                                     "data.synthetic.size": max(args.batch_size, 512), **extra})
        trainer = Trainer(config, tempfile.mkdtemp(prefix="sharding_memory_"))
        if batch is None:  # one real batch fixes the shapes and dtypes (the same for every variant)
            example = next(iter(pipeline.train_dataset(config, trainer.tokenize, None, None)))
            batch = {k: v for k, v in example.items() if isinstance(v, np.ndarray)}
        abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
                          for k, v in batch.items()}
        t0 = time.time()
        compiled = trainer.train_step.lower(trainer.abstract_state, abstract_batch).compile()
        mem = compiled.memory_analysis()
        gib = 2 ** 30
        results[name] = {
            "mesh": dict(trainer.mesh.shape),
            "params_millions": round(sum(int(np.prod(a.shape)) for a in jax.tree.leaves(trainer.abstract_state.params))
                                     / 1e6, 1),
            "argument_gib": round(mem.argument_size_in_bytes / gib, 3),
            "temp_gib": round(mem.temp_size_in_bytes / gib, 3),
            "output_gib": round(mem.output_size_in_bytes / gib, 3),
            "logits": logits_blocks(compiled.as_text(), args.batch_size, n),
            "compile_seconds": round(time.time() - t0, 1),
        }
        print(name, json.dumps(results[name]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(), "devices": n,
                   "backend": jax.default_backend(), "batch_size": args.batch_size, "results": results}, f, indent=2)
    print("| variant | mesh | arguments / device (GiB) | temporaries / device (GiB) | [B/n, K] blocks | whole [B, K] | compile s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
        print(f"| {name} | {mesh} | {r['argument_gib']} | {r['temp_gib']} | {r['logits']['row_blocks']} | "
              f"{r['logits']['whole'] or 'none'} | {r['compile_seconds']} |")


if __name__ == "__main__":
    main()
