"""The on-disk format of compressed variants, and `load_compressed`, which turns one back into a working model.

A compressed checkpoint is a Hugging Face directory (config.json, generation_config.json, tokenizer files,
model.safetensors) whose config.json carries a ``dsft_compression`` entry saying how the weights are stored:
- ``{"method": "quantize", "plan": {linear: [...], experts: [...], embedding: [...]}, "kernel": ...}``: the
  listed modules hold ``<param>_int8`` (int8) + ``<param>_scale`` (float32) tensors (see quantize.py); the
  config.json also holds a ``quantization_config`` describing the scheme for readers of the checkpoint;
- ``{"method": "prune", "tensors": {name: shape}}``: the listed tensors are stored as ``<name>.sparse_values``
  (the kept values, row-major) + ``<name>.sparse_mask`` (the keep-mask, 1 bit per weight), so a 50%-sparse
  tensor takes ~53% of its dense bytes; they are rebuilt dense on load.
Expert-pruned and distilled variants are ordinary checkpoints (`save_plain`, no marker): any loader reads them.
Marked checkpoints keep transformers' in-memory tensor names (fused `experts.gate_up_proj` etc.), which
`save_pretrained` would convert back to per-expert tensors; `load_compressed` loads them into the same modules.

`is_compressed(path)` tells base_model.load_model_and_tokenizer (and so evaluate and serve) to delegate here.

Plain `from_pretrained` cannot read a marked checkpoint (its weights have other names), and it must not build a
float model with freshly initialised weights in silence (an unknown `quantization_config` only warns). So the
saved config.json's ``model_type`` is replaced by a sentence saying how to load the directory (the real one is
kept in the marker): transformers then stops with "has model type `<that sentence>` but Transformers does not
recognize this architecture". A pruned variant also gets a dense sibling `<dir>_dense` that any tool reads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
)
from transformers.initialization import no_init_weights

from ..io import write_json

MARKER = "dsft_compression"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 2  # 2: config.json model_type replaced by the loading hint (1: the real model_type)
SPARSE_VALUES, SPARSE_MASK = ".sparse_values", ".sparse_mask"


class CompressedCheckpointError(ValueError):
    """A compressed checkpoint is missing pieces or does not match its config."""


def loading_hint(method: str, dense_copy: str | None = None) -> str:
    """The text written as config.json's model_type: what plain transformers shows when it refuses the directory."""
    hint = f"deepseek_sft-{method}-packed; load it with deepseek_sft.compress.load_compressed(dir)"
    return hint + (f" or read the dense copy {dense_copy}" if dense_copy else "")


def read_marker(path: str | os.PathLike) -> dict | None:
    """The `dsft_compression` entry of `path`/config.json, or None for an ordinary checkpoint."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text(encoding="utf-8")).get(MARKER)


def is_compressed(path: str | os.PathLike) -> bool:
    """True when `path` holds a checkpoint that only `load_compressed` can read."""
    return read_marker(path) is not None


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (the first name of a shared tensor is kept)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def pack_sparse(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept values, 1-bit keep-mask packed 8 per byte) of a tensor whose zeros are pruned weights."""
    mask = tensor != 0
    bits = np.packbits(mask.flatten().cpu().numpy())
    return tensor[mask].contiguous().cpu(), torch.from_numpy(bits)


