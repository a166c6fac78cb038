"""`config.evals` (docs/architecture.md, "Evaluators"): entries checked by `validate`, evaluators run at
their own `every_steps` during training and at the end, and the registry matches the defaults."""
import json
import os

import ml_collections
import pytest

from configs import common
from retina_jax.config import validate
from retina_jax.errors import ConfigError
from retina_jax.evals import base
from test_train import tiny_config


def test_every_registered_type_has_its_defaults_and_a_default_entry():
    assert sorted(base._registry()) == sorted(common.EVALUATORS)
    entries = common.get_config().evals
    assert sorted(entries[name].type for name in entries.keys()) == sorted(common.EVALUATORS)
    for name in entries.keys():
        assert base.entry_errors(common.get_config(), name) == []


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.evals.__setattr__("bogus", ml_collections.ConfigDict({"type": "nope"})),
     "config.evals.bogus.type: unknown evaluator type 'nope'"),
    (lambda c: c.evals.__setattr__("few", ml_collections.ConfigDict({"type": "transfer_tip_adapter", "every_steps": 0,
                                                                     "at_end": True})),
     "config.evals.few: type 'transfer_tip_adapter' has the fields"),
    (lambda c: c.evals.zero_shot.__setattr__("every_steps", -1), "config.evals.zero_shot.every_steps: -1"),
    # Turned on for a method that cannot run it: its own check names the entry.
    (lambda c: c.evals.captions.__setattr__("at_end", True),
     "config.evals.captions: needs the caption decoder (model.decoder.enabled=True)"),
    (lambda c: c.evals.mlm_heldout.__setattr__("every_steps", 5),
     "config.evals.mlm_heldout: the held-out masked-token accuracy needs the masked LM"),
])
def test_validate_names_the_entry_and_field(edit, message):
    c = tiny_config()
    with c.unlocked():
        edit(c)
    with pytest.raises(ConfigError) as err:
        validate(c, 8)
    assert message in str(err.value)
    # An on-demand entry is not checked against the method until it is asked for.
    validate(tiny_config(), 8)
    with pytest.raises(ConfigError, match="config.evals.captions: needs the caption decoder"):
        base.build(tiny_config(), ["captions"])


def test_each_evaluator_runs_at_its_own_steps_and_at_the_end(tmp_path):
    from retina_jax.train import Trainer
    # 8 steps: zero-shot every 3 steps and at the end; the multi-label probe every 4 steps only (so at
    # step 8, the last, too); the fine-tune on demand only.
    config = tiny_config(**{"train.epochs": 2.0, "optim.schedule_epochs": 2.0, "train.checkpoint_every": 100,
                            "evals.zero_shot.every_steps": 3, "evals.multilabel_linear_probe.every_steps": 4,
                            "heldout.findings.train_size": 32, "heldout.findings.test_size": 32})
    trainer = Trainer(config, str(tmp_path))
    result = trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = {name: [r["step"] for r in rows if f"eval/{name}/num_examples" in r]
             for name in ("synthetic_conditions", "multilabel_linear_probe")}
    assert steps == {"synthetic_conditions": [3, 6, 8], "multilabel_linear_probe": [4, 8]}
    assert "aca" in result and "linear_probe/macro_auc" in result and "finetune/macro_auc" not in result
    assert not os.path.exists(tmp_path / "eval_multilabel_finetune.json")
    # train.eval_at_end off: nothing runs after the last step, periodic evaluations still do.
    quiet = Trainer(tiny_config(**{"train.epochs": 1.0, "train.checkpoint_every": 100, "train.eval_at_end": False,
                                   "evals.zero_shot.every_steps": 2}), str(tmp_path / "quiet"))
    assert quiet.train() == {}
    rows = [json.loads(line) for line in open(tmp_path / "quiet" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "eval/synthetic_conditions/aca" in r] == [2]
