r"""KeepFIT (MM-Retinal, MICCAI 2024; docs/methods.md, "KeepFIT"): FLAIR plus an expert image-caption stream.

Every step trains on one public batch (FLAIR's categorical prompts, FLAIR's loss) and one expert
batch (image + caption pairs drawn uniformly with replacement, no augmentation, captions as they
are) through the same towers:

  loss = L_pub + mm_weight * L_mm + rev_weight * L_rev
  L_mm  = CLIP loss of the expert pairs
  L_rev = mean((txt - knowledge(q=img, k=kimg, v=ktxt)) ** 2)   # image-similarity-guided text revision

Paper settings on top of FLAIR's (configs/flair.py): 24 public + 24 expert pairs per step on the
original's one GPU (`data.batch_size`, `data.expert.batch_size` are global batches), AdamW lr 1e-4,
wd 1e-5, text length 256, the knowledge attention (2 heads, dropout 0.5, softmax over the HEADS
axis: the original's quirk; `model.knowledge.softmax_axis=keys` is textbook attention), weights 1
and 100. Without a data path the expert pairs are the synthetic corpus's expert captions (a
separate corpus of 2,169 examples, MM-Retinal's CFP count).

  python -m retina_jax.main --config configs/keepfit.py --workdir /tmp/keepfit
  python -m retina_jax.main --config configs/keepfit.py:demo --workdir workdirs/keepfit_demo
  python -m retina_jax.main --config configs/keepfit.py:demo,ablation=revision_only ...

`ablation`: 'none' (KeepFIT), 'revision_only' (L_pub + 1 * L_rev) or 'mixed_only' (L_pub + L_mm,
no knowledge attention): the paper's ablation rows.
"""
from configs import common, flair

ABLATIONS = {
    "none": {"mm_weight": 1.0, "rev_weight": 100.0, "knowledge": True},
    "revision_only": {"mm_weight": 0.0, "rev_weight": 1.0, "knowledge": True},
    "mixed_only": {"mm_weight": 1.0, "rev_weight": 0.0, "knowledge": False},
}


def get_config(arg=None):
    arg = common.parse_arg(arg, demo=False, steps_scale=1.0, ablation="none")
    if arg.ablation not in ABLATIONS:
        raise ValueError(f"unknown KeepFIT ablation {arg.ablation!r}; known: {sorted(ABLATIONS)}")
    c = flair.get_config(f"demo,steps_scale={arg.steps_scale}" if arg.demo else None)
    c.method = "keepfit"
    ablation = ABLATIONS[arg.ablation]

    c.data.batch_size = 24
    c.data.expert.enabled = True
    c.data.expert.batch_size = 24
    c.text.max_len = 256
    c.optim.lr = 1e-4
    c.optim.weight_decay = 1e-5
    c.model.knowledge.enabled = ablation["knowledge"]
    c.model.knowledge.heads = 2
    c.model.knowledge.dropout = 0.5
    c.model.knowledge.softmax_axis = "heads"
    c.loss.keepfit.mm_weight = ablation["mm_weight"]
    c.loss.keepfit.rev_weight = ablation["rev_weight"]
    if not arg.demo:
        return c

    # CPU demo: FLAIR's demo towers and schedule (configs/flair.py:demo) with a 1:1 expert batch
    # as KeepFIT's 24 + 24, on 1,024 synthetic expert pairs.
    c.data.batch_size = 64
    c.data.expert.batch_size = 64
    c.data.expert.size = 1024
    c.text.max_len = 64
    c.optim.lr = 1e-3
    return c
