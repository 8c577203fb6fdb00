"""Stage base_model: build the tiny DeepSeek-V3 default, or resolve a local/hub checkpoint, into models/base.

Every later stage (train, evaluate, compress, serve) reads models/base through `load_model_and_tokenizer`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    set_seed,
)

from .checkpoint_digest import DIGEST_FILE, digest_record
from .config.data import TaskSpec
from .config.model import TINY_DEFAULT, BaseModelParams, TinyDeepseekParams
from .sft_data import example_lengths
from .tokenizer_build import (
    answer_vocabulary,
    chars_per_token,
    ensure_chat_ready,
    train_bpe_tokenizer,
    training_texts,
)

log = logging.getLogger(__name__)

SourceKind = Literal["tiny", "local", "gguf", "hub"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# Only safetensors weights are ever loaded (use_safetensors=True), so pickled formats are not even fetched.
_HUB_IGNORE = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "original/*"]


class ModelSourceError(ValueError):
    """base_model.name_or_path / revision do not name a usable checkpoint."""


def source_kind(name_or_path: str) -> SourceKind:
    """Whether `name_or_path` is the embedded tiny default, a local directory, a local GGUF file or a hub id."""
    if name_or_path == TINY_DEFAULT:
        return "tiny"
    if Path(name_or_path).is_dir():
        return "local"
    if Path(name_or_path).is_file() and name_or_path.endswith(".gguf"):
        return "gguf"
    if Path(name_or_path).exists():
        raise ModelSourceError(
            f"base_model.name_or_path={name_or_path!r} is a file but not a .gguf file; expected a checkpoint "
            "directory (config.json + *.safetensors + tokenizer) or a GGUF file"
        )
    if not _HUB_ID.match(name_or_path):
        raise ModelSourceError(
            f"base_model.name_or_path={name_or_path!r} is neither {TINY_DEFAULT!r}, an existing directory, "
            "nor a hub id like 'deepseek-ai/DeepSeek-V2-Lite'"
        )
    return "hub"


def check_revision(name_or_path: str, revision: str | None) -> str:
    """A hub id must come with a pinned 40-hex commit; branches and tags move, so runs would not reproduce."""
    if revision is None:
        raise ModelSourceError(
            f"base_model.name_or_path={name_or_path!r} is not a local directory, so it is read as a hub id, and "
            "hub ids need base_model.revision: the 40-hex commit to pin (see the repo's 'Files and versions' page)"
        )
    if not _COMMIT.match(revision):
        raise ModelSourceError(
            f"base_model.revision={revision!r}: expected a 40-hex commit hash (branches and tags can move)"
        )
    return revision


def tiny_config(params: TinyDeepseekParams, tokenizer: PreTrainedTokenizerBase) -> DeepseekV3Config:
    """The DeepseekV3Config of the tiny default (MLA attention, routed + shared experts, dense first layers)."""
    fields = params.model_dump(exclude={"tokenizer", "rope_theta"})
    return DeepseekV3Config(
        **fields,
        vocab_size=len(tokenizer),
        num_key_value_heads=params.num_attention_heads,
        rope_parameters={"rope_type": "default", "rope_theta": params.rope_theta},
        # transformers' DeepseekV3ForCausalLM has no multi-token-prediction modules; 0 says so in the config.
        num_mtp_layers=0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    )


def build_tiny(
    params: TinyDeepseekParams, train_records: list[dict], tasks: dict[str, TaskSpec], seed: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Train the tokenizer on the train split and initialise the tiny DeepSeek-V3 model, all seeded."""
    set_seed(seed)
    tokenizer = train_bpe_tokenizer(
        training_texts(train_records, tasks),
        vocab_size=params.tokenizer.vocab_size,
        min_frequency=params.tokenizer.min_frequency,
        model_max_length=params.max_position_embeddings,
        split_cjk=params.tokenizer.split_cjk,
        whole_words=answer_vocabulary(tasks) if params.tokenizer.label_tokens else (),
    )
    set_seed(seed)  # weights must not depend on how much randomness tokenizer training consumed
    model = DeepseekV3ForCausalLM(tiny_config(params, tokenizer)).to(torch.float32).eval()
    return model, tokenizer


