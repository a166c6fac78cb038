"""Every default of retina_jax lives here; method configs only override.

Code reads `config.x` directly (never `config.get('x', default)`), so a field missing here is an
error at the point of use rather than a silent hidden default. `retina_jax.config.validate` checks
cross-field rules before anything is built.
"""
from __future__ import annotations

import os

import ml_collections

# The held-out zero-shot task of the synthetic corpus: one primary condition per image, drawn with
# seeds the training corpus never uses.
SYNTHETIC_TASK_CLASSES = (
    "normal",
    "diabetic retinopathy",
    "glaucoma",
    "age-related macular degeneration",
    "cataract",
    "pathologic myopia",
)


# Every evaluator type's settings and their defaults (docs/architecture.md, "Evaluators"; the classes
# are in retina_jax/evals/). Besides these, every entry has `type`, `every_steps` and `at_end`.
# Task-based evaluators: `task` '' = the type's held-out synthetic task; a public task of
# retina_jax.evals.tasks reads its images from `evaluate --data_root`. Split fields '' / 0 = the
# protocol's and the task's defaults; `shots_train` may list several values ("1,5,10": a few-shot
# curve); `test_task` names external test tasks (FLAIR's --experiment_test), comma separated.
_SPLITS = dict(task="", test_task="", shots_train="", shots_val="", shots_test="", folds=0)
_ADAPTER = dict(epochs=40, lr=1e-3)  # CLIP-Adapter's and Tip-Adapter-F's (FLAIR's adapters.py)
_TIP = dict(alpha=1.0, beta=5.0, search=False, test_augment=True)  # test_augment: FLAIR's quirk, kept
EVALUATORS = {
    # In-training evaluations on the held-out corpora.
    "zero_shot": {},  # reports under heldout.conditions.name
    "captions": dict(beam_size=1, max_len=64),  # beam_size 1 = greedy
    "mlm_heldout": {},
    # ViLReF's multi-label transfer: the one linear probe (C = 1 / (2 N l2): 0.5 is the former l2 1e-3
    # at 1,000 training images) and the one fine-tune, in training or on demand.
    "multilabel_linear_probe": dict(task="", c=0.5, max_iter=1000),
    "multilabel_finetune": dict(task="", epochs=3, batch_size=32, lr=1e-4, weight_decay=1e-4, grad_clip=0.0, eps=1e-8),
    # FLAIR's transfer protocols (settings of jusiro/FLAIR's transferability code).
    "transfer_zero_shot": dict(_SPLITS),
    "transfer_linear_probe": dict(_SPLITS, c=0.316, max_iter=1000),
    "transfer_clip_adapter": dict(_SPLITS, **_ADAPTER, ratio=0.2),
    "transfer_tip_adapter": dict(_SPLITS, **_TIP),
    "transfer_tip_adapter_f": dict(_SPLITS, **_ADAPTER, **_TIP),
    "transfer_finetune": dict(_SPLITS, epochs=50, lr=1e-4, batch_size=4, patience=10, weight_decay=0.01,
                              grad_clip=1.0, eps=1e-4),  # AdamW's eps: FLAIR's 1e-4
    "transfer_retrieval": dict(task="", size=200),
    "transfer_segmentation": dict(train_size=256, test_size=128, steps=300, lr=1e-3, batch_size=16,
                                  finetune=False),  # finetune False: frozen tower, only the decoder trains
}
TRANSFER_PROTOCOLS = tuple(t for t in EVALUATORS if t.startswith("transfer_"))


def evaluator(type_: str, *, every_steps: int = 0, at_end: bool = False, **settings) -> ml_collections.ConfigDict:
    """A `config.evals` entry of evaluator type `type_` with its default settings, some overridden."""
    if type_ not in EVALUATORS:
        raise ValueError(f"unknown evaluator type {type_!r}; known: {sorted(EVALUATORS)}")
    unknown = sorted(set(settings) - set(EVALUATORS[type_]))
    if unknown:
        raise ValueError(f"evaluator {type_!r} has no settings {unknown}; its settings: {sorted(EVALUATORS[type_])}")
    return ml_collections.ConfigDict({"type": type_, "every_steps": every_steps, "at_end": at_end,
                                      **EVALUATORS[type_], **settings})


