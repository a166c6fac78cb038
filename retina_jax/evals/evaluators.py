"""The evaluations run during and after training, one class each (docs/architecture.md,
"Evaluators"; big_vision's evaluator shape): built from the config, `run(encoder)` returns
(metrics, report extras) using only the public `Encoder`.

- `ZeroShot`: the held-out synthetic conditions task, prompts from the class names and their
  descriptions (FLAIR section 3.3; ViLReF's Chinese templates with `language='zh'`).
- `MultilabelProbe` / `MultilabelFinetune`: ViLReF's multi-label transfer (ViLReF section 4.2), a
  sigmoid head on the pre-projection image feature, frozen or trained with the tower (on a copy).
- `Captions`: KeepFIT V2's generated captions of held-out expert images, BLEU/ROUGE-L/CIDEr.
- `HeldoutMLM`: KeepFIT V2 stage `text`'s masked-token loss and accuracy on held-out texts.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from retina_jax import losses
from retina_jax.data import pipeline
from retina_jax.evals import captions as caption_metrics
from retina_jax.evals import metrics as eval_metrics
from retina_jax.evals import multilabel, zeroshot
from retina_jax.models import caption_decoder


class Evaluator:
    name: str  # the report's name: eval/<name>/<metric>, eval_<name>.json
    prefix: str = ""  # of its metrics in the dict `Trainer.evaluate` returns

    def __init__(self, config):
        self.config = config

    def run(self, encoder) -> tuple[dict, dict]:
        raise NotImplementedError


class ZeroShot(Evaluator):
    def __init__(self, config):
        super().__init__(config)
        self.name = config.eval.zero_shot.name

    def run(self, encoder):
        z = self.config.eval.zero_shot
        protos = zeroshot.class_prototypes(encoder.embed_texts, encoder.tokenize, list(z.classes), z.templates,
                                           language=z.language)
        embeddings, labels = encoder.embed_images(pipeline.heldout_batches(self.config, self.config.eval.batch_size))
        result = eval_metrics.classification_metrics(labels, zeroshot.zero_shot_probs(embeddings, protos,
                                                                                      encoder.logit_scale))
        result["num_examples"] = int(len(labels))
        result["num_classes"] = len(z.classes)
        return result, {"classes": list(z.classes), "seed": z.seed, "language": z.language,
                        "templates": list(z.templates)}


def _multilabel_data(config, encoder, with_images: bool) -> dict:
    """Pre-projection features and finding labels of the held-out multi-label splits (shared by the
    probe and the fine-tune of one evaluation through `encoder.cache`), and the images themselves
    when fine-tuning needs them."""
    key = ("multilabel", with_images)
    if key in encoder.cache:
        return encoder.cache[key]
    data = {}
    for split in ("train", "test"):
        batches = pipeline.heldout_batches(config, config.eval.batch_size, pipeline.multilabel_source(config, split),
                                           lambda example: example["labels"])
        if with_images:
            batches = list(batches)
            data[split + "_images"] = np.concatenate([b[0][b[2]] for b in batches])
        data[split] = encoder.image_features(batches)
    encoder.cache[key] = data
    return data


class MultilabelProbe(Evaluator):
    name, prefix = "multilabel_linear_probe", "linear_probe/"

    def run(self, encoder):
        lp = self.config.eval.linear_probe
        data = _multilabel_data(self.config, encoder, self.config.eval.finetune.enabled)
        return multilabel.linear_probe(*data["train"], *data["test"], l2=lp.l2, steps=lp.steps, lr=lp.lr,
                                       seed=self.config.seed), {}


class MultilabelFinetune(Evaluator):
    """The pretraining state is never touched: `multilabel.finetune` copies the tower's variables
    before its donating step (the original fine-tunes the model in place)."""
    name, prefix = "multilabel_finetune", "finetune/"

    def run(self, encoder):
        ft = self.config.eval.finetune
        data = _multilabel_data(self.config, encoder, True)
        return multilabel.finetune(
            encoder.tower_features, encoder.image_tower(), data["train_images"], data["train"][1], data["test_images"],
            data["test"][1], feature_dim=data["train"][0].shape[1], steps=ft.steps, batch_size=ft.batch_size,
            lr=ft.lr, weight_decay=ft.weight_decay, seed=self.config.seed), {}


class HeldoutMLM(Evaluator):
    """Masked-token loss and accuracy over the held-out texts (fixed masks), all tokens pooled."""
    name, prefix = "mlm_heldout", "mlm/"

    def run(self, encoder):
        nll_sum = correct = count = 0.0
        for batch in pipeline.mlm_heldout_batches(self.config, encoder.tokenize.path, self.config.eval.batch_size):
            batch = pipeline.make_global(batch, encoder.batch_sharding)
            logits = encoder.mlm_logits(batch["input_ids"], batch["attention_mask"])
            loss, accuracy = losses.token_cross_entropy(logits, batch["mlm_labels"], batch["mlm_weights"])
            n = float(jnp.sum(batch["mlm_weights"]))
            nll_sum, correct, count = nll_sum + float(loss) * n, correct + float(accuracy) * n, count + n
        return ({"loss": nll_sum / max(count, 1.0), "accuracy": correct / max(count, 1.0),
                 "num_masked_tokens": int(count)}, {"heldout_texts": self.config.mlm.heldout_size})


class Captions(Evaluator):
    """Captions of held-out expert images (greedy, or beam search with `eval.captions.beam_size` > 1)
    scored against the corpus captions."""
    name, prefix = "captions", "captions/"

    def run(self, encoder):
        c, batch_size = self.config.eval.captions, self.config.eval.batch_size
        source = pipeline.caption_source(self.config)
        memory, indices = encoder.image_tokens(pipeline.heldout_batches(self.config, batch_size, source,
                                                                        lambda example: example["index"]))
        tok = encoder.tokenize.tokenizer
        ids = {name: tok.token_to_id(name) for name in ("[CLS]", "[SEP]", "[PAD]")}
        hypotheses = []
        for start in range(0, len(memory), batch_size):
            chunk = jnp.asarray(memory[start:start + batch_size])

            def log_probs(tokens, t, chunk=chunk):
                mem = jnp.repeat(chunk, tokens.shape[0] // chunk.shape[0], axis=0)  # beams share their image
                return jax.nn.log_softmax(encoder.caption_logits(mem, tokens)[:, t - 1], axis=-1)

            args = dict(batch_size=len(chunk), max_len=c.max_len, bos_id=ids["[CLS]"], eos_id=ids["[SEP]"],
                        pad_id=ids["[PAD]"])
            tokens = caption_decoder.greedy_decode(log_probs, **args) if c.beam_size == 1 else \
                caption_decoder.beam_search(log_probs, beam_size=c.beam_size, **args)
            hypotheses += tok.decode_batch(tokens.tolist(), skip_special_tokens=True)
        references = [source.record(int(i))["caption"] for i in indices]
        result = caption_metrics.caption_metrics(hypotheses, references)
        result["num_examples"] = len(references)
        examples = [{"index": int(i), "generated": h, "reference": r}
                    for i, h, r in list(zip(indices, hypotheses, references))[:12]]
        return result, {"beam_size": c.beam_size, "examples": examples}


def build(config) -> list[Evaluator]:
    """The evaluators `config.eval` turns on, in the order they run."""
    e = config.eval
    if config.mlm.enabled:
        return [HeldoutMLM(config)]
    out = [ZeroShot(config)]
    if e.linear_probe.enabled:
        out.append(MultilabelProbe(config))
    if e.finetune.enabled:
        out.append(MultilabelFinetune(config))
    if e.captions.enabled:
        out.append(Captions(config))
    return out
