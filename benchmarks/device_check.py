"""The accelerator check of issue 19 (item 5): the papers' train steps on one GPU, their model FLOP
utilisation and memory, and open_clip's ViT-B-16 step on the same device for the ratio.

Cases (each `Trainer.train_step` as a run calls it, on one batch of the run's own input pipeline):
- `vilref`: ViLReF's paper step (configs/vilref.py: ViT-B/16 + BERT-base at 224 px, 100 tokens,
  batch 256, WSCL with momentum towers and a 65,536-entry queue), bf16 compute;
- `vilref_remat`: the same with `model.remat` (memory against time);
- `flair`: FLAIR's paper step (configs/flair.py: ResNet-50 at 512 px + BERT-base, batch 128), bf16;
- `open_clip`: open_clip's ViT-B-16 (its own 12-layer 512-wide text tower, 77 tokens) training step
  at the same batch under bf16 autocast with AdamW, when open_clip is importable; otherwise the
  report says why it did not run.

For each: the median step time of `--steps` steps after `--warmup`, the FLOPs of one step by XLA's
cost analysis of the compiled step and, for the transformer towers, written out (`model_flops`:
2 x multiply-adds of every matmul, the attention products included, forward x 3 for the backward,
plus one forward of both towers for ViLReF's momentum model), MFU = model FLOPs / (step time x
`--peak_tflops`), the device's peak memory in use after the steps (GPU) and XLA's memory analysis
of the compiled step (arguments, temporaries). FSDP's per-device saving needs more than one device;
`benchmarks/sharding_memory.py` measures it on 8. `--tiny` shrinks every tower and batch so the
logic runs on a CPU in seconds (tests/test_device_check.py).

    python benchmarks/device_check.py --out /tmp/device_check.json      # benchmarks/device_check.sh
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from step_speed import PAPER_VOCAB, build, median_step  # noqa: E402

H200_BF16_TFLOPS = 989.0  # dense bf16 peak of one H200 SXM
VILREF = {"model_init": "", "model.compute_dtype": "bfloat16", "data.synthetic.size": 65_536}
CASES = {
    "vilref": ("configs/vilref.py", VILREF),
    "vilref_remat": ("configs/vilref.py", {**VILREF, "model.remat": True}),
    "flair": ("configs/flair.py", {"model.compute_dtype": "bfloat16"}),
}
# --tiny: the same programs at shapes a CPU compiles and runs in seconds.
TINY_TEXT = {"model.txt.hidden_size": 64, "model.txt.num_hidden_layers": 2, "model.txt.num_attention_heads": 2,
             "model.txt.intermediate_size": 128, "text.max_len": 16, "data.batch_size": 8, "model.embed_dim": 32,
             "model.compute_dtype": "float32"}
TINY = {
    "vilref": {**TINY_TEXT, "model.img.vit.width": 64, "model.img.vit.layers": 2, "model.img.vit.heads": 2,
               "model.img.vit.mlp_dim": 128, "data.image_size": 32, "data.synthetic.image_size": 32,
               "momentum.queue_size": 16, "data.synthetic.size": 64},
    "flair": {**TINY_TEXT, "model.img.width": 8, "model.img.stage_sizes": (1, 1, 1, 1), "data.image_size": 64,
              "data.synthetic.image_size": 64, "data.synthetic.size": 64},
}
TINY["vilref_remat"] = {**TINY["vilref"], "model.remat": True}


def transformer_flops(tokens: int, width: int, layers: int, mlp: int, batch: int) -> float:
    """Forward FLOPs of a pre-/post-LN transformer stack: per layer and token the QKV and output
    projections (4 w^2), the MLP (2 w mlp) and the two attention products (2 tokens w), each
    multiply-add 2 FLOPs."""
    per_token = 4 * width * width + 2 * width * mlp + 2 * tokens * width
    return 2.0 * batch * tokens * layers * per_token


def model_flops(config) -> float | None:
    """Model FLOPs of one train step of a ViT + BERT config (None for convolutional towers)."""
    m, b = config.model, config.data.batch_size
    if m.img.name != "vit":
        return None
    v, t = m.img.vit, m.txt
    patches = (config.data.image_size // v.patch_size) ** 2
    image = transformer_flops(patches + 1, v.width, v.layers, v.mlp_dim, b) + 2.0 * b * patches * 3 * v.patch_size ** 2 * v.width
    text = transformer_flops(config.text.max_len, t.hidden_size, t.num_hidden_layers, t.intermediate_size, b)
    forward = image + text
    # Online forward + backward (x3), and the momentum model's forward (ViLReF, ALBEF).
    return forward * (3 + (1 if config.momentum.enabled else 0))


def measure(name: str, spec: str, fields: dict, steps: int, warmup: int, peak_tflops: float, vocab) -> dict:
    import jax
    with tempfile.TemporaryDirectory() as workdir:
        config, trainer, state, batch, _ = build(spec, fields, workdir, vocab)
        compiled = trainer.train_step.lower(state, batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        memory = compiled.memory_analysis()
        state, metrics, step_s = median_step(trainer, state, batch, steps, warmup)
        stats = jax.devices()[0].memory_stats() or {}
    xla_flops, flops = float(cost.get("flops", 0.0)), model_flops(config)
    used = flops if flops is not None else xla_flops
    row = {"case": name, "batch": config.data.batch_size, "image_size": config.data.image_size,
           "compute_dtype": config.model.compute_dtype, "remat": bool(config.model.remat), "step_s": step_s,
           "examples_per_s": config.data.batch_size / step_s, "xla_flops": xla_flops, "model_flops": flops,
           "mfu": used / (step_s * peak_tflops * 1e12), "mfu_flops": "model" if flops is not None else "xla",
           "loss": float(metrics["train/loss"]),
           "argument_bytes": getattr(memory, "argument_size_in_bytes", None),
           "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
           "peak_bytes_in_use": stats.get("peak_bytes_in_use")}
    print(f"{name}: step {step_s * 1e3:.1f} ms ({row['examples_per_s']:.0f} examples/s), "
          f"{used / 1e12:.2f} TFLOP/step ({row['mfu_flops']}), MFU {100 * row['mfu']:.1f} % of {peak_tflops:g} TFLOPS, "
          f"temp {_gib(row['temp_bytes'])}, peak {_gib(row['peak_bytes_in_use'])}", flush=True)
    return row


def open_clip_step(batch: int, steps: int, warmup: int) -> dict:
    """open_clip's ViT-B-16 training step: bf16 autocast, AdamW, its CLIP loss."""
    try:
        import open_clip
        import torch
    except ImportError as e:
        print(f"open_clip: not run ({e})", flush=True)
        return {"case": "open_clip", "not_run": f"{type(e).__name__}: {e}"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = open_clip.create_model("ViT-B-16").to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss_fn = open_clip.ClipLoss()
    images = torch.randn(batch, 3, 224, 224, device=device)
    texts = torch.randint(0, 49408, (batch, 77), device=device)
    times = []
    for i in range(warmup + steps):
        began = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            img, txt, scale = model(images, texts)
            loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    step_s = statistics.median(times[warmup:])
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    print(f"open_clip ViT-B-16: step {step_s * 1e3:.1f} ms ({batch / step_s:.0f} examples/s), peak {_gib(peak)}",
          flush=True)
    return {"case": "open_clip", "batch": batch, "step_s": step_s, "examples_per_s": batch / step_s,
            "peak_bytes_in_use": peak}


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2 ** 30:.2f} GiB"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join([*CASES, "open_clip"]))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak_tflops", type=float, default=H200_BF16_TFLOPS)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: check the logic on a CPU")
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args(argv)
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES and n != "open_clip"]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; known: {', '.join([*CASES, 'open_clip'])}")
    from absl import flags
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    import jax
    report = {"devices": [str(d) for d in jax.devices()], "jax": jax.__version__, "peak_tflops": args.peak_tflops,
              "date": time.strftime("%Y-%m-%d"), "tiny": args.tiny, "cases": []}
    for name in names:
        if name == "open_clip":
            vilref_batch = (TINY["vilref"] if args.tiny else {}).get("data.batch_size", 256)
            report["cases"].append(open_clip_step(vilref_batch, args.steps, args.warmup))
            continue
        spec, fields = CASES[name]
        fields = {**fields, **TINY[name]} if args.tiny else fields
        report["cases"].append(measure(name, spec, fields, args.steps, args.warmup, args.peak_tflops,
                                       None if args.tiny else PAPER_VOCAB))
    ours, theirs = ({r["case"]: r for r in report["cases"]}.get(k) for k in ("vilref", "open_clip"))
    if ours and theirs and "step_s" in theirs:
        report["vilref_over_open_clip"] = ours["step_s"] / theirs["step_s"]
        print(f"ViLReF step / open_clip ViT-B-16 step: {report['vilref_over_open_clip']:.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