def unpack_sparse(values: torch.Tensor, bits: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The dense tensor back from `pack_sparse` output."""
    numel = int(np.prod(shape))
    mask = torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).astype(bool)).reshape(shape)
    if int(mask.sum()) != values.numel():
        raise CompressedCheckpointError(
            f"sparse tensor: mask keeps {int(mask.sum())} values, file has {values.numel()}"
        )
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[mask] = values
    return dense


def save_compressed(
    model: PreTrainedModel,
    tokenizer,
    out_dir: str | os.PathLike,
    state: dict[str, torch.Tensor],
    marker: dict | None,
    extra_config: dict | None = None,
    dense_copy: str | None = None,
) -> None:
    """Write a checkpoint directory atomically: `state` as safetensors, config.json (+ marker, and the loading
    hint in place of model_type, see the module doc), generation config, tokenizer."""
    from ..base_model import staged_dir

    with staged_dir(out_dir) as tmp:
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        if marker is not None:
            real_type = config["model_type"]
            config[MARKER] = {"format_version": FORMAT_VERSION, "model_type": real_type, **marker}
            config["model_type"] = loading_hint(marker["method"], dense_copy)
        config.update(extra_config or {})
        write_json(tmp / "config.json", config)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def save_plain(
    model: PreTrainedModel, tokenizer, out_dir: str | os.PathLike, extra_config: dict | None = None
) -> None:
    """Write an ordinary checkpoint (save_pretrained: transformers' own tensor layout) atomically, with extra
    provenance keys in config.json."""
    from ..base_model import staged_dir

    with staged_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if extra_config:
            config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            write_json(tmp / "config.json", config | extra_config)


def sparse_state(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The model's unique state dict with the tensors `names` packed as values + bitmask."""
    state = unique_state_dict(model)
    for name in names:
        values, bits = pack_sparse(state.pop(name))
        state[name + SPARSE_VALUES], state[name + SPARSE_MASK] = values, bits
    return state


def _unpack_state(state: dict[str, torch.Tensor], tensors: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    for name, shape in tensors.items():
        try:
            values, bits = state.pop(name + SPARSE_VALUES), state.pop(name + SPARSE_MASK)
        except KeyError as e:
            raise CompressedCheckpointError(
                f"sparse tensor {name!r}: {e.args[0]!r} missing from {WEIGHTS}"
            ) from None
        state[name] = unpack_sparse(values, bits, shape)
    return state


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Names that share a tensor with an earlier name (saved once, so legitimately missing from the file)."""
    seen, tied = set(), set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and key in seen:
            tied.add(name)
        seen.add(key)
    return tied


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`; any missing (other than tied) or unexpected key is an error naming it."""
    result = model.load_state_dict(state, strict=False)
    missing = sorted(set(result.missing_keys) - _tied_names(model))
    if missing or result.unexpected_keys:
        raise CompressedCheckpointError(
            f"{source}: weights do not match the config: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {sorted(result.unexpected_keys)[:5]}"
        )


def _real_config(path: Path, marker: dict, trust_remote_code: bool):
    """The float model's config: config.json with the real model_type back and without the marker and the
    quantization_config (the skeleton is a plain float model; the marker says what to swap in)."""
    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    raw["model_type"] = marker.get("model_type", raw["model_type"])  # format 1 kept the real one in place
    for key in (MARKER, "quantization_config"):
        raw.pop(key, None)
    if raw["model_type"] in CONFIG_MAPPING:
        return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    # a remote-code architecture: its config class lives in the directory's .py files
    with tempfile.TemporaryDirectory(prefix="dsft-config-") as tmp:
        for code in path.glob("*.py"):
            shutil.copy(code, tmp)
        write_json(Path(tmp) / "config.json", raw)
        return AutoConfig.from_pretrained(tmp, trust_remote_code=trust_remote_code)


def load_compressed(
    path: str | os.PathLike,
    trust_remote_code: bool = False,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
    kernel: str | None = None,
) -> tuple[PreTrainedModel, object]:
    """Load a compressed checkpoint (see module doc) as a working model in eval mode, plus its tokenizer.

    Same signature as base_model.load_model_and_tokenizer (plus `kernel`, overriding a quantized variant's).
    """
    path = Path(path)
    marker = read_marker(path)
    if marker is None:
        raise CompressedCheckpointError(
            f"{path}/config.json: no {MARKER!r} entry; load it with from_pretrained"
        )
    if not (path / WEIGHTS).is_file():
        raise CompressedCheckpointError(f"{path}: {WEIGHTS} missing")
    config = _real_config(path, marker, trust_remote_code)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    options = {"attn_implementation": attn_implementation, "trust_remote_code": trust_remote_code}
    if dtype != "auto":
        options["dtype"] = dtype
    with no_init_weights():  # every weight is overwritten from the file (checked strictly below)
        model = AutoModelForCausalLM.from_config(config, **options)
    model.tie_weights()  # no_init_weights also skips tying; re-tie as the config says (no-op when untied)
    state = load_file(str(path / WEIGHTS))
    method = marker.get("method")
    if method == "quantize":
        from .quantize import apply_plan

        apply_plan(model, marker["plan"], kernel or marker.get("kernel", "dequant"), quantize=False)
    elif method == "prune":
        state = _unpack_state(state, marker["tensors"])
    else:
        raise CompressedCheckpointError(f"{path}/config.json: unknown {MARKER}.method {method!r}")
    load_state_strict(model, state, str(path / WEIGHTS))
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer
