"""Shared test fixtures: the repository root and a writable copy of params.yaml."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    """The repository root (tests run offline against its files)."""
    return REPO


@pytest.fixture
def params_copy(tmp_path, monkeypatch) -> Path:
    """A copy of params.yaml in tmp_path, selected through DSFT_PARAMS for the duration of the test."""
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    monkeypatch.setenv("DSFT_PARAMS", str(path))
    return path


def edit_params(path: Path, updates: dict) -> None:
    """Set dotted keys (e.g. {"fetch.synthetic.num_records": 200}) in a params file."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    for dotted, value in updates.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")


def copy_repo(dst: Path) -> Path:
    """Copy the git-tracked shape of the repository (no data, models, caches or venv) to `dst`."""
    ignore = shutil.ignore_patterns(
        ".venv",
        ".git",
        "dvc-storage",
        "__pycache__",
        ".pytest_cache",
        ".ruff_cache",
        "dvclive",
        "*.egg-info",
        "tmp",
        "cache",
    )
    shutil.copytree(REPO, dst, ignore=ignore, dirs_exist_ok=True)
    for generated in ("data", "models", "reports"):
        for path in (dst / generated).rglob("*"):
            if path.is_file() and path.name not in ("README.md", ".gitkeep"):
                path.unlink()
    return dst


# --- one tiny DeepSeek-V3 for the tests -------------------------------------------------------------------
# One shape for every test that needs a model: MLA attention, layer 0 dense, then MoE layers of 4 routed experts
# (top-2, in 2 groups) + 1 shared expert. Small enough to build in well under a second; a test that needs
# another size says only what differs (overrides). Imports stay inside the functions so that collecting tests
# that need no model does not load torch and transformers.
TINY_V3_SHAPE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
}


def tiny_params(**overrides):
    """TinyDeepseekParams of the test shape (built through base_model, as the pipeline does): 600 BPE tokens."""
    from deepseek_sft.config.model import TinyDeepseekParams

    fields = TINY_V3_SHAPE | {
        "max_position_embeddings": 512,
        "tokenizer": {"vocab_size": 600, "min_frequency": 2},
    }
    return TinyDeepseekParams(**(fields | overrides))


def tiny_v3_config(**overrides):
    """The same shape as a bare transformers DeepseekV3Config (no tokenizer), for tests that build modules."""
    from transformers import DeepseekV3Config

    fields = TINY_V3_SHAPE | {
        "vocab_size": 64,
        "first_k_dense_replace": 1,
        "n_shared_experts": 1,
        "num_mtp_layers": 0,  # transformers' DeepseekV3ForCausalLM has no multi-token-prediction modules
    }
    fields |= overrides
    fields.setdefault("num_key_value_heads", fields["num_attention_heads"])
    return DeepseekV3Config(**fields)


def build_tiny_checkpoint(
    out_dir: Path, train_records: list[dict], tasks: dict, seed: int = 0, params=None
) -> Path:
    """A randomly initialised tiny model + its BPE tokenizer and chat template, saved as stage base_model does."""
    from deepseek_sft import base_model

    model, tokenizer = base_model.build_tiny(params or tiny_params(), train_records, tasks, seed)
    base_model.save_base(model, tokenizer, out_dir)
    return out_dir


def synthetic_processed_records(n: int, seed: int, tasks: dict) -> list[dict]:
    """Processed-split records (the data contract) from the synthetic generator's ground truth."""
    from deepseek_sft.fetch.synthetic import generate, layer_spec

    raw = generate(n, seed, {"ann_a": 0.0, "ann_b": 0.0, "ann_c": 0.0}, layer_spec(tasks))
    out = []
    for r in raw:
        truth = r["meta"]["truth"]
        entities = [s | {"text": r["text"][s["start"] : s["end"]]} for s in truth["entities"]]
        out.append(
            {
                "id": f"{r['id']}-{seed}",
                "text": r["text"],
                "intent": truth["intent"],
                "compliance": truth["compliance"],
                "entities": entities,
            }
        )
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """One saved tiny checkpoint for the session (params.yaml's tasks, 200 synthetic train records, seed 0)."""
    from deepseek_sft.config import load_section

    tasks = load_section("evaluate", REPO / "params.yaml").tasks
    train = synthetic_processed_records(200, seed=1, tasks=tasks)
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "base", train, tasks, seed=0)
