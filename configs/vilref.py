r"""ViLReF pretraining (Yang et al., 2024; docs/methods.md, "ViLReF"), in two stages.

Stage `clip` (`:stage=clip`) is the pretrained start ViLReF assumes: ViLReF trains from Chinese-CLIP
weights (its released train.sh resumes `clip_cn_vit-b-16.pt`), so this stage trains the same towers
with plain CLIP InfoNCE on the image-report pairs (no labels, no momentum model, no queue): a
Chinese-CLIP stand-in on the same data. Stage `vilref` (the default) is the paper's method from that
start (`model_init`, with its vocabulary): WSCL with momentum encoders and the queue, at ViLReF's
lower learning rate.

Paper settings (stage `vilref`): CLIP-layout ViT-B/16 at 224 px + Chinese RoBERTa-wwm-ext-base
([CLS] pooling, linear projections to 512, context 100), global batch 256, WSCL with momentum
encoders (m 0.995) and a 65,536-entry queue, AdamW lr 3e-5 betas (0.9, 0.98) eps 1e-6 wd 0.001
(biases, norms, 1-d params and logit_scale excluded, as Chinese-CLIP), 100 warm-up steps then
cosine to 0 over 20 epochs; RandomResizedCrop(scale 0.9-1), flip and colour jitter 0.1; CLIP
mean/std. The real start is a converted Chinese-CLIP checkpoint (README, "Pretrained checkpoints"):

  python -m retina_jax.convert --from vilref clip_cn_vit-b-16.pt --tokenizer chinese-roberta-wwm-ext/ \
      --out ckpt/chinese_clip
  python -m retina_jax.main --config configs/vilref.py:clip_workdir=ckpt/chinese_clip --workdir /ckpt/vilref
  python -m retina_jax.main --config configs/vilref.py:rn50,clip_workdir=ckpt/chinese_clip_rn50 ...

or, without one, stage `clip` on your own data first (`:stage=clip` into a workdir, then
`:clip_workdir=<that workdir>`). With no data path both stages train on the synthetic corpus's
Chinese reports, labelled by the expert keyword extractor. Without `text.tokenizer` stage `clip`
learns a character-level Chinese vocabulary from the corpus (Chinese characters are one token
each, as RoBERTa-wwm-ext's BERT tokenizer splits them) and stage `vilref` reuses it.

The CPU demo (`make demo`, about 12 minutes on 2 cores with the install) runs both stages on tiny towers:

  python -m retina_jax.main --config configs/vilref.py:stage=clip,demo --workdir workdirs/vilref_clip_demo
  python -m retina_jax.main --config configs/vilref.py:demo --workdir workdirs/vilref_demo

`seed=N` sets the run's seed (initialisation, data order, augmentation; benchmarks/RESULTS.md
reports the demo over seeds 0-2); `steps_scale` scales the demo's epochs. `:rn50` swaps in CLIP's
ModifiedResNet-50 (1024-d attention-pool output used directly as the embedding, as Chinese-CLIP RN50).
"""
from configs import common

# Chinese-CLIP's weight-decay exclusion: `p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or
# "logit_scale" in n`, as regexes over param paths (the 1-d params are biases, norm scales and the
# ViT class embedding).
WD_EXCLUDE = (r"bias$", r"scale$", r"class_embedding$", r"(^|/)(bn|ln)")
ZH_TEMPLATES = ("诊断：{}。", "眼底彩照：{}。", "{}")
STAGES = ("clip", "vilref")
DEMO_CLIP_WORKDIR = "workdirs/vilref_clip_demo"


# The demo's stage lengths and stage-`vilref` settings (benchmarks/RESULTS.md, "ViLReF demo").
DEMO_CLIP_EPOCHS = 6.0
DEMO_VILREF_EPOCHS = 3.0
DEMO_VILREF_LR = 3e-4
DEMO_MOMENTUM = 0.995


