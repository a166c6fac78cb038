"""The whole train step of retina_jax against PyTorch eager on the same architecture (issue 19).

One process builds both sides of each case and times them alternately (JAX step, PyTorch step,
JAX step, ...), so the machine's state is the same for both; the figure is the ratio of the medians
of `--steps` timed steps after `--warmup` untimed ones (the JAX side's compilation is in the
warm-up). Both sides run on the CPU with the same number of threads (XLA's CPU client uses one per
core; `torch.set_num_threads` is set to the same count).

- retina_jax: `Trainer(config).train_step` exactly as a run calls it, on a batch drawn from the run's
  own input pipeline (both towers, projections, the method's loss and its logged statistics, AdamW,
  and for ViLReF the EMA update, the momentum forward and the queue).
- PyTorch: the same towers (tests/torch_references.py: torchvision's ResNet layout, CLIP's
  ModifiedResNet and ViT, each checked against ours to 1e-4 by the parity tests) and transformers'
  `BertModel`, the same projection heads and loss written here in torch, `torch.optim.AdamW` with
  the config's settings, gradient clipping when the config clips. For ViLReF an ALBEF-style momentum
  copy (`torch._foreach_lerp_`), its forward in train mode and the same ring-buffer queue.
  open_clip's models need torchvision, whose CPU build for the pinned torch is not installable
  here, so the CLIP towers come from our references, laid out as open_clip's.

Both sides must hold the same number of trainable parameters; a case whose counts differ stops
with an error (it would not be the same architecture).

    python benchmarks/step_speed.py                       # every case
    python benchmarks/step_speed.py --cases flair_demo --steps 7
    XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/step_speed.py --cases flair_demo --jax-only
    python benchmarks/step_speed.py --cases vilref_clip_demo --variant model.txt.hidden_dropout_prob=0.0

`--variant FIELD=VALUE,...` times the JAX step of each case against the same case with those config
fields set, both compiled in one process and alternated: what one setting costs in the step.

Cases: `flair_demo` and `vilref_demo` (the demos' models at their batch 64), `vilref_clip_demo`
(ViLReF stage `clip`), `rn50_bert` (FLAIR's ResNet-50 + BERT-base, 224 px, batch 8) and
`vitb16_bert` (ViLReF's ViT-B/16 + BERT-base, CLIP InfoNCE, 224 px, batch 8). The paper-size cases
use a 30,522-entry vocabulary (BERT-base's) on both sides.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))  # torch_references

PAPER_VOCAB = 30_522
CASES = {
    "flair_demo": ("configs/flair.py:demo", {}),
    "vilref_clip_demo": ("configs/vilref.py:stage=clip,demo", {}),
    "vilref_demo": ("configs/vilref.py:demo", {"model_init": "", "text.tokenizer": "learn"}),
    "rn50_bert": ("configs/flair.py", {"data.batch_size": 8, "data.image_size": 224,
                                       "data.synthetic.image_size": 224, "text.max_len": 77}),
    "vitb16_bert": ("configs/vilref.py:stage=clip", {"data.batch_size": 8, "data.image_size": 224,
                                                     "data.synthetic.image_size": 224, "model_init": ""}),
}
PAPER_CASES = ("rn50_bert", "vitb16_bert")


# ------------------------------------------------------------------------------------ retina_jax
def paper_vocabulary(path: str, size: int) -> str:
    """A BERT vocabulary file of `size` entries (the specials, then placeholder words): the paper
    towers' embedding tables and their optimizer state at the real size on both sides."""
    os.makedirs(path, exist_ok=True)
    from retina_jax.data.tokenizer import SPECIAL_TOKENS
    words = list(SPECIAL_TOKENS) + [f"w{i}" for i in range(size - len(SPECIAL_TOKENS))]
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(words) + "\n")
    return path


def jax_side(name: str, workdir: str):
    """(config, trainer, train state, global batch, host batch) of one case."""
    spec, fields = CASES[name]
    return build(spec, fields, workdir, PAPER_VOCAB if name in PAPER_CASES else None)


