"""Where a train step's time goes (issue 19): a `jax.profiler` trace of the compiled step, its XLA
operations summed by kind and by the model part they belong to, beside XLA's own cost estimate.

The step is `Trainer.train_step` of a `benchmarks/step_speed.py` case, on a batch from the run's
input pipeline. After `--warmup` steps, `--steps` steps run under `jax.profiler.trace`; the trace's
XLA op events (one per executed HLO instruction or fusion) are grouped

- by kind: convolution, dot (matmul), the rest of the fusions (elementwise, reductions), copies
  and transposes, scatter/gather, custom calls, and the host side between ops;
- by part: the first name scope of the op's JAX source (`img`, `txt`, `img_proj`, the loss's
  `contrastive_logits`, the optimizer, ...), read off the HLO metadata.

    python benchmarks/step_profile.py --case vilref_demo
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from step_speed import CASES, jax_side  # noqa: E402


def op_kind(name: str) -> str:
    n = name.lower()
    for kind, pattern in (("YNNPACK/XNNPACK call", r"^[xy]nn_"), ("oneDNN call", r"onednn"), ("convolution", r"conv"), ("dot", r"dot|gemm|matmul"), ("copy/transpose", r"copy|transpose"),
                          ("scatter/gather", r"scatter|gather|dynamic"), ("reduce", r"reduce"),
                          ("custom call", r"custom"), ("fusion", r"fusion")):
        if re.search(pattern, n):
            return kind
    return "other"


def hlo_parts(compiled_text: str) -> tuple[dict[str, str], dict[str, str]]:
    """HLO instruction name -> (the model part of its JAX op_name metadata, its JAX primitive)."""
    parts, primitives = {}, {}
    for m in re.finditer(r"%?([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]+)\"", compiled_text):
        scopes = [s for s in m.group(2).split("/") if s and not s.startswith(("jit(", "jvp(", "transpose(", "vmap("))]
        parts[m.group(1)] = _part(scopes)
        primitives[m.group(1)] = scopes[-1].split("[")[0] if scopes else "(none)"
    return parts, primitives


def _part(scopes: list[str]) -> str:
    for s in scopes:
        if s in ("img", "txt", "img_proj", "txt_proj", "knowledge", "decoder", "contrastive_logits"):
            return s
    if any(s.startswith(("adam", "scale_by", "add_decayed", "clip")) for s in scopes):
        return "optimizer"
    return scopes[-1].split("[")[0] if scopes else "(none)"


def read_trace(directory: str) -> list[dict]:
    paths = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise SystemExit(f"step_profile: no trace written under {directory}")
    with gzip.open(paths[0]) as f:
        return json.load(f)["traceEvents"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", default="vilref_demo", choices=sorted(CASES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=15, help="the most expensive single ops to list")
    args = parser.parse_args(argv)
    from absl import flags
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    import jax

    with tempfile.TemporaryDirectory() as workdir:
        config, trainer, state, batch, _ = jax_side(args.case, workdir)
        compiled = trainer.train_step.lower(state, batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        parts, primitives = hlo_parts(compiled.as_text())
        for _ in range(args.warmup):
            state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(state)
        trace_dir = os.path.join(workdir, "trace")
        with jax.profiler.trace(trace_dir):
            for _ in range(args.steps):
                state, metrics = trainer.train_step(state, batch)
            jax.block_until_ready((state, metrics))
        events = [e for e in read_trace(trace_dir) if e.get("ph") == "X" and "dur" in e]

    # XLA ops: the events named after HLO instructions of this program.
    ops = [e for e in events if e["name"] in parts or e.get("args", {}).get("hlo_op") in parts]
    by_kind, by_part, by_op, by_primitive = (collections.Counter() for _ in range(4))
    for e in ops:
        name = e.get("args", {}).get("hlo_op", e["name"])
        by_kind[op_kind(name)] += e["dur"]
        by_part[parts.get(name, "(none)")] += e["dur"]
        by_op[name] += e["dur"]
        by_primitive[f"{parts.get(name, '(none)')}: {primitives.get(name, '(none)')}"] += e["dur"]
    total = sum(by_kind.values())
    print(f"{args.case}: {len(ops) // max(args.steps, 1)} XLA ops a step, {total / args.steps / 1e3:.1f} ms of op time a "
          f"step (summed over threads)")
    print(f"XLA cost estimate: {cost.get('flops', 0) / 1e9:.2f} GFLOP, {cost.get('bytes accessed', 0) / 1e6:.0f} MB "
          "accessed a step")
    for title, counter in (("by kind", by_kind), ("by part", by_part), ("by part and JAX primitive", by_primitive)):
        print(f"  {title}:")
        for key, us in counter.most_common(args.top):
            print(f"    {key:28s} {us / args.steps / 1e3:8.1f} ms  {100 * us / total:5.1f} %")
    print(f"  the {args.top} most expensive ops:")
    for name, us in by_op.most_common(args.top):
        print(f"    {name:40s} {parts.get(name, ''):20s} {us / args.steps / 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