def get_config(arg=None):
    arg = common.parse_arg(arg, stage="vilref", demo=False, rn50=False, steps_scale=1.0, seed=0, clip_workdir="")
    if arg.stage not in STAGES:
        raise ValueError(f"configs/vilref.py: stage={arg.stage!r}; allowed: {', '.join(STAGES)}")
    c = common.get_config()
    c.method = "vilref"
    c.seed = arg.seed

    # Data: image + Chinese report + labels extracted from the report.
    c.data.stream = "reports"
    c.data.reports.language = "zh"
    c.data.reports.labels = "extract"
    c.data.reports.drop_chars = 0  # ViLReF's original: 3 (an eye-side prefix the synthetic reports lack)
    c.data.batch_size = 256
    c.data.image_size = 224
    c.data.preprocess = "clip"
    c.data.augment.kind = "vilref"
    c.data.augment.hflip_p = 0.5
    c.data.augment.affine_p = 0.0
    c.data.augment.crop_scale = (0.9, 1.0)
    c.data.augment.jitter_p = 1.0
    c.data.augment.brightness = 0.1
    c.data.augment.contrast = 0.1
    c.data.augment.saturation = 0.1

    c.text.max_len = 100
    c.text.lowercase = True  # chinese-roberta-wwm-ext: do_lower_case
    c.text.vocab_size = 3000

    # Model: ViT-B/16 + RoBERTa-wwm-ext-base (BERT layout, no pooler, [CLS] pooling).
    c.model.embed_dim = 512
    c.model.img.name = "vit"
    c.model.img_projection = "linear"
    c.model.txt_projection = "linear"
    c.model.txt.pooling = "cls"
    c.model.txt.add_pooler = False
    c.model.txt.layer_norm_eps = 1e-12
    c.model.logit_scale_clamp = "after_step"
    c.model.logit_scale_reset = True

    c.loss.name = "wscl"
    c.loss.wscl.coupling = "similarity"
    c.loss.wscl.alpha = 0.0
    c.momentum.enabled = True
    c.momentum.decay = 0.995
    c.momentum.queue_size = 65_536
    c.momentum.key_features = "momentum"

    c.optim.lr = 3e-5  # the released 1e-2 is implausible (docs/methods.md, "ViLReF")
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.001
    c.optim.wd_exclude = WD_EXCLUDE
    c.optim.grad_clip = 0.0
    c.optim.warmup_steps = 100
    c.optim.schedule_epochs = 20.0
    c.train.epochs = 20.0

    c.prompts.language = "zh"
    c.prompts.templates = ZH_TEMPLATES
    c.evals.multilabel_linear_probe.at_end = True

    if arg.rn50:
        c.model.img.name = "clip_resnet"
        c.model.embed_dim = 1024
        c.model.img_projection = "none"
    if arg.demo:
        _demo(c, arg)
    return _clip_stage(c, arg) if arg.stage == "clip" else _vilref_stage(c, arg)


def _clip_stage(c, arg):
    """The Chinese-CLIP stand-in: the same towers, data and optimizer, CLIP InfoNCE on the pairs."""
    if not arg.demo:
        c.optim.lr = 1e-4  # ours: a start trained from scratch needs a rate above ViLReF's fine-tuning 3e-5
    c.loss.name = "clip"
    c.momentum.enabled = False
    c.momentum.key_features = "online"
    c.momentum.queue_size = 0
    c.model.logit_scale_reset = False  # a run from scratch starts at the initial value anyway
    return c


def _vilref_stage(c, arg):
    """ViLReF from the stage-`clip` (or converted Chinese-CLIP) start, with its vocabulary."""
    clip_workdir = arg.clip_workdir or (DEMO_CLIP_WORKDIR if arg.demo else "")
    if clip_workdir:
        c.model_init = clip_workdir
        c.text.tokenizer = f"{clip_workdir}/tokenizer"
    return c


def _demo(c, arg):
    """CPU demo: tiny towers at 96 px and a small corpus; WSCL, the extracted labels, the
    augmentations and the logit_scale quirks are the paper's."""
    common.cpu_demo(c)
    c.data.reports.coverage_size = 4096
    c.text.vocab_corpus_size = 1000
    c.model.img.name = "clip_resnet"
    c.model.img.clip_resnet.layers = (1, 1, 1, 1)
    c.model.img.clip_resnet.width = 16
    c.model.img.clip_resnet.heads = 4
    c.model.img.clip_resnet.output_dim = 128
    c.model.img_projection = "linear"
    c.model.txt.max_position_embeddings = 128
    c.heldout.findings.train_size = 1000
    c.heldout.findings.test_size = 500
    epochs = (DEMO_CLIP_EPOCHS if arg.stage == "clip" else DEMO_VILREF_EPOCHS) * arg.steps_scale
    c.optim.schedule_epochs = epochs
    c.train.epochs = epochs
    c.optim.warmup_steps = 32
    if arg.stage == "vilref":
        # ViLReF's relative settings on the pretrained start: a learning rate below the start's
        # (ViLReF fine-tunes Chinese-CLIP at 3e-5), the paper's momentum, a queue of 1/8 of the
        # 4,096 images (the paper's is 0.145 of its pairs).
        c.optim.lr = DEMO_VILREF_LR
        c.optim.warmup_steps = 16
        c.momentum.decay = DEMO_MOMENTUM
        c.momentum.queue_size = 512