def build(spec: str, fields: dict, workdir: str, vocab_size: int | None = None):
    """A Trainer for config `spec` with `fields` set, its initial state (after the run-start quirks)
    and one batch of its own input pipeline: (config, trainer, state, global batch, host batch).
    `vocab_size` writes a vocabulary of that size (`paper_vocabulary`) instead of learning one."""
    import jax
    from retina_jax import config as config_lib
    from retina_jax.data import pipeline
    from retina_jax.train import Trainer

    config = config_lib.load(os.path.join(REPO, spec))
    fields = {"data.synthetic.size": max(256, 8 * fields.get("data.batch_size", config.data.batch_size)),
              "train.progress": False, **fields}
    if vocab_size:
        fields["text.tokenizer"] = paper_vocabulary(os.path.join(workdir, "vocab"), vocab_size)
    if config.momentum.queue_size or fields.get("momentum.queue_size"):
        fields["momentum.queue_max_fraction"] = 1.0  # one batch is drawn: the corpus's size is immaterial
    config_lib.override(config, fields)
    trainer = Trainer(config, workdir)
    host_batch = next(iter(trainer.method.train_iter()))
    batch = pipeline.make_global(host_batch, trainer.batch_sharding)
    state = trainer.init_state()
    state = trainer.method.on_run_start(state, trainer.replicated)
    jax.block_until_ready(state)
    return config, trainer, state, batch, host_batch


def count(tree) -> int:
    import jax
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


# ------------------------------------------------------------------------------------ PyTorch
def torch_model(config, vocab_size: int):
    """The two-tower model of `config.model` in PyTorch (the module docstring)."""
    import torch
    import transformers
    from torch import nn
    from torch_references import (TorchBottleneck, TorchModifiedResNet, TorchResNet,
                                  TorchVisionTransformer)

    m = config.model
    if m.img.name == "resnet":
        if m.img.depth < 50:
            raise SystemExit("step_speed: only the bottleneck ResNets (depth >= 50) are benchmarked")
        stages = tuple(m.img.stage_sizes) or {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[m.img.depth]
        img = TorchResNet(TorchBottleneck, stages, m.img.width, base_width=m.img.width_per_group)
        img_dim = m.img.width * 8 * 4
    elif m.img.name == "clip_resnet":
        c = m.img.clip_resnet
        img = TorchModifiedResNet(tuple(c.layers), c.output_dim, c.heads, config.data.image_size, c.width)
        img_dim = c.output_dim
    else:
        c = m.img.vit
        img = TorchVisionTransformer(config.data.image_size, c.patch_size, c.width, c.layers, c.heads)
        img_dim = c.width
    t = m.txt
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads, intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings, type_vocab_size=t.type_vocab_size,
        layer_norm_eps=t.layer_norm_eps, hidden_dropout_prob=t.hidden_dropout_prob,
        attention_probs_dropout_prob=t.attention_probs_dropout_prob), add_pooling_layer=t.add_pooler)

    def head(kind, dim):
        return None if kind == "none" else nn.Linear(dim, m.embed_dim, bias=False)

    class TwoTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.img, self.txt = img, bert
            self.img_proj, self.txt_proj = head(m.img_projection, img_dim), head(m.txt_projection, t.hidden_size)
            self.logit_scale = nn.Parameter(torch.tensor(float(m.logit_scale_init)))

        @staticmethod
        def project(x, proj, kind):
            if kind == "flair":  # FLAIR normalises before projecting too
                x = nn.functional.normalize(x, dim=-1)
            if proj is not None:
                x = proj(x)
            return nn.functional.normalize(x, dim=-1)

        def text_features(self, ids, mask):
            out = self.txt(input_ids=ids, attention_mask=mask, output_hidden_states=t.pooling == "flair")
            if t.pooling == "cls":
                return out.last_hidden_state[:, 0]
            if t.pooling == "masked_mean":
                w = mask.unsqueeze(-1).float()
                return (out.last_hidden_state * w).sum(1) / w.sum(1).clamp(min=1)
            hs = out.hidden_states  # FLAIR: mean over the batch's longest length of layers 1, 2, last
            length = int(mask.sum(1).max())
            return torch.stack([hs[1], hs[2], hs[-1]])[:, :, :length].mean(2).mean(0)

        def forward(self, image, ids, mask):
            zimg = self.project(self.img(image), self.img_proj, m.img_projection)
            ztxt = self.project(self.text_features(ids, mask), self.txt_proj, m.txt_projection)
            return zimg, ztxt

    return TwoTower()


