"""The in-training evaluations on the held-out corpora, one class each (docs/architecture.md,
"Evaluators"): `run(encoder)` returns (metrics, report extras) using only the public `Encoder`.

- `ZeroShot` (type `zero_shot`): the held-out synthetic conditions task, prompts from the class
  names and their descriptions (FLAIR section 3.3; ViLReF's Chinese templates with
  `prompts.language='zh'`); it reports under the task's name (`heldout.conditions.name`).
- `Captions` (`captions`): KeepFIT V2's generated captions of held-out expert images, BLEU/ROUGE-L/CIDEr.
- `HeldoutMLM` (`mlm_heldout`): KeepFIT V2 stage `text`'s masked-token loss and accuracy on held-out texts.

ViLReF's multi-label probe and fine-tune, and FLAIR's transfer protocols, are the task-based
evaluators of evals/suite.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from retina_jax import losses
from retina_jax.data import pipeline
from retina_jax.evals import captions as caption_metrics
from retina_jax.evals import metrics as eval_metrics
from retina_jax.evals import zeroshot
from retina_jax.evals.base import Evaluator, register
from retina_jax.models import caption_decoder


def _needs_images(config, name: str) -> list[str]:
    return [f"config.evals.{name}: stage `text` trains the text tower alone; there is no image tower to evaluate"] \
        if config.mlm.enabled else []


@register
class ZeroShot(Evaluator):
    type, prefix = "zero_shot", ""

    @property
    def report_name(self) -> str:
        return self.config.heldout.conditions.name

    @classmethod
    def check(cls, config, name, settings):
        return _needs_images(config, name)

    def run(self, encoder):
        z, p = self.config.heldout.conditions, self.config.prompts
        protos = zeroshot.class_prototypes(encoder.embed_texts, encoder.tokenize, list(z.classes), p.templates,
                                           language=p.language)
        embeddings, labels = encoder.embed_images(pipeline.heldout_batches(self.config, self.config.heldout.batch_size))
        result = eval_metrics.classification_metrics(labels, zeroshot.zero_shot_probs(embeddings, protos,
                                                                                      encoder.logit_scale))
        result["num_examples"] = int(len(labels))
        result["num_classes"] = len(z.classes)
        return result, {"classes": list(z.classes), "seed": z.seed, "language": p.language,
                        "templates": list(p.templates)}


@register
class HeldoutMLM(Evaluator):
    """Masked-token loss and accuracy over the held-out texts (fixed masks), all tokens pooled."""
    type, prefix = "mlm_heldout", "mlm/"

    @classmethod
    def check(cls, config, name, settings):
        return [] if config.mlm.enabled else [
            f"config.evals.{name}: the held-out masked-token accuracy needs the masked LM (mlm.enabled, KeepFIT V2 "
            "stage `text`)"]

    def run(self, encoder):
        nll_sum = correct = count = 0.0
        for batch in pipeline.mlm_heldout_batches(self.config, encoder.tokenize.path, self.config.heldout.batch_size):
            batch = pipeline.make_global(batch, encoder.batch_sharding)
            logits = encoder.mlm_logits(batch["input_ids"], batch["attention_mask"])
            loss, accuracy = losses.token_cross_entropy(logits, batch["mlm_labels"], batch["mlm_weights"])
            n = float(jnp.sum(batch["mlm_weights"]))
            nll_sum, correct, count = nll_sum + float(loss) * n, correct + float(accuracy) * n, count + n
        return ({"loss": nll_sum / max(count, 1.0), "accuracy": correct / max(count, 1.0),
                 "num_masked_tokens": int(count)}, {"heldout_texts": self.config.mlm.heldout_size})


@register
class Captions(Evaluator):
    """Captions of held-out expert images (greedy, or beam search with `beam_size` > 1) scored against
    the corpus captions."""
    type, prefix = "captions", "captions/"

    @classmethod
    def check(cls, config, name, settings):
        where, errors = f"config.evals.{name}", []
        if not config.model.decoder.enabled:
            errors.append(f"{where}: needs the caption decoder (model.decoder.enabled=True)")
        if settings.beam_size < 1:
            errors.append(f"{where}.beam_size: {settings.beam_size} must be >= 1 (1 = greedy)")
        if not 2 <= settings.max_len <= config.text.max_len:
            errors.append(f"{where}.max_len: {settings.max_len} must be in [2, text.max_len={config.text.max_len}]")
        return errors

    def run(self, encoder):
        c, batch_size = self.settings, self.config.heldout.batch_size
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
