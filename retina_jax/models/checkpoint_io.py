"""Reading the original projects' checkpoint files as flat NumPy state dicts (docs/methods.md,
"Checkpoint interoperability").

Formats: torch `state_dict` files (`.pt` / `.pth` / `.bin`, optionally wrapped as
`{"state_dict": ...}` or `{"model": ...}`, optionally with DataParallel's `module.` prefix, or a
TorchScript archive such as OpenAI's released CLIP files), `.safetensors` files, and Hugging Face
directories (`config.json` + `model.safetensors`, a sharded `model.safetensors.index.json`, or
`pytorch_model.bin`). safetensors are read with `safetensors.numpy`, without torch; torch is
imported only for pickled files (the `convert` extra: `pip install retina_jax[convert]`).
"""
from __future__ import annotations

import json
import os
import zipfile
from typing import Mapping

import numpy as np

_WRAPPERS = ("state_dict", "model", "module")  # training scripts' {"state_dict": sd, "epoch": ...}


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading .pt/.pth/.bin checkpoints needs torch: pip install 'retina_jax[convert]' "
                          "(torch==2.13.0, CPU)") from e
    return torch


def _to_numpy(value, key: str, path: str) -> np.ndarray:
    torch = _torch()
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float16):
            value = value.float()  # numpy has no bfloat16; float32 is the conversion precision anyway
        return value.numpy()
    if isinstance(value, (int, float)):  # e.g. OpenAI JIT archives store `input_resolution` as an int
        return np.asarray(value)
    raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor: not a state dict")


def _is_torch_file(path: str) -> bool:
    """torch.save writes a zip archive (since 1.6) or a pickle (protocol 2, first byte 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _load_pickle(path: str, trust_pickle: bool) -> Mapping:
    if not _is_torch_file(path):
        # Otherwise torch's weights-only unpickler calls any file one that "pickles objects other than tensors".
        raise ValueError(f"{path} is not a checkpoint: neither a torch file (zip archive or pickle), a .safetensors "
                         "file nor a Hugging Face model directory")
    torch = _torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except RuntimeError as e:
        if "TorchScript" in str(e) or "constants.pkl" in str(e):
            # OpenAI's released CLIP files are TorchScript archives; their state_dict holds the weights.
            return torch.jit.load(path, map_location="cpu").state_dict()
        raise ValueError(f"{path}: cannot be read as a torch checkpoint: {e}") from e
    except Exception as e:
        if not trust_pickle and "weights_only" in str(e):
            raise ValueError(f"{path}: the checkpoint pickles objects other than tensors; if you trust the file, "
                             "pass --trust_pickle (it executes code from the file)") from e
        raise ValueError(f"{path}: cannot be read as a torch checkpoint: {e}") from e


def _unwrap(obj, path: str) -> Mapping:
    if not isinstance(obj, Mapping):
        if hasattr(obj, "state_dict"):  # a whole pickled nn.Module
            return obj.state_dict()
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    for key in _WRAPPERS:
        if key in obj and isinstance(obj[key], Mapping):
            return obj[key]
    return obj


def _strip_module_prefix(state: dict) -> dict:
    """DataParallel/DDP checkpoints prefix every key with `module.` (ViLReF's do)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    try:
        return dict(load_file(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as safetensors: {e}") from e


def read_state_dict(path: str, *, trust_pickle: bool = False) -> tuple[dict[str, np.ndarray], dict | None]:
    """(flat state dict of NumPy arrays, the HF config.json dict or None) from a file or HF directory."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    hf_config = None
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                hf_config = json.load(f)
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            state = _read_safetensors(os.path.join(path, "model.safetensors"))
        elif os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(_read_safetensors(os.path.join(path, shard)))
        elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
            file = os.path.join(path, "pytorch_model.bin")
            state = {k: _to_numpy(v, k, file) for k, v in _unwrap(_load_pickle(file, trust_pickle), file).items()}
        else:
            raise FileNotFoundError(f"{path}: a directory without model.safetensors, model.safetensors.index.json "
                                    "or pytorch_model.bin")
    elif path.endswith(".safetensors"):
        state = _read_safetensors(path)
    else:
        raw = _unwrap(_load_pickle(path, trust_pickle), path)
        state = {str(k): _to_numpy(v, k, path) for k, v in raw.items()}
    if not state:
        raise ValueError(f"{path}: the checkpoint holds no tensors")
    return _strip_module_prefix(state), hf_config
