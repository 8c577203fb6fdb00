"""Stage base_model: the tiny DeepSeek-V3 default, local/hub sources, saving and loading."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import DeepseekV3ForCausalLM

import deepseek_sft.base_model as bm
from deepseek_sft.config import ParamsError, load_section
from deepseek_sft.config.model import TINY_DEFAULT, BaseModelParams, TinyDeepseekParams
from deepseek_sft.io import write_jsonl
from deepseek_sft.tokenizer_build import ASSISTANT_TOKEN, BOS_TOKEN, EOS_TOKEN, USER_TOKEN

from conftest import edit_params

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEST_ONLY = "龘靐齉"  # occurs (many times) only in val/test text
INTENTS = ["card_loss", "transfer", "loan_application", "balance_inquiry"]
BANKS = ["招商银行", "工商银行", "建设银行", "平安银行", "中国银行"]
ASKS = ["我的卡丢了请帮我挂失", "我想给家人转账", "我想申请一笔贷款", "帮我查一下余额", "这笔转账为什么失败"]
# free-text filler, so the corpus is varied enough to fill the default 6000-token vocabulary as real data does
POOL = (
    "的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会家可下而过天去能对小多"
)


def _record(i: int, rng: random.Random, extra: str = "") -> dict:
    bank, money = rng.choice(BANKS), f"{rng.randint(1, 500) * 10}元"
    filler = "".join(rng.choice(POOL) for _ in range(24))
    text = f"{bank}客服你好，{rng.choice(ASKS)}，金额{money}。{filler}{extra}"
    entities = [
        {"start": 0, "end": len(bank), "type": "ORG", "text": bank},
        {"start": text.index(money), "end": text.index(money) + len(money), "type": "MONEY", "text": money},
    ]
    intent = rng.choice(INTENTS)
    return {
        "id": f"t-{i:04d}",
        "text": text,
        "intent": intent,
        "compliance": "compliant",
        "entities": entities,
    }


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    rng = random.Random(11)
    train = [_record(i, rng) for i in range(600)]
    val = [_record(1000 + i, rng, extra=TEST_ONLY * 3) for i in range(40)]
    return {"train": train, "val": val}


@pytest.fixture(scope="module")
def tasks():
    return load_section("base_model").tasks


@pytest.fixture(scope="module")
def tiny(splits, tasks):
    return bm.build_tiny(TinyDeepseekParams(), splits["train"], tasks, seed=42)


@pytest.fixture(scope="module")
def saved_tiny(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "base"
    bm.save_base(*tiny, out)
    return out


def test_tiny_default_is_a_small_deepseek_v3_moe(tiny):
    model, tokenizer = tiny
    counts = bm.count_parameters(model, model.config)
    assert 5_000_000 <= counts["params_total"] <= 10_000_000
    assert counts["params_active_per_token"] < counts["params_total"]
    assert isinstance(model, DeepseekV3ForCausalLM) and model.config.model_type == "deepseek_v3"
    cfg = model.config
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim) == (128, 64, 16)
    layers = model.model.layers
    assert type(layers[0].mlp).__name__ == "DeepseekV3MLP"  # first_k_dense_replace=1
    for layer in layers[1:]:
        assert type(layer.mlp).__name__ == "DeepseekV3MoE"
        assert layer.mlp.experts.gate_up_proj.shape[0] == 8 and layer.mlp.gate.top_k == 2
        assert layer.mlp.shared_experts.down_proj.in_features == 128  # one shared expert
    # the 6 routed experts not chosen for a token (of 8, in 3 MoE layers) are exactly the inactive parameters
    expert = 3 * 256 * 128
    assert counts["params_total"] - counts["params_active_per_token"] == 3 * 6 * expert
    assert cfg.vocab_size == len(tokenizer) and tokenizer.eos_token == EOS_TOKEN


def test_tokenizer_learned_only_from_train_text(tiny, splits):
    _, tokenizer = tiny
    learned = [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.get_vocab()]
    assert not any(ch in piece for piece in learned for ch in TEST_ONLY)
    # a val-only character falls apart into its 3 UTF-8 bytes; a frequent train phrase is one token (not an
    # entity: tagged answers split entities into characters, so their merges are rarer)
    assert len(tokenizer("龘", add_special_tokens=False)["input_ids"]) == 3
    assert len(tokenizer("我的卡丢了", add_special_tokens=False)["input_ids"]) == 1
    assert (
        tokenizer("挂失")["input_ids"][0] == tokenizer.bos_token_id
    )  # plain encode adds BOS, like DeepSeek's


def test_chat_template_renders_deepseek_v3_format(tiny):
    _, tokenizer = tiny
    messages = [
        {"role": "system", "content": "你是银行客服。"},
        {"role": "user", "content": "我的卡丢了"},
        {"role": "assistant", "content": "card_loss"},
        {"role": "user", "content": "谢谢"},
    ]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        f"{BOS_TOKEN}你是银行客服。{USER_TOKEN}我的卡丢了{ASSISTANT_TOKEN}card_loss{EOS_TOKEN}"
        f"{USER_TOKEN}谢谢{ASSISTANT_TOKEN}"
    )
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.convert_tokens_to_ids(ASSISTANT_TOKEN)


def test_save_and_reload_give_identical_logits(tiny, saved_tiny):
    model, tokenizer = tiny
    assert (saved_tiny / "model.safetensors").is_file() and not list(saved_tiny.glob("*.bin"))
    assert (saved_tiny / "generation_config.json").is_file() and (saved_tiny / "tokenizer.json").is_file()
    loaded, loaded_tok = bm.load_model_and_tokenizer(saved_tiny)
    assert not loaded.training and loaded.dtype == torch.float32
    ids = torch.tensor([tokenizer("招商银行客服你好，我想申请一笔贷款")["input_ids"]])
    assert loaded_tok("招商银行客服你好")["input_ids"] == tokenizer("招商银行客服你好")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded.generation_config.eos_token_id == tokenizer.eos_token_id
    assert loaded.generation_config.do_sample is False


def test_build_is_deterministic(tiny, splits, tasks):
    model, tokenizer = tiny
    again_model, again_tok = bm.build_tiny(TinyDeepseekParams(), splits["train"], tasks, seed=42)
    assert again_tok.get_vocab() == tokenizer.get_vocab()
    for (name, p), q in zip(model.state_dict().items(), again_model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    other, _ = bm.build_tiny(TinyDeepseekParams(), splits["train"], tasks, seed=43)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)


def test_local_directory_source_is_copied_and_made_chat_ready(saved_tiny, splits, tasks, tmp_path):
    source = tmp_path / "my_checkpoint"
    shutil.copytree(saved_tiny, source)
    (source / "chat_template.jinja").unlink()  # a base checkpoint without a chat template or pad token
    config_path = source / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("pad_token")
    config_path.write_text(json.dumps(config))

    section = BaseModelParams(name_or_path=str(source))
    out = tmp_path / "models" / "base"
    metrics, lengths = bm.build_base_model(section, 42, tasks, splits["train"], splits["val"], out)
    assert metrics["source_local"] == 1 and metrics["source_tiny"] == 0
    assert metrics["tokenizer_added_chat_template"] == 1 and metrics["tokenizer_added_pad_token"] == 1
    assert 5_000_000 <= metrics["params_total"] <= 10_000_000  # counted on the meta device
    assert len(lengths) == 3 * len(splits["val"])
    model, tokenizer = bm.load_model_and_tokenizer(out)
    assert tokenizer.chat_template and tokenizer.pad_token == tokenizer.eos_token
    # the source is left untouched
    assert "chat_template.jinja" not in {p.name for p in source.iterdir()}
    assert "pad_token" not in json.loads(config_path.read_text())
    original, _ = bm.load_model_and_tokenizer(saved_tiny)
    torch.testing.assert_close(model.lm_head.weight, original.lm_head.weight, rtol=0, atol=0)


def test_hub_id_needs_a_pinned_revision(tmp_path):
    with pytest.raises(bm.ModelSourceError, match=r"hub ids need base_model\.revision"):
        bm.resolve_external(
            BaseModelParams(name_or_path="deepseek-ai/DeepSeek-V2-Lite"), "hub", tmp_path / "b"
        )
    with pytest.raises(bm.ModelSourceError, match="40-hex commit"):
        bm.check_revision("deepseek-ai/DeepSeek-V2-Lite", "main")
    assert not (tmp_path / "b").exists()


def test_hub_path_downloads_pinned_revision_into_models_base(saved_tiny, tmp_path, monkeypatch):
    """The hub code path, offline: snapshot_download is replaced by a copy of a local checkpoint."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []

    def fake_snapshot_download(repo_id, revision, local_dir, ignore_patterns):
        calls.append((repo_id, revision, ignore_patterns))
        shutil.copytree(saved_tiny, local_dir)
        (local_dir / ".cache").mkdir()

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    section = BaseModelParams(name_or_path="someone/tiny-v3", revision=COMMIT)
    out = tmp_path / "base"
    assert bm.source_kind(section.name_or_path) == "hub"
    bm.resolve_external(section, "hub", out)
    assert calls == [("someone/tiny-v3", COMMIT, bm._HUB_IGNORE)] and "*.bin" in bm._HUB_IGNORE
    assert (out / "model.safetensors").is_file() and not (out / ".cache").exists()