def generation_config_for(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Greedy decoding that stops at EOS: the default every later stage starts from."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )


def expert_counts(config) -> tuple[int | None, int | None]:
    """(routed experts per MoE layer, experts chosen per token) from a config, or (None, None) for dense models."""
    n = next(
        (
            getattr(config, k)
            for k in ("n_routed_experts", "num_local_experts", "num_experts")
            if hasattr(config, k)
        ),
        None,
    )
    return n, getattr(config, "num_experts_per_tok", None)


def count_parameters(model: torch.nn.Module, config) -> dict[str, int]:
    """Total parameters and those active per token (only top-k of the routed experts run for a token)."""
    total = sum(p.numel() for p in model.parameters())
    routed = sum(
        p.numel()
        for name, p in model.named_parameters()
        if ".experts." in name and "shared_experts" not in name
    )
    n_experts, top_k = expert_counts(config)
    active = total - routed + (routed * top_k // n_experts if n_experts and top_k else routed)
    return {
        "params_total": int(total),
        "params_active_per_token": int(active),
        "params_routed_experts": int(routed),
    }


def count_parameters_from_config(path: str | os.PathLike, trust_remote_code: bool = False) -> dict[str, int]:
    """Parameter counts of a checkpoint without loading its weights (the model is built on the meta device)."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return count_parameters(model, config)


@contextmanager
def staged_dir(out_dir: str | os.PathLike):
    """Yield a temporary directory beside `out_dir` that replaces it only if the block succeeds."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        _normal_permissions(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _normal_permissions(root: Path) -> None:
    # mkdtemp (and transformers' shard writer) create owner-only modes; give the usual umask-based ones.
    # Hard-linked files are skipped: their mode is shared with the user's source checkpoint.
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            os.chmod(path, 0o777 & ~umask)
        elif path.stat().st_nlink == 1:
            os.chmod(path, 0o666 & ~umask)


def save_base(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> None:
    """Write model (safetensors), tokenizer and generation config to `out_dir`, atomically."""
    model.generation_config = generation_config_for(tokenizer)
    with staged_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _link_or_copy(src: str, dst: str) -> None:
    # Hard-linking the weights makes "copying" a 60 GB checkpoint free on the same filesystem. Only weights are
    # linked: they are never rewritten, while a linked tokenizer file rewritten here would change the source too.
    if src.endswith(".safetensors"):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def copy_local(src: str | os.PathLike, dest: Path) -> None:
    """Copy a local checkpoint directory into `dest` (weights hard-linked where possible), skipping VCS data."""
    shutil.copytree(src, dest, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(".git", ".cache"))


def download_hub(repo_id: str, revision: str, dest: Path) -> None:
    """Download the safetensors checkpoint `repo_id`@`revision` into `dest` (huggingface_hub.snapshot_download)."""
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id, revision=revision, local_dir=dest, ignore_patterns=_HUB_IGNORE)
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # download bookkeeping, not part of the model


def gguf_architecture(path: str | os.PathLike) -> str:
    """The `general.architecture` a GGUF file declares (llama.cpp's name, e.g. llama, qwen2), read from its header."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields["general.architecture"]
    except (KeyError, ValueError, OSError) as err:
        raise ModelSourceError(f"{path}: not a readable GGUF file ({err})") from err
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def check_gguf_supported(path: str | os.PathLike) -> str:
    """Refuse a GGUF whose architecture transformers cannot dequantize, listing the ones it can."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_architecture(path)
    # transformers maps a few llama.cpp names onto its own (qwen2moe -> qwen2_moe); accept either spelling.
    if (
        arch not in GGUF_SUPPORTED_ARCHITECTURES
        and arch.replace("moe", "_moe") not in GGUF_SUPPORTED_ARCHITECTURES
    ):
        raise ModelSourceError(
            f"{path}: GGUF architecture {arch!r} cannot be read by transformers' GGUF loader; it reads "
            f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}. Convert the original checkpoint instead "
            "(base_model.name_or_path = its directory or hub id)"
        )
    return arch


def import_gguf(path: str | os.PathLike, dest: Path) -> None:
    """Dequantize a GGUF file (transformers' `gguf_file=` loader) into a float32 safetensors checkpoint at `dest`,
    with the tokenizer and chat template the file carries.

    This is how a user starts from what ollama or llama.cpp already downloaded. Weights are rebuilt in a plain
    model: transformers marks a GGUF-loaded model as quantized and refuses to save it, although its tensors are
    already dequantized.
    """
    path = Path(path)
    check_gguf_supported(path)
    log.info("dequantizing GGUF %s (architecture %s) to float32 safetensors", path, gguf_architecture(path))
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def check_checkpoint(path: Path, origin: str) -> None:
    """A usable checkpoint has config.json, safetensors weights and a tokenizer."""
    problems = []
    if not (path / "config.json").is_file():
        problems.append("no config.json")
    if not any(path.glob("*.safetensors")):
        problems.append("no *.safetensors weights (pickled .bin weights are refused)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        problems.append("no tokenizer files")
    if problems:
        raise ModelSourceError(f"{origin}: not a usable checkpoint: {'; '.join(problems)}")


def resolve_external(section: BaseModelParams, kind: SourceKind, out_dir: str | os.PathLike) -> list[str]:
    """Materialise a local directory, GGUF file or hub checkpoint in `out_dir` as a float safetensors checkpoint;
    return what was added to its tokenizer."""
    name = section.name_or_path
    if kind == "hub":
        check_revision(name, section.revision)
    with staged_dir(out_dir) as tmp:
        target = tmp / "model"
        if kind == "local":
            copy_local(name, target)
        elif kind == "gguf":
            import_gguf(name, target)
        else:
            download_hub(name, section.revision, target)
        check_checkpoint(target, name)
        tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=section.trust_remote_code)
        added = ensure_chat_ready(tokenizer)
        if added:
            tokenizer.save_pretrained(target)
        for item in target.iterdir():
            os.replace(item, tmp / item.name)
        target.rmdir()
    return added


def build_base_model(
    section: BaseModelParams,
    seed: int,
    tasks: dict[str, TaskSpec],
    train_records: list[dict],
    val_records: list[dict],
    out_dir: str | os.PathLike,
) -> tuple[dict[str, float], list[tuple[str, int]]]:
    """Run the stage: fill `out_dir`, then return flat metrics and (task, tokens) lengths of the val examples."""
    start = time.perf_counter()
    kind = source_kind(section.name_or_path)
    metrics: dict[str, float] = {"source_tiny": int(kind == "tiny"), "source_local": int(kind == "local")}
    metrics["source_hub"] = int(kind == "hub")
    metrics["source_gguf"] = int(kind == "gguf")
    if kind == "tiny":
        log.info("building %s: training the tokenizer on %d train records", TINY_DEFAULT, len(train_records))
        model, tokenizer = build_tiny(section.tiny, train_records, tasks, seed)
        save_base(model, tokenizer, out_dir)
        metrics |= count_parameters(model, model.config)
        metrics |= _layer_counts(model.config)
    else:
        log.info("resolving %s checkpoint %s into %s", kind, section.name_or_path, out_dir)
        added = resolve_external(section, kind, out_dir)
        metrics |= {"tokenizer_added_chat_template": int("chat_template" in added)}
        metrics |= {"tokenizer_added_pad_token": int("pad_token" in added)}
        metrics |= count_parameters_from_config(out_dir, section.trust_remote_code)
    write_weights_digest(out_dir)
    write_provenance(out_dir, section.name_or_path, kind)
    warn_if_untracked_source(section.name_or_path, kind)
    tokenizer = AutoTokenizer.from_pretrained(out_dir, trust_remote_code=section.trust_remote_code)
    lengths = example_lengths(val_records, tasks, tokenizer)
    metrics |= {
        "vocab_size": len(tokenizer),
        "chars_per_token_val": round(chars_per_token(tokenizer, [r["text"] for r in val_records]), 4),
        "val_example_tokens_p95": _percentile([n for _, n in lengths], 0.95),
        "val_example_tokens_max": max((n for _, n in lengths), default=0),
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    return metrics, lengths


# What models/base was built from; {"pretrained": false} marks the tiny default's random initial weights.
PROVENANCE_FILE = "provenance.json"


def write_provenance(out_dir: str | os.PathLike, name_or_path: str, kind: SourceKind) -> None:
    """Record the source of models/base, so reports can tell a pretrained base from random weights."""
    record = {"source": kind, "name_or_path": name_or_path, "pretrained": kind != "tiny"}
    (Path(out_dir) / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


# The base_model stage depends on this folder (dvc.yaml), so a checkpoint edited in place here re-runs it.
TRACKED_SOURCE_DIR = Path("models/external")


def write_weights_digest(out_dir: str | os.PathLike) -> None:
    """Record the content digest of models/base's weights once, so train's resume fingerprint need not re-hash."""
    record = digest_record(out_dir)
    (Path(out_dir) / DIGEST_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def warn_if_untracked_source(name_or_path: str, kind: SourceKind) -> None:
    """A local checkpoint outside models/external is no DVC dependency: editing it in place would go unseen."""
    if kind not in ("local", "gguf"):
        return
    source = Path(name_or_path).resolve()
    if not source.is_relative_to(TRACKED_SOURCE_DIR.resolve()):
        log.warning(
            "base_model.name_or_path=%s lies outside %s/, which is what dvc tracks: an in-place change of it will "
            "not re-run base_model. Move or link it under %s/ (or run `dvc repro -f base_model` after a change)",
            name_or_path,
            TRACKED_SOURCE_DIR,
            TRACKED_SOURCE_DIR,
        )


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0


def _layer_counts(config) -> dict[str, int]:
    dense = min(config.first_k_dense_replace, config.num_hidden_layers)
    return {"layers_dense": dense, "layers_moe": config.num_hidden_layers - dense}


def load_model_and_tokenizer(
    path: str | os.PathLike,
    trust_remote_code: bool = False,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer (safetensors only; remote code only when asked); model in eval mode.

    int8 and pruned variants (models/compressed/<variant>) are stored in a packed format: they load through
    the compress package's reader, so evaluate, serve and bench read every variant with this one call.
    """
    from .compress.storage import is_compressed, load_compressed  # lazy: compress imports this module

    if is_compressed(path):
        return load_compressed(path, trust_remote_code, dtype, attn_implementation)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        dtype=dtype,
        attn_implementation=attn_implementation,
    )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def write_reports(metrics: dict, lengths: list[tuple[str, int]], reports_dir: str | os.PathLike) -> None:
    """metrics.json plus the histogram of val example lengths (PNG), which guides train's max_length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    from .io import atomic_path, write_metrics

    reports_dir = Path(reports_dir)
    write_metrics(reports_dir / "metrics.json", metrics)
    frame = pd.DataFrame(lengths, columns=["task", "tokens"])
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(frame):
        sns.histplot(frame, x="tokens", hue="task", element="step", bins=40, ax=ax)
    ax.set(title="val examples: prompt + response tokens", xlabel="tokens", ylabel="examples")
    fig.tight_layout()
    with atomic_path(reports_dir / "example_tokens.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