def parse_arg(arg: str | None, **defaults):
    """Parse a config argument `a=1,b=x,flag` (big_vision style) into a ConfigDict.

    A bare word sets a boolean flag, so `configs/flair.py:demo` turns on `demo`. Values are cast to
    the type of their default; unknown keys are an error naming them.
    """
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        if not _:
            out[key] = True
            continue
        default = defaults[key]
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif default is None:
            out[key] = value
        else:
            out[key] = type(default)(value)
    return out


def render_cache_dir() -> str:
    """Where the demos keep their drawn corpora: $RETINA_JAX_CACHE/synthetic, default ~/.cache."""
    return os.path.join(os.environ.get("RETINA_JAX_CACHE", "~/.cache/retina_jax"), "synthetic")


def cpu_demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The settings every method's `:demo` shares so it runs in minutes on a 2-core CPU: 96 px
    images, a 4,096-image corpus, batch 64, a 2-layer 128-wide text tower and 128-d embeddings."""
    c.data.batch_size = 64
    c.data.image_size = 96
    c.data.synthetic.image_size = 96
    c.data.synthetic.size = 4096
    c.data.synthetic.cache_dir = render_cache_dir()
    c.model.txt.hidden_size = 128
    c.model.txt.num_hidden_layers = 2
    c.model.txt.num_attention_heads = 2
    c.model.txt.intermediate_size = 512
    c.model.embed_dim = 128
    c.optim.lr = 1e-3
    c.train.log_every = 8
    c.train.checkpoint_every = 128
    c.heldout.batch_size = 100
    return c


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "flair"
    c.seed = 0
    # Resume order: the workdir's own latest checkpoint > `resume` (another run's checkpoint
    # directory, full state and data position) > `model_init` (params and batch_stats only) > scratch.
    c.resume = ""
    c.model_init = ""
    # Top-level param trees `model_init` loads (() = every tree it holds). KeepFIT V2 stage `vl`
    # loads ('txt',): only the text encoder of stage `text`, not its masked-LM head.
    c.model_init_trees = ()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # devices on the `data` axis; -1 = all devices the `fsdp` axis leaves
    # Devices on the `fsdp` axis. The batch is split over data x fsdp; with param_sharding='fsdp'
    # each large parameter (and its optimizer state and EMA copy) is split over this axis
    # (retina_jax/sharding.py). Keep it within one host: its all-gathers run every layer.
    c.mesh.fsdp = 1
    c.mesh.param_sharding = "replicate"  # 'replicate' | 'fsdp'
    c.mesh.fsdp_min_size = 2 ** 14  # tensors with fewer elements stay replicated under 'fsdp'

    # ----------------------------------------------------------------------------------- data
    c.data = ml_collections.ConfigDict()
    # 'synthetic' (the embedded corpus, `data.synthetic`) or 'files': the datasets of
    # `data.datasets`, name -> ConfigDict(format=flair_csv|mmretinal_csv|vilref_lmdb|jsonl|arrayrecord,
    # path=..., image_root=..., weight=1.0), e.g. in a config file:
    #   c.data.datasets.eyepacs = ml_collections.ConfigDict(dict(format="flair_csv",
    #       path="/data/dataframes/EYEPACS.csv", image_root="/data/images", weight=1.0))
    c.data.source = "synthetic"
    c.data.datasets = ml_collections.ConfigDict()
    # 'balanced': FLAIR's dataset-balanced sampling (each dataset equally often); 'weights': each
    # dataset's `weight`; 'concat': in proportion to the datasets' sizes.
    c.data.mixing = "balanced"
    # Bad input (missing/truncated/undecodable image, empty report, unknown category, malformed row,
    # label outside the label set): 'raise' stops with the file and row; 'skip' skips the example
    # and counts it (train/skipped_examples, checkpointed).
    c.data.on_error = "raise"
    c.data.fov_crop = False  # crop real photographs to their field of view (data/images.py)
    c.data.ood_ban = True  # FLAIR: drop the out-of-distribution categories from pretraining CSVs
    c.data.batch_size = 128  # global batch
    c.data.image_size = 512  # FLAIR: long side to 512, zero-pad bottom/right
    # grain worker processes: 0 = in the main process; -1 = one per CPU core less one (the process
    # that drives the step), e.g. 1 on a 2-core laptop and 15 on a 16-core GPU host.
    c.data.worker_count = -1
    c.data.worker_buffer_size = 2
    c.data.shuffle = True
    # Image preprocessing: 'flair' = RGB in [0, 1], long side to image_size, zero-pad bottom/right,
    # no mean/std (FLAIR/KeepFIT); 'clip' = resize to image_size x image_size (bicubic) and CLIP
    # mean/std normalisation (ViLReF / Chinese-CLIP / OpenAI CLIP).
    c.data.preprocess = "flair"
    # What a training example is: 'flair' = image + FLAIR prompt from its categories, positives by
    # category id (docs/methods.md, "FLAIR"); 'reports' = image + its report + the multi-hot finding
    # labels the expert-knowledge extractor reads off the report ("ViLReF").
    c.data.stream = "flair"
    c.data.reports = ml_collections.ConfigDict()
    c.data.reports.language = "zh"  # the synthetic corpus writes every report in 'en' and 'zh'
    # ViLReF drops the first 3 characters of every report (an eye-side prefix such as "右眼："); the
    # synthetic reports have no fixed-length prefix, so 0 (off) is the default.
    c.data.reports.drop_chars = 0
    # 'extract': labels from the report by retina_jax.data.labels (as ViLReF); 'given': the corpus's
    # ground-truth labels (equal on the synthetic corpus, which a test checks).
    c.data.reports.labels = "extract"
    c.data.reports.coverage_size = 2048  # reports scanned at start to log the extractor's coverage
    # The extractor's switches (docs/labels.md): what an uncertain mention ('possible drusen', '疑似')
    # gives: 'positive' (CheXpert's U-Ones), 'negative' or 'drop'; the cup-to-disc ratio from which a
    # measurement means an enlarged cup; per_eye: an image whose eye the dataset gives is labelled
    # from its own eye's section of a right/left-eye report (off: the whole report, as ViLReF).
    c.data.reports.uncertain = "positive"
    c.data.reports.cup_disc_threshold = 0.6
    c.data.reports.per_eye = True
    c.data.augment = ml_collections.ConfigDict()
    c.data.augment.enabled = True
    # 'flair': flip, small affine, jitter (kornia, FLAIR); 'vilref': RandomResizedCrop(crop_scale,
    # ratio 3/4-4/3) on the source image, flip, colour jitter (torchvision, ViLReF).
    c.data.augment.kind = "flair"
    c.data.augment.crop_scale = (0.9, 1.0)
    c.data.augment.saturation = 0.0
    c.data.augment.hflip_p = 0.5
    c.data.augment.affine_p = 0.25
    c.data.augment.rotate_deg = 5.0
    c.data.augment.scale_min = 0.9
    c.data.augment.scale_max = 1.0
    c.data.augment.jitter_p = 0.25
    c.data.augment.brightness = 0.2
    c.data.augment.contrast = 0.2
    # FLAIR's prompt: "A [ATR] fundus photograph of [CLS]", with the category text swapped for one
    # of its expert descriptions, uniformly over [name] + descriptions.
    c.data.prompt_template = "A {atr} fundus photograph of {cls}"
    c.data.description_swap = True
    # KeepFIT's expert stream (docs/methods.md, "KeepFIT"): image-caption pairs (MM-Retinal's role), one
    # batch of `batch_size` (global) per step beside the public batch, drawn uniformly WITH
    # replacement, captions tokenised as they are (no prompt template), images without augmentation.
    # The embedded default is a separate synthetic corpus (seed `seed`, `size` examples, every one
    # with an expert caption); 2,169 is MM-Retinal's CFP count.
    c.data.expert = ml_collections.ConfigDict()
    c.data.expert.enabled = False
    c.data.expert.batch_size = 24
    c.data.expert.seed = 1
    c.data.expert.size = 2169
    # KeepFIT V2's multi-modal expert set (MM-Retinal V2: CFP, FFA, OCT); weights () = uniform.
    c.data.expert.modalities = ("CFP",)
    c.data.expert.modality_weights = ()
    # Real expert pairs (e.g. MM-Retinal CSVs), name -> ConfigDict(format, path, image_root) as
    # data.datasets; empty = the synthetic expert set above.
    c.data.expert.datasets = ml_collections.ConfigDict()
    # The embedded synthetic corpus (retina_jax.data.synthetic.CorpusSpec fields).
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.seed = 0
    c.data.synthetic.size = 50_000
    c.data.synthetic.image_size = 512  # rendered size; the transform then resizes to data.image_size
    c.data.synthetic.comorbidity_prob = 0.15
    c.data.synthetic.attribute_prob = 0.2
    c.data.synthetic.expert_fraction = 0.3
    c.data.synthetic.difficulty = 0.0
    # A directory: every synthetic corpus the run reads (training, held-out tasks) is drawn once into
    # it and read from there (retina_jax/data/render_cache.py); "" draws every image when read.
    c.data.synthetic.cache_dir = ""

    # ----------------------------------------------------------------------------------- text
    c.text = ml_collections.ConfigDict()
    # A Hugging Face tokenizer directory, or "learn": train a WordPiece vocabulary on the corpus's
    # prompts, descriptions and reports and save it in the workdir (the demo, with no hub access).
    c.text.tokenizer = "learn"
    c.text.vocab_size = 4000  # for "learn"
    c.text.lowercase = False  # Bio_ClinicalBERT is cased
    c.text.vocab_corpus_size = 2000  # reports used to learn the vocabulary
    c.text.max_len = 77  # FLAIR 77, KeepFIT 256

    # ---------------------------------------------------------------------------------- model
    c.model = ml_collections.ConfigDict()
    c.model.embed_dim = 512
    c.model.logit_scale_init = 2.659260036932778  # ln(1 / 0.07)
    # When the stored logit_scale is clamped to [0, ln 100]: FLAIR clamps it in place before every
    # forward ('before_forward'); ViLReF/Chinese-CLIP clamp it after every optimizer step ('after_step').
    c.model.logit_scale_clamp = "before_forward"
    # ViLReF re-initialises logit_scale at the start of every run, resumes included (a quirk of the
    # original; docs/methods.md, "ViLReF").
    c.model.logit_scale_reset = False
    # Activations and matmuls in 'bfloat16' or 'float32'; parameters, optimizer state, the
    # embeddings, logits and losses stay float32 either way (RESULTS.md: bf16 vs float32).
    c.model.compute_dtype = "float32"
    # Rematerialise every tower block (nn.remat): activation memory for about 1/3 more compute;
    # the same numbers (tests/test_sharding.py).
    c.model.remat = False
    # Projection heads (param trees `img_proj`, `txt_proj`): 'flair' = normalise -> Linear(no bias)
    # -> normalise (FLAIR/KeepFIT); 'linear' = Linear(no bias) -> normalise (CLIP's `proj` /
    # `text_projection`, ViLReF); 'none' = the tower already outputs embed_dim (CLIP RN50 attnpool).
    c.model.img_projection = "flair"
    c.model.txt_projection = "flair"
    c.model.img = ml_collections.ConfigDict()
    # 'resnet' (torchvision layout, FLAIR/KeepFIT) | 'clip_resnet' (CLIP ModifiedResNet, ViLReF RN50)
    # | 'vit' (CLIP-layout ViT, ViLReF ViT-B/16). The ViT's learned positions are for data.image_size.
    c.model.img.name = "resnet"
    c.model.img.depth = 50  # resnet
    c.model.img.width = 64  # resnet: the stem's width
    # resnet: torchvision's width_per_group, the bottleneck's inner width per 64 stage channels
    # (128 = wide_resnet50_2 / wide_resnet101_2)
    c.model.img.width_per_group = 64
    c.model.img.stage_sizes = ()  # resnet; () = the depth's own block counts
    c.model.img.vit = ml_collections.ConfigDict()
    c.model.img.vit.patch_size = 16
    c.model.img.vit.width = 768
    c.model.img.vit.layers = 12
    c.model.img.vit.heads = 12
    c.model.img.vit.mlp_dim = 3072
    c.model.img.clip_resnet = ml_collections.ConfigDict()
    c.model.img.clip_resnet.layers = (3, 4, 6, 3)
    c.model.img.clip_resnet.width = 64
    c.model.img.clip_resnet.heads = 32
    c.model.img.clip_resnet.output_dim = 1024
    c.model.txt = ml_collections.ConfigDict()
    c.model.txt.pooling = "flair"  # 'flair' (faithful) | 'cls' | 'masked_mean'
    c.model.txt.hidden_size = 768
    c.model.txt.num_hidden_layers = 12
    c.model.txt.num_attention_heads = 12
    c.model.txt.intermediate_size = 3072
    c.model.txt.max_position_embeddings = 512
    c.model.txt.hidden_dropout_prob = 0.1
    c.model.txt.attention_probs_dropout_prob = 0.1
    # How the text tower's dropout masks are drawn (docs/methods.md, "Dropout draws"): 'packed' (four
    # 16-bit draws per threefry call, default) or 'flax' (flax's nn.Dropout, one call per element:
    # the masks of runs recorded before the switch). Either is a function of the key alone.
    c.model.txt.dropout_draw = "packed"
    c.model.txt.add_pooler = True
    c.model.txt.layer_norm_eps = 1e-12
    c.model.txt.type_vocab_size = 2
    # KeepFIT's knowledge attention (param tree `knowledge`; docs/methods.md, "KeepFIT"): 2 heads over
    # embed_dim, bias-free q/k/v/out, dropout on the weights; softmax over 'heads' (the original's
    # quirk, default) or 'keys' (textbook attention).
    c.model.knowledge = ml_collections.ConfigDict()
    c.model.knowledge.enabled = False
    c.model.knowledge.heads = 2
    c.model.knowledge.dropout = 0.5
    c.model.knowledge.softmax_axis = "heads"
    # KeepFIT V2's CoCa-style caption decoder (param tree `decoder`; docs/methods.md, "KeepFIT V2"): causal
    # self-attention + cross-attention to the image tower's spatial tokens, trained on the expert
    # captions with weight loss.keepfit.gen_weight.
    c.model.decoder = ml_collections.ConfigDict()
    c.model.decoder.enabled = False
    c.model.decoder.width = 512
    c.model.decoder.layers = 3
    c.model.decoder.heads = 8
    c.model.decoder.mlp_dim = 2048
    c.model.decoder.dropout = 0.1

    # ----------------------------------------------------------------------------------- loss
    c.loss = ml_collections.ConfigDict()
    c.loss.name = "flair"  # 'flair' | 'clip' | 'wscl'
    c.loss.scope = "global"  # 'global' (ours) | 'local' (per-device, as the original)
    # ViLReF's Weighted Similarity Coupling Loss (docs/methods.md, "ViLReF"): how label dissimilarity
    # weights the negatives ('similarity' | 'log' | 'none') and ALBEF momentum distillation (0 = off).
    c.loss.wscl = ml_collections.ConfigDict()
    c.loss.wscl.coupling = "similarity"
    c.loss.wscl.alpha = 0.0
    # KeepFIT (with data.expert): loss = L_pub + mm_weight * L_mm + rev_weight * L_rev, L_mm the CLIP
    # loss of the expert pairs, L_rev the MSE between the public text embeddings and the knowledge
    # attention's revision (needs model.knowledge). KeepFIT: 1 and 100; its ablations: revision only
    # (mm_weight 0, rev_weight 1), mixed only (rev_weight 0).
    c.loss.keepfit = ml_collections.ConfigDict()
    c.loss.keepfit.mm_weight = 1.0
    c.loss.keepfit.rev_weight = 100.0
    # KeepFIT V2's lambda_gen: weight of the caption loss (token cross-entropy over the real tokens of
    # the global expert batch); needs model.decoder.
    c.loss.keepfit.gen_weight = 0.0

    # -------------------------------------------------------------------------------- mlm
    # KeepFIT V2 stage `text` (docs/methods.md, "KeepFIT V2"): whole-word masked language modelling of the
    # text tower alone on a plain-text corpus ('synthetic' = the synthetic reports and expert
    # captions, or a folder of .txt files, one text per line); the last `heldout_size` texts are
    # held out for the masked-token accuracy.
    c.mlm = ml_collections.ConfigDict()
    c.mlm.enabled = False
    c.mlm.corpus = "synthetic"
    c.mlm.mask_prob = 0.15
    c.mlm.heldout_size = 256

    # ------------------------------------------------------------------------------- momentum
    # ViLReF's batch expansion (ALBEF mechanics): EMA copies of both towers and projections, and
    # replicated queues of momentum features, labels and a validity mask in the train state.
    c.momentum = ml_collections.ConfigDict()
    c.momentum.enabled = False
    c.momentum.decay = 0.995
    c.momentum.queue_size = 0  # 0 = no queue; else a positive multiple of the global batch
    # Keys of the current batch: the momentum model's features ('momentum', ALBEF; configs/vilref.py)
    # or the online ones (the only choice without a momentum model).
    c.momentum.key_features = "online"
    # 'constant' (ALBEF, ViLReF) or 'cosine': the momentum rises from `decay` to 1.0 over the run (BYOL).
    c.momentum.schedule = "constant"
    # The queue is neither read nor written before this step; at it the momentum towers restart as
    # copies of the online ones and the queue fills afresh (SwAV's epoch_queue_starts; 0 = from the start).
    c.momentum.queue_start_step = 0
    # The queue may hold at most this fraction of the training set (ViLReF 65,536 of 451,956 pairs =
    # 0.145; MoCo 0.05): a queue near the dataset size holds every example's own stale key.
    c.momentum.queue_max_fraction = 0.25

    # ---------------------------------------------------------------------------------- optim
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.weight_decay = 1e-5
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0  # global norm; 0 disables
    c.optim.warmup_epochs = 1.0
    c.optim.warmup_steps = -1  # >= 0 overrides warmup_epochs (ViLReF warms up for 100 steps); -1 = off
    c.optim.schedule_epochs = 100.0  # cosine horizon; FLAIR trains 15 of 100 epochs
    # Regexes over '/'-joined param paths excluded from weight decay (FLAIR: none).
    c.optim.wd_exclude = ()

    # ---------------------------------------------------------------------------------- train
    c.train = ml_collections.ConfigDict()
    c.train.epochs = 15.0
    c.train.log_every = 10
    c.train.checkpoint_every = 500  # steps; a final checkpoint is always written
    c.train.max_to_keep = 3
    c.train.async_checkpoint = True
    c.train.progress = True
    # Multi-host runs agree on stopping after SIGTERM (a host all-gather) every this many steps; one
    # process checks its own signal after every step.
    c.train.stop_check_every = 10
    c.train.eval_at_end = True  # run the config.evals entries marked at_end after the last step
    # A Weights & Biases project to log the metrics to as well ('' = off); needs wandb installed
    # (not in the pinned set). metrics.jsonl and TensorBoard files are always written.
    c.train.wandb = ""

    # --------------------------------------------------------------------------- held-out data
    # The held-out corpora every evaluator draws from, with seeds no training run uses (validate
    # checks), and the zero-shot prompts (docs/data.md, "Seeds").
    c.heldout = ml_collections.ConfigDict()
    c.heldout.batch_size = 64  # of every evaluation's forward passes
    # The zero-shot task: one primary condition per image, no attributes.
    c.heldout.conditions = ml_collections.ConfigDict()
    c.heldout.conditions.name = "synthetic_conditions"
    c.heldout.conditions.classes = SYNTHETIC_TASK_CLASSES
    c.heldout.conditions.seed = 10_007
    c.heldout.conditions.size = 600
    c.heldout.conditions.difficulty = 0.0
    # ViLReF's multi-label findings (and the segmentation masks): seed `seed` trains, `seed + 1` tests.
    c.heldout.findings = ml_collections.ConfigDict()
    c.heldout.findings.seed = 20_011
    c.heldout.findings.train_size = 1000
    c.heldout.findings.test_size = 500
    # KeepFIT V2's held-out expert images with their captions (the training expert set's modalities).
    c.heldout.captions = ml_collections.ConfigDict()
    c.heldout.captions.seed = 30_013
    c.heldout.captions.size = 200
    # Prompt ensemble of every zero-shot prototype: every template x every text of a class ('en': the
    # name and its FLAIR descriptions; 'zh': the Chinese name and descriptions of
    # knowledge/category_descriptions_zh.json).
    c.prompts = ml_collections.ConfigDict()
    c.prompts.templates = ("A fundus photograph of {}",)
    c.prompts.language = "en"

    # ---------------------------------------------------------------------------------- evals
    # One entry per evaluation (docs/architecture.md, "Evaluators"): `evaluator(type, ...)`. An entry
    # runs every `every_steps` training steps (0 = never during training), when training ends if
    # `at_end` (and train.eval_at_end), and always on demand: python -m retina_jax.evaluate --eval NAME.
    c.evals = ml_collections.ConfigDict()
    # Root folder of the images of the tasks the task-based entries run on (a shipped task's or a
    # task file's dataframe rows are relative to it); '' = none (the held-out synthetic tasks need none).
    c.eval_data_root = ""
    c.evals.zero_shot = evaluator("zero_shot", at_end=True)
    c.evals.multilabel_linear_probe = evaluator("multilabel_linear_probe")
    c.evals.multilabel_finetune = evaluator("multilabel_finetune")
    c.evals.captions = evaluator("captions")
    c.evals.mlm_heldout = evaluator("mlm_heldout")
    for protocol in TRANSFER_PROTOCOLS:  # the transfer suite, on demand
        c.evals[protocol] = evaluator(protocol)
    return c