def test_pickled_or_incomplete_checkpoints_are_refused(saved_tiny, tmp_path):
    source = tmp_path / "pickled"
    shutil.copytree(saved_tiny, source)
    (source / "model.safetensors").rename(source / "pytorch_model.bin")
    out = tmp_path / "out"
    with pytest.raises(bm.ModelSourceError, match=r"no \*\.safetensors weights"):
        bm.resolve_external(BaseModelParams(name_or_path=str(source)), "local", out)
    assert not out.exists()  # nothing half-written


def test_bad_sources_are_named(tmp_path):
    a_file = tmp_path / "weights.safetensors"
    a_file.write_bytes(b"")
    with pytest.raises(bm.ModelSourceError, match="is a file"):
        bm.source_kind(str(a_file))
    with pytest.raises(bm.ModelSourceError, match="neither"):
        bm.source_kind("not a model!")
    assert bm.source_kind(TINY_DEFAULT) == "tiny" and bm.source_kind(str(tmp_path)) == "local"


def test_trust_remote_code_is_off_by_default(monkeypatch, tmp_path):
    seen = {}

    class Fake:
        def eval(self):
            return self

    def fake_model(path, **kwargs):
        seen["model"] = kwargs
        return Fake()

    def fake_tokenizer(path, **kwargs):
        seen["tokenizer"] = kwargs
        return object()

    monkeypatch.setattr(bm.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(bm.AutoTokenizer, "from_pretrained", fake_tokenizer)
    bm.load_model_and_tokenizer(tmp_path)
    assert seen["model"]["trust_remote_code"] is False and seen["tokenizer"]["trust_remote_code"] is False
    assert seen["model"]["use_safetensors"] is True and seen["model"]["dtype"] is torch.float32
    assert BaseModelParams().trust_remote_code is False


def test_params_schema_rejects_bad_shapes(params_copy):
    with pytest.raises(ValidationError, match="divisible by n_group"):
        TinyDeepseekParams(n_routed_experts=6, n_group=4)
    with pytest.raises(ValidationError, match="must be even"):
        TinyDeepseekParams(qk_rope_head_dim=15)
    edit_params(params_copy, {"base_model.tiny.hidden_sise": 128})
    with pytest.raises(ParamsError, match=r"base_model\.tiny\.hidden_sise: unknown key"):
        load_section("base_model")


@pytest.mark.slow
def test_script_builds_models_base_and_reports(splits, params_copy, tmp_path):
    """Smoke test through the real script (as dvc.yaml runs it), with the default params, offline."""
    write_jsonl(tmp_path / "train.jsonl", splits["train"])
    write_jsonl(tmp_path / "val.jsonl", splits["val"])
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "base_model.py"),
        "--train",
        "train.jsonl",
        "--val",
        "val.jsonl",
    ]
    cmd += ["--out", "models/base", "--reports", "reports/base_model"]
    env = {
        "DSFT_PARAMS": str(params_copy),
        "PATH": "/usr/bin:/bin",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "2",
    }
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    reports = tmp_path / "reports" / "base_model"
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["source_tiny"] == 1 and metrics["layers_dense"] == 1 and metrics["layers_moe"] == 3
    assert 3_000_000 <= metrics["params_total"] <= 10_000_000
    # split_cjk: at most one character per token (val-only characters take several byte tokens)
    assert 0.5 < metrics["chars_per_token_val"] < 1.2 and metrics["vocab_size"] <= 3000 + 64
    assert metrics["val_example_tokens_max"] >= metrics["val_example_tokens_p95"] > 0
    assert (reports / "example_tokens.png").stat().st_size > 1000
    config = json.loads((tmp_path / "models" / "base" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["n_routed_experts"] == 8


def test_split_cjk_tokenizes_an_entity_alike_in_text_and_answer():
    from deepseek_sft.tokenizer_build import train_bpe_tokenizer

    texts = ["帮我给史永转一千元", "史永的卡丢了", "给史永开户", "PER:史永"] * 20
    tokenizer = train_bpe_tokenizer(
        texts, vocab_size=400, min_frequency=2, model_max_length=64, split_cjk=True
    )
    in_text = tokenizer("帮我给史永转一千元", add_special_tokens=False)["input_ids"]
    entity = tokenizer("史永", add_special_tokens=False)["input_ids"]
    assert len(entity) == 2  # one token per character: no merge crosses a CJK character
    assert any(in_text[i : i + 2] == entity for i in range(len(in_text) - 1))
    assert tokenizer("10,000元", add_special_tokens=False)["input_ids"].__len__() == 7


def test_labels_entity_types_and_marks_are_single_tokens(tasks):
    from deepseek_sft.tokenizer_build import answer_vocabulary, train_bpe_tokenizer

    inline = {**tasks, "entities": tasks["entities"].model_copy(update={"answer_format": "inline"})}
    assert {"⟦PER:", "⟧"} <= set(answer_vocabulary(inline))
    words = answer_vocabulary(
        {**tasks, "entities": tasks["entities"].model_copy(update={"answer_format": "tagged"})}
    )
    assert {"card_activation", "card_loss", "violation", "PER", "⟨PER⟩", "⟨+⟩"} <= set(words)
    assert len(words) == len(set(words))
    texts = ["帮我激活card_activation卡", "PER:史永"] * 20
    tokenizer = train_bpe_tokenizer(texts, 300, 2, 64, split_cjk=True, whole_words=words)
    for word in words:
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    # a label inside running text is still the one token, and decoding gives the text back
    ids = tokenizer("我要card_activation了", add_special_tokens=False)["input_ids"]
    assert "card_activation" in tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.decode(ids) == "我要card_activation了"
