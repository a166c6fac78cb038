r"""KeepFIT V2 (MM-Retinal V2, 2025; docs/methods.md, "KeepFIT V2"): two stages on KeepFIT.

Stage `text` (`:stage=text`): whole-word masked language modelling of the text tower alone on a
plain-text corpus (MM-Retinal-Text's role: the synthetic reports and expert captions, or
`--config.mlm.corpus=/path/to/txt_folder`): mask 15%, 112 tokens, AdamW 1e-5, betas (0.9, 0.95),
wd 0.05.

Stage `vl` (`:stage=vl`): KeepFIT (configs/keepfit.py: public FLAIR stream + expert pairs,
L_pub + L_mm + 100 L_rev) plus `gen_weight * L_cap`, the caption loss of a CoCa-style decoder over
the image tower's spatial tokens, on an expert set of CFP, FFA and OCT pairs in MM-Retinal V2's
proportions (2,169 / 1,947 / 233). The public prompts name the modality ("A [ATR] fundus
photograph of [CLS]"). It starts from stage `text`'s encoder only (`model_init_trees=('txt',)`)
and its vocabulary (`text.tokenizer`), found in `text_workdir`; the held-out captions are
scored with BLEU-1..4, ROUGE-L and CIDEr.

  python -m retina_jax.main --config configs/keepfit_v2.py:stage=text,demo --workdir workdirs/keepfit_v2_text_demo
  python -m retina_jax.main --config configs/keepfit_v2.py:stage=vl,demo --workdir workdirs/keepfit_v2_demo

No code of the paper is public: the text-stage batch (64) and epochs (10), the decoder size (3
layers, width 512, 8 heads, as KeepFIT's report-generation variant) and gen_weight 1 are our
choices, each a config value.
"""
from configs import common, keepfit

STAGES = ("text", "vl")
MM_RETINAL_V2 = {"CFP": 2169, "FFA": 1947, "OCT": 233}


def get_config(arg=None):
    arg = common.parse_arg(arg, stage="", demo=False, steps_scale=1.0, text_workdir="")
    if arg.stage not in STAGES:
        raise ValueError(f"configs/keepfit_v2.py needs :stage=text or :stage=vl, got {arg.stage!r}")
    c = keepfit.get_config(f"demo,steps_scale={arg.steps_scale}" if arg.demo else None)
    c.method = "keepfit_v2"
    c.data.prompt_template = "A {atr} {modality} of {cls}"
    c.data.expert.modalities = tuple(MM_RETINAL_V2)
    c.data.expert.modality_weights = tuple(float(n) for n in MM_RETINAL_V2.values())
    c.data.expert.size = c.data.expert.size if arg.demo else sum(MM_RETINAL_V2.values())
    return _text(c, arg) if arg.stage == "text" else _vl(c, arg)


def _text(c, arg):
    c.mlm.enabled = True
    # The text tower alone: its held-out masked-token accuracy instead of any image evaluation.
    c.evals.zero_shot.at_end = False
    c.evals.mlm_heldout.at_end = True
    c.data.expert.enabled = False
    c.model.knowledge.enabled = False
    c.loss.keepfit.mm_weight = c.loss.keepfit.rev_weight = 0.0
    c.text.max_len = 112
    c.data.batch_size = 64
    c.optim.lr = 1e-5
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 0.05
    c.optim.warmup_epochs = 1.0
    c.optim.schedule_epochs = c.train.epochs = 10.0 * arg.steps_scale
    if arg.demo:
        # From a random tower (the paper continues a pretrained BERT at 1e-5), so a larger rate.
        c.optim.lr = 5e-4
        c.text.max_len = 64  # the demo tower's 64 positions (configs/flair.py:demo)
        c.mlm.heldout_size = 256
        c.heldout.batch_size = 64
    return c


def _vl(c, arg):
    text_workdir = arg.text_workdir or ("workdirs/keepfit_v2_text_demo" if arg.demo else "workdirs/keepfit_v2_text")
    c.model_init = text_workdir
    c.model_init_trees = ("txt",)
    c.text.tokenizer = f"{text_workdir}/tokenizer"
    c.model.decoder.enabled = True
    c.loss.keepfit.gen_weight = 1.0
    c.evals.captions.at_end = True
    if arg.demo:
        c.model.decoder.width = 128
        c.model.decoder.layers = 2
        c.model.decoder.heads = 4
        c.model.decoder.mlp_dim = 512
        c.evals.captions.max_len = 48
    return c