def torch_losses():
    import torch
    import torch.nn.functional as F

    def logits(zimg, ztxt, logit_scale):
        scale = logit_scale.clamp(0, np.log(100.0)).exp()
        return scale * ztxt @ zimg.T, scale * zimg @ ztxt.T

    def clip(zimg, ztxt, logit_scale, batch):
        t2i, i2t = logits(zimg, ztxt, logit_scale)
        target = torch.arange(len(zimg))
        return 0.5 * (F.cross_entropy(t2i, target) + F.cross_entropy(i2t, target))

    def flair(zimg, ztxt, logit_scale, batch):
        cat = batch["category_id"]
        same = (cat[:, None] == cat[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        t2i, i2t = logits(zimg, ztxt, logit_scale)
        return 0.5 * (F.cross_entropy(t2i, target) + F.cross_entropy(i2t, target))

    def wscl(zimg, ztxt, logit_scale, batch, keys_img, keys_txt, key_labels, valid):
        """ViLReF's WSCL ('similarity' coupling): negatives scaled by 1 - cos(labels), false
        negatives and empty queue slots dropped (retina_jax.losses.wscl_loss)."""
        scale = logit_scale.clamp(0, np.log(100.0)).exp()
        y, yk = batch["labels"].float(), key_labels.float()
        denom = y.norm(dim=1)[:, None] * yk.norm(dim=1)[None, :]
        label_sim = torch.where(denom > 0, y @ yk.T / denom.clamp(min=1e-12), torch.zeros_like(denom))
        b, k = label_sim.shape
        pos = torch.arange(k)[None, :] == torch.arange(b)[:, None]
        drop = ((label_sim >= 1 - 1e-6) & ~pos) | ~valid[None, :]
        weight = torch.where(pos, torch.ones_like(label_sim), 1 - label_sim)
        target = torch.arange(b)

        def direction(queries, keys):
            z = (scale * (weight * (queries @ keys.T))).masked_fill(drop, -1e9)
            return F.cross_entropy(z, target)

        return 0.5 * (direction(zimg, keys_txt) + direction(ztxt, keys_img))

    return {"clip": clip, "flair": flair, "wscl": wscl}


class TorchStep:
    """One training step of `config`'s method in PyTorch eager."""

    def __init__(self, config, vocab_size: int, host_batch: dict):
        import torch
        self.torch = torch
        self.config = config
        self.model = torch_model(config, vocab_size).train()
        o = config.optim
        # Weight decay on the matrices, not on biases, norms and the temperature (the split's exact
        # rule changes which tensors decay, not the step's cost).
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
        self.loss_fn = torch_losses()[config.loss.name]
        m = config.momentum
        self.momentum = copy.deepcopy(self.model) if m.enabled else None
        if m.queue_size:
            d, c = config.model.embed_dim, host_batch["labels"].shape[1]
            self.queue = {"img": torch.zeros(m.queue_size, d), "txt": torch.zeros(m.queue_size, d),
                          "labels": torch.zeros(m.queue_size, c), "valid": torch.zeros(m.queue_size, dtype=torch.bool)}
            self.ptr = 0
        self.batch = self.to_torch(host_batch)

    def to_torch(self, batch: dict) -> dict:
        t = self.torch
        out = {"image": t.from_numpy(np.ascontiguousarray(np.transpose(batch["image"], (0, 3, 1, 2)))),
               "input_ids": t.from_numpy(np.asarray(batch["input_ids"], np.int64)),
               "attention_mask": t.from_numpy(np.asarray(batch["attention_mask"], np.int64))}
        for key in ("category_id", "labels"):
            if key in batch:
                out[key] = t.from_numpy(np.asarray(batch[key]))
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def __call__(self) -> float:
        torch, b, m = self.torch, self.batch, self.config.momentum
        if self.config.model.logit_scale_clamp == "before_forward":
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, np.log(100.0))
        zimg, ztxt = self.model(b["image"], b["input_ids"], b["attention_mask"])
        extra = ()
        if self.config.loss.name == "wscl":
            with torch.no_grad():
                if self.momentum is None:
                    kimg, ktxt = zimg.detach(), ztxt.detach()
                else:  # ALBEF: EMA from the current online weights, then the momentum model's keys
                    torch._foreach_lerp_(list(self.momentum.parameters()), list(self.model.parameters()),
                                         1 - m.decay)
                    kimg, ktxt = self.momentum(b["image"], b["input_ids"], b["attention_mask"])
            batch_keys = (kimg, ktxt)
            key_labels, valid = b["labels"].float(), torch.ones(len(kimg), dtype=torch.bool)
            if m.queue_size:
                q = self.queue
                kimg, ktxt = torch.cat([kimg, q["img"]]), torch.cat([ktxt, q["txt"]])
                key_labels, valid = torch.cat([key_labels, q["labels"]]), torch.cat([valid, q["valid"]])
            extra = (kimg, ktxt, key_labels, valid)
        loss = self.loss_fn(zimg, ztxt, self.model.logit_scale, b, *extra)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.opt.step()
        with torch.no_grad():
            if self.config.model.logit_scale_clamp == "after_step":
                self.model.logit_scale.clamp_(0, np.log(100.0))
            if m.queue_size:
                s = slice(self.ptr, self.ptr + len(zimg))
                self.queue["img"][s], self.queue["txt"][s] = batch_keys
                self.queue["labels"][s], self.queue["valid"][s] = b["labels"].float(), True
                self.ptr = (self.ptr + len(zimg)) % m.queue_size
        return float(loss.detach())


# ------------------------------------------------------------------------------------ timing
def timed_step(trainer, state, batch):
    """(state, metrics, seconds) of one `Trainer.train_step`, waited for to its end."""
    import jax
    began = time.perf_counter()
    state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready((state, metrics))
    return state, metrics, time.perf_counter() - began


def median_step(trainer, state, batch, steps: int, warmup: int):
    """(state, metrics, median seconds of `steps` steps after `warmup` untimed ones)."""
    times = []
    for _ in range(warmup + steps):
        state, metrics, seconds = timed_step(trainer, state, batch)
        times.append(seconds)
    return state, metrics, statistics.median(times[warmup:])


def run_case(name: str, steps: int, warmup: int, jax_only: bool = False) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as workdir:
        config, trainer, state, batch, host_batch = jax_side(name, workdir)
        if jax_only:  # e.g. to compare XLA_FLAGS settings: the JAX side alone
            _, _, jax_s = median_step(trainer, state, batch, steps, warmup)
            print(f"{name}: retina_jax {jax_s:.3f} s (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})", flush=True)
            return {"case": name, "jax_s": jax_s}
        step = TorchStep(config, trainer.tokenize.vocab_size, host_batch)
        n_jax = count(state.params)
        n_torch = step.num_params()
        if n_jax != n_torch:
            raise SystemExit(f"step_speed {name}: {n_jax} parameters in retina_jax, {n_torch} in PyTorch: not the "
                             "same architecture")
        times = {"jax": [], "torch": []}
        for i in range(warmup + steps):
            state, _, t_jax = timed_step(trainer, state, batch)
            began = time.perf_counter()
            step()
            t_torch = time.perf_counter() - began
            if i >= warmup:
                times["jax"].append(t_jax)
                times["torch"].append(t_torch)
        jax_s, torch_s = statistics.median(times["jax"]), statistics.median(times["torch"])
        row = {"case": name, "params": n_jax, "batch": config.data.batch_size, "image": config.data.image_size,
               "jax_s": jax_s, "torch_s": torch_s, "ratio": jax_s / torch_s,
               "ratios": [a / b for a, b in zip(times["jax"], times["torch"])], "threads": torch.get_num_threads()}
        print(f"{name}: {n_jax / 1e6:.1f} M params, batch {row['batch']} at {row['image']} px: retina_jax "
              f"{jax_s:.3f} s, PyTorch {torch_s:.3f} s, ratio {row['ratio']:.2f} (per pair "
              f"{min(row['ratios']):.2f}-{max(row['ratios']):.2f}), {row['threads']} threads", flush=True)
        return row


def run_variant(name: str, fields: dict, steps: int, warmup: int) -> dict:
    """The case's JAX step against the same case with `fields` set, alternated in one process."""
    spec, base = CASES[name]
    vocab = PAPER_VOCAB if name in PAPER_CASES else None
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        sides = {"case": list(build(spec, base, a, vocab)), "variant": list(build(spec, {**base, **fields}, b, vocab))}
        times = {k: [] for k in sides}
        for i in range(warmup + steps):
            for k, side in sides.items():
                side[2], _, seconds = timed_step(side[1], side[2], side[3])
                if i >= warmup:
                    times[k].append(seconds)
    case_s, variant_s = (statistics.median(times[k]) for k in sides)
    ratios = [v / c for c, v in zip(times["case"], times["variant"])]
    print(f"{name}: {case_s:.3f} s, with {fields}: {variant_s:.3f} s, ratio {variant_s / case_s:.3f} "
          f"(per pair {min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    return {"case": name, "case_s": case_s, "variant_s": variant_s, "ratios": ratios}


def parse_fields(text: str) -> dict:
    """'a.b=0.0,c=learn' -> {'a.b': 0.0, 'c': 'learn'} (Python literals, else strings)."""
    import ast
    fields = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"step_speed --variant: {item!r} is not FIELD=VALUE")
        try:
            fields[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            fields[key] = value
    return fields


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, from " + ", ".join(CASES))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (>= 5 for RESULTS.md)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (JAX compiles here)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch threads (XLA uses every core)")
    parser.add_argument("--jax-only", action="store_true", help="time retina_jax's step alone (no PyTorch side)")
    parser.add_argument("--variant", default="", help="FIELD=VALUE,...: the JAX step against the case with these set")
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; known: {', '.join(CASES)}")
    import torch
    from absl import flags
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.variant:
        fields = parse_fields(args.variant)
        return [run_variant(name, fields, args.steps, args.warmup) for name in args.cases.split(",")]
    return [run_case(name, args.steps, args.warmup, args.jax_only) for name in args.cases.split(",")]


if __name__ == "__main__":
    main()
