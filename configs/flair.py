r"""FLAIR pretraining (Silva-Rodriguez et al., MedIA 2024; docs/methods.md, "FLAIR").

Paper settings: ResNet-50 + BERT-base (Bio_ClinicalBERT layout), 512 px, global batch 128,
AdamW lr 1e-4 wd 1e-5, 1 warm-up epoch, cosine with a 100-epoch horizon while training 15 epochs.

  python -m retina_jax.main --config configs/flair.py --workdir /tmp/flair
  python -m retina_jax.main --config configs/flair.py:demo --workdir /tmp/flair_demo

`:demo` trains tiny towers on the embedded synthetic corpus on a CPU in a few minutes and reports
zero-shot figures on the held-out synthetic task (benchmarks/RESULTS.md records what it reaches).
"""
from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, demo=False, steps_scale=1.0)
    c = common.get_config()
    c.method = "flair"
    if not arg.demo:
        return c

    # CPU demo: tiny towers at 96 px; every other setting keeps its FLAIR value unless it must
    # shrink for a 2-core machine (epochs, corpus size, batch, vocabulary).
    common.cpu_demo(c)
    c.text.vocab_size = 1500
    c.text.vocab_corpus_size = 500
    c.text.max_len = 32
    c.model.img.depth = 50
    c.model.img.width = 16
    c.model.img.stage_sizes = (1, 1, 1, 1)
    c.model.txt.max_position_embeddings = 64
    c.optim.warmup_epochs = 1.0
    c.optim.schedule_epochs = 8.0 * arg.steps_scale
    c.train.epochs = 8.0 * arg.steps_scale
    return c
