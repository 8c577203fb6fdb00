"""Stage train: params, setup, checkpoints, in-process runs on tiny V3 / V2 / Llama models and DeepSpeed runs
(ZeRO-2 and ZeRO-3 offload, 2 CPU processes, kill + resume) through the real script and launcher."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from deepseek_sft.config import ParamsError, load_section
from deepseek_sft.config.train import TrainParams
from deepseek_sft.io import write_json, write_jsonl
from deepseek_sft.tokenizer_build import train_bpe_tokenizer, training_texts
from deepseek_sft.train import TrainPaths, run_training
from deepseek_sft.train import checkpoints as ckpt
from deepseek_sft.train.setup import load_deepspeed_config, resolve_precision, set_dropout
from deepseek_sft.train.varlen import VARLEN_ATTENTION

from conftest import edit_params

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
BANKS = ["招商银行", "工商银行", "建设银行", "平安银行"]
ASKS = {
    "card_loss": "我的卡丢了请帮我挂失",
    "transfer": "我想给家人转账",
    "balance_inquiry": "帮我查一下余额",
}


# -- tiny data and models (shared with test_train_moe.py) -----------------------------------------------
def make_records(n: int, seed: int) -> list[dict]:
    """Processed records (text, intent, compliance, entities) a tiny model can learn in a few steps."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        bank, intent = rng.choice(BANKS), rng.choice(sorted(ASKS))
        money = f"{rng.randint(1, 99) * 100}元"
        text = f"{bank}你好，{ASKS[intent]}，金额{money}。"
        start = text.index(money)
        out.append(
            {
                "id": f"r-{seed}-{i:04d}",
                "text": text,
                "intent": intent,
                "compliance": rng.choice(["compliant", "violation"]),
                "entities": [
                    {"start": 0, "end": len(bank), "type": "ORG", "text": bank},
                    {"start": start, "end": start + len(money), "type": "MONEY", "text": money},
                ],
            }
        )
    return out


def v3_config(vocab_size: int, layers: int = 2, **kw) -> DeepseekV3Config:
    """A tiny DeepSeek-V3 (MLA + 4 routed experts top-2 + 1 shared; layer 0 dense)."""
    return DeepseekV3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=layers,
        first_k_dense_replace=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        max_position_embeddings=128,
        **kw,
    )


def v2_config(vocab_size: int, **kw) -> DeepseekV2Config:
    """A tiny DeepSeek-V2 (softmax router, greedy top-2 of 4 experts)."""
    return DeepseekV2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        max_position_embeddings=128,
        **kw,
    )


def llama_config(vocab_size: int, **kw) -> LlamaConfig:
    """A tiny dense Llama-architecture model."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **kw,
    )


ARCHS = {
    "v3": (v3_config, DeepseekV3ForCausalLM),
    "v2": (v2_config, DeepseekV2ForCausalLM),
    "llama": (llama_config, LlamaForCausalLM),
}


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> dict[str, Path]:
    """train.jsonl / val.jsonl of tiny processed records."""
    root = tmp_path_factory.mktemp("data")
    write_jsonl(root / "train.jsonl", make_records(96, seed=1))
    write_jsonl(root / "val.jsonl", make_records(24, seed=2))
    return {"train": root / "train.jsonl", "val": root / "val.jsonl"}


@pytest.fixture(scope="session")
def base_models(tmp_path_factory, train_data) -> dict[str, Path]:
    """Tiny V3, V2 and Llama checkpoints sharing one BPE tokenizer with the chat template."""
    from deepseek_sft.io import read_jsonl

    tasks = load_section("fetch", REPO / "params.yaml").tasks
    tokenizer = train_bpe_tokenizer(
        training_texts(read_jsonl(train_data["train"]), tasks),
        vocab_size=400,
        min_frequency=1,
        model_max_length=128,
    )
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    out = {}
    for name, (make_config, cls) in ARCHS.items():
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp("models") / name
        cls(make_config(len(tokenizer), **ids)).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[name] = path
    return out


TINY_TRAIN = {
    "learning_rate": 5.0e-3,
    "warmup_steps": 0,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "max_steps": 6,
    "logging_steps": 2,
    "save_steps": 3,
    "max_length": 96,
    "deepspeed": None,
    "num_processes": 1,
    "threads_per_process": 2,
    "lr_scheduler_type": "constant",
}


def write_params(tmp_path: Path, **train) -> Path:
    """A params.yaml whose train section is TINY_TRAIN overridden by `train` (dotted keys allowed)."""
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    updates = {f"train.{k}": v for k, v in {**TINY_TRAIN, **train}.items()}
    edit_params(path, updates)
    return path


def paths_for(tmp_path: Path, base: Path, data: dict[str, Path]) -> TrainPaths:
    return TrainPaths(
        base, data["train"], data["val"], tmp_path / "sft", tmp_path / "checkpoints", tmp_path / "reports"
    )


def run_in_process(tmp_path, monkeypatch, base, data, **train) -> tuple[dict, TrainPaths]:
    params = write_params(tmp_path, **train)
    monkeypatch.setenv("DSFT_PARAMS", str(params))
    paths = paths_for(tmp_path, base, data)
    return run_training(load_section("train", params), {}, paths), paths


def logged_losses(reports: Path) -> list[float]:
    lines = (reports / "live" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[1:]
    return [float(line.split("\t")[1]) for line in lines]


# -- params -------------------------------------------------------------------------------------------------
def test_repo_params_train_section_is_valid():
    section = load_section("train", REPO / "params.yaml").section
    assert section.deepspeed == "configs/deepspeed/zero0.json" and section.num_processes == 2
    for name in ("zero0", "zero2", "zero3", "zero3_offload"):
        config = load_deepspeed_config(str(REPO / f"configs/deepspeed/{name}.json"))
        assert config["train_micro_batch_size_per_gpu"] == "auto"
    offload = load_deepspeed_config(str(REPO / "configs/deepspeed/zero3_offload.json"))["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == offload["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ({"train.learning_rate": "2e-5"}, "write e.g. 2.0e-5"),
        ({"train.learning_rat": 0.1}, "train.learning_rat: unknown key"),
        ({"train.deepspeed": None, "train.num_processes": 2}, "deepspeed: null runs a plain single process"),
        ({"train.bf16": True, "train.fp16": True}, "bf16 and fp16 are exclusive"),
        ({"train.unfreeze.enabled": True, "train.lora.enabled": True}, "unfreeze and lora are exclusive"),
        ({"train.truncation": "cut"}, "train.truncation"),
        ({"train.deepspeed": "configs/deepspeed/zero2.yaml"}, "expected a path to a DeepSpeed JSON"),
    ],
)
def test_bad_train_params_fail_naming_the_key(params_copy, updates, message):
    edit_params(params_copy, updates)
    with pytest.raises(ParamsError, match=message):
        load_section("train", params_copy)


def test_bad_deepspeed_configs(tmp_path):
    with pytest.raises(ParamsError, match="no such file"):
        load_deepspeed_config(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 2},\n oops}')
    with pytest.raises(ParamsError, match=r"bad.json:2: invalid JSON"):
        load_deepspeed_config(str(tmp_path / "bad.json"))
    write_json(tmp_path / "opt.json", {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}})
    with pytest.raises(ParamsError, match="remove the 'optimizer' section"):
        load_deepspeed_config(str(tmp_path / "opt.json"))


def test_precision_requests_the_hardware_lacks_are_turned_off(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bf16, fp16, notes = resolve_precision(TrainParams(fp16=True))
    assert (bf16, fp16) == (False, False) and "no CUDA" in notes[0]
    monkeypatch.setattr("deepseek_sft.train.setup.cpu_bf16_supported", lambda: False)
    assert resolve_precision(TrainParams(bf16=True))[:2] == (False, False)
    monkeypatch.setattr("deepseek_sft.train.setup.cpu_bf16_supported", lambda: True)
    assert resolve_precision(TrainParams(bf16=True)) == (True, False, [])


def test_dropout_reaches_built_modules():
    model = DeepseekV3ForCausalLM(v3_config(64))
    old = set_dropout(model, 0.1)
    assert old["attention_dropout"] == 0.0 and model.config.attention_dropout == 0.1
    assert model.model.layers[0].self_attn.attention_dropout == 0.1


# -- checkpoints ----------------------------------------------------------------------------------------------
def test_checkpoints_reused_only_with_the_same_fingerprint(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            write_json(tmp_path / f"checkpoint-{step}" / "trainer_state.json", {"global_step": step})
    first = ckpt.prepare_output_dir(tmp_path, "aaa", resume=True)  # no fingerprint yet: a different run
    assert first is None and not any(tmp_path.glob("checkpoint-*"))
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if step < 6:
            write_json(tmp_path / f"checkpoint-{step}" / "trainer_state.json", {"global_step": step})
    resume = ckpt.prepare_output_dir(tmp_path, "aaa", resume=True)
    assert resume == tmp_path / "checkpoint-4" and ckpt.resumed_step(resume) == 4
    assert not (tmp_path / "checkpoint-6").exists()  # interrupted while saving
    assert ckpt.prepare_output_dir(tmp_path, "aaa", resume=False) is None
    assert json.loads((tmp_path / ckpt.FINGERPRINT).read_text()) == {"fingerprint": "aaa"}


# -- in-process runs (plain Trainer, one process) ---------------------------------------------------------------
@pytest.mark.slow
def test_v3_run_freeze_router_keeps_gate_bytes_and_writes_everything(
    tmp_path, monkeypatch, base_models, train_data
):
    metrics, paths = run_in_process(tmp_path, monkeypatch, base_models["v3"], train_data, freeze_router=True)
    base = load_file(base_models["v3"] / "model.safetensors")
    sft = load_file(paths.out / "model.safetensors")
    for key in ("model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias"):
        assert torch.equal(base[key], sft[key])  # router bytes unchanged
    # transformers saves the fused expert tensors in the original per-expert layout
    assert not torch.equal(
        base["model.layers.1.mlp.experts.3.up_proj.weight"],
        sft["model.layers.1.mlp.experts.3.up_proj.weight"],
    )
    assert not torch.equal(
        base["model.layers.0.mlp.gate_proj.weight"], sft["model.layers.0.mlp.gate_proj.weight"]
    )
    assert metrics["global_step"] == 6 and metrics["eval_loss"] < metrics["base_eval_loss"]
    assert metrics["train_tokens_per_second"] > 0 and metrics["train_data_examples"] == 96 * 3
    losses = logged_losses(paths.reports)
    assert losses[-1] < losses[0]
    table = (paths.reports / "params_table.csv").read_text()
    assert "router,128,0,128,frozen,True" in table
    assert {"expert_load.csv", "expert_load.png", "expert_load_total.csv", "metrics.json"} <= {
        p.name for p in paths.reports.iterdir()
    }
    assert json.loads((paths.out / "train_params.json").read_text())["train"]["freeze_router"] is True
    assert (paths.out / "tokenizer.json").is_file() and (paths.checkpoints / "checkpoint-6").is_dir()
    saved = json.loads((paths.reports / "metrics.json").read_text())
    assert saved["moe_dead_experts"] >= 0 and "moe/layer_1/max_load" not in saved


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["v2", "llama"])
def test_same_code_trains_v2_moe_and_dense_llama(tmp_path, monkeypatch, base_models, train_data, arch):
    metrics, paths = run_in_process(tmp_path, monkeypatch, base_models[arch], train_data, dropout=0.1)
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    config = json.loads((paths.out / "config.json").read_text())
    assert config["attention_dropout"] == 0.0  # training dropout is not baked into models/sft
    load_rows = (paths.reports / "expert_load.csv").read_text().splitlines()
    assert load_rows[0] == "step,layer,expert,tokens,share"
    assert (len(load_rows) > 1) == (arch == "v2")  # a dense model writes the (empty) files DVC expects
    assert ("moe_max_expert_load" in metrics) == (arch == "v2")


@pytest.mark.slow
def test_lora_run_merges_into_a_plain_model(tmp_path, monkeypatch, base_models, train_data):
    metrics, paths = run_in_process(
        tmp_path, monkeypatch, base_models["v3"], train_data, **{"lora.enabled": True, "lora.r": 4}
    )
    sft = load_file(paths.out / "model.safetensors")
    base = load_file(base_models["v3"] / "model.safetensors")
    assert set(sft) == set(base)  # merged: no adapter tensors left
    expert = "model.layers.1.mlp.experts.0.down_proj.weight"
    assert not torch.equal(sft[expert], base[expert])  # the expert adapters were trained and merged in
    assert torch.equal(sft["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert (paths.out / "adapter" / "adapter_config.json").is_file()
    assert metrics["params_trainable"] < metrics["params_total"] / 2


# -- DeepSpeed through the real launcher and script (2 CPU processes) ---------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, base: Path, data: dict[str, Path], **train) -> subprocess.Popen:
    """`deepspeed --num_gpus 2 scripts/train.py ...` as dvc.yaml runs it, in its own process group."""
    params = write_params(tmp_path, num_processes=2, threads_per_process=1, **train)
    paths = paths_for(tmp_path, base, data)
    cmd = [
        str(DEEPSPEED),
        "--num_gpus",
        "2",
        "--master_port",
        str(_free_port()),
        "scripts/train.py",
        "--base",
        str(base),
        "--train",
        str(data["train"]),
        "--val",
        str(data["val"]),
        "--out",
        str(paths.out),
        "--checkpoints",
        str(paths.checkpoints),
        "--reports",
        str(paths.reports),
    ]
    env = {**os.environ, "DSFT_PARAMS": str(params), "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "train.log", "ab")  # noqa: SIM115 - the child writes to it after we return
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def shm_of(proc: subprocess.Popen) -> list[Path]:
    """The DeepSpeed CPU all-reduce buffers in /dev/shm of a `launch`ed run (named by its master port)."""
    port = proc.args[proc.args.index("--master_port") + 1]
    return list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def release_shm_of(proc: subprocess.Popen) -> None:
    for buffer in shm_of(proc):
        buffer.unlink(missing_ok=True)


def finish(proc: subprocess.Popen, tmp_path: Path, timeout: float = 400) -> dict:
    assert proc.wait(timeout=timeout) == 0, (tmp_path / "train.log").read_text()[-4000:]
    return json.loads((tmp_path / "reports" / "metrics.json").read_text())


@pytest.mark.slow
def test_default_deepspeed_config_two_processes_packed(tmp_path, base_models, train_data):
    """The stage's default path: ZeRO-0, 2 processes, packed rows split by tokens, per-example attention."""
    default = load_section("train", REPO / "params.yaml").section
    assert default.packing and default.train_sampling_strategy == "batch_rebalance"
    proc = launch(tmp_path, base_models["v3"], train_data, deepspeed=str(REPO / default.deepspeed))
    metrics = finish(proc, tmp_path)
    assert metrics["num_processes"] == 2 and metrics["zero_stage"] == 0 and metrics["global_step"] == 6
    assert not shm_of(proc)  # DeepSpeed's CPU all-reduce buffers (66 MB per process) are gone with the run
    assert metrics["allreduce_shm"] == 1  # gradients summed in shared memory, not through gloo
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    # varlen attention is a training-time switch: the saved model loads with the stock implementation
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert VARLEN_ATTENTION not in json.dumps(config)


SHM_ALLREDUCE_CHECK = """
import json, sys, torch
import deepspeed
import deepspeed.comm as dist
import deepspeed.comm.comm as ds_comm
from deepseek_sft.train.setup import init_deepspeed_comm, release_deepspeed_shm
torch.set_num_threads(1)
deepspeed.init_distributed()
gloo_calls, gloo_all_reduce = [], ds_comm.cdb.all_reduce
def counted(*args, **kwargs):  # the path the route falls back to
    gloo_calls.append(1)
    return gloo_all_reduce(*args, **kwargs)
ds_comm.cdb.all_reduce = counted
routed = init_deepspeed_comm()
rank = dist.get_rank()
total = torch.arange(9_000_001, dtype=torch.float32) * (rank + 1)  # 36 MB: two 32 MB kernel chunks
dist.all_reduce(total)
gloo_after_sum = len(gloo_calls)
largest = torch.tensor([float(rank), 10.0 - rank])
dist.all_reduce(largest, op=dist.ReduceOp.MAX)  # not a SUM: gloo
halves = torch.full((3,), 0.5, dtype=torch.bfloat16)
dist.all_reduce(halves)  # not fp32: gloo
expected = torch.arange(9_000_001, dtype=torch.float32) * 3
result = {"routed": routed, "sum_exact": bool(torch.equal(total, expected)), "max": largest.tolist(),
          "bf16": halves.float().tolist(), "gloo_calls": [gloo_after_sum, len(gloo_calls)]}
release_deepspeed_shm()
if rank == 0:
    json.dump(result, open(sys.argv[-1], "w"))  # the launcher puts --local_rank first
"""


@pytest.mark.slow
def test_shm_allreduce_sums_like_gloo_and_leaves_other_calls_to_it(tmp_path):
    """DeepSpeed's shared-memory kernel takes fp32 SUMs over every rank; anything else still goes to gloo."""
    script, out = tmp_path / "check.py", tmp_path / "result.json"
    script.write_text(SHM_ALLREDUCE_CHECK)
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(_free_port()), str(script), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result == {
        "routed": True,
        "sum_exact": True,
        "max": [1.0, 10.0],
        "bf16": [1.0, 1.0, 1.0],
        "gloo_calls": [0, 2],  # the fp32 sum never reached gloo; the MAX and the bf16 sum did
    }


@pytest.mark.slow
def test_zero2_two_processes_with_progressive_unfreezing(tmp_path, base_models, train_data):
    unfreeze = {
        "unfreeze.enabled": True,
        "unfreeze.initial_layers": 1,
        "unfreeze.every": 3,
        "weight_decay": 0.1,
    }
    metrics = finish(
        launch(
            tmp_path,
            base_models["v3"],
            train_data,
            deepspeed=str(REPO / "configs/deepspeed/zero2.json"),
            **unfreeze,
        ),
        tmp_path,
    )
    assert metrics["num_processes"] == 2 and metrics["zero_stage"] == 2 and metrics["global_step"] == 6
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    losses = logged_losses(tmp_path / "reports")
    assert losses[-1] < losses[0]
    base = load_file(base_models["v3"] / "model.safetensors")
    at3 = load_file(tmp_path / "checkpoints" / "checkpoint-3" / "model.safetensors")
    final = load_file(tmp_path / "sft" / "model.safetensors")
    bottom, top = "model.layers.0.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    # layer 0 and the embeddings are frozen for steps 0-2 (even with weight decay), then train
    assert torch.equal(at3[bottom], base[bottom]) and not torch.equal(at3[top], base[top])
    assert torch.equal(at3["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(final[bottom], base[bottom])
    assert (tmp_path / "checkpoints" / "checkpoint-6" / "global_step6").is_dir()  # DeepSpeed checkpoint


@pytest.mark.slow
def test_zero3_offload_killed_mid_run_resumes_from_the_last_checkpoint(tmp_path, base_models, train_data):
    train = {
        "deepspeed": str(REPO / "configs/deepspeed/zero3_offload.json"),
        # long enough that an idle machine (about 10 steps/s) cannot finish before the kill lands
        "max_steps": 120,
        "save_steps": 4,
        "logging_steps": 4,
        "eval_base": True,
    }
    proc = launch(tmp_path, base_models["v3"], train_data, **train)
    checkpoints = tmp_path / "checkpoints"
    deadline = time.time() + 900  # generous: CI machines may be loaded
    while True:
        exited = proc.poll()  # read before the checkpoints, so an exit cannot slip in between the two
        latest = ckpt.latest_checkpoint(checkpoints)
        if latest is not None and ckpt.resumed_step(latest) >= 8:
            break
        assert exited is None, (tmp_path / "train.log").read_text()[-4000:]
        assert time.time() < deadline, "no checkpoint within 900 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks: a crash, no clean shutdown
    proc.wait()
    release_shm_of(proc)  # a killed rank cannot unlink its DeepSpeed buffer; the test does
    killed_at = ckpt.resumed_step(ckpt.latest_checkpoint(checkpoints))
    assert 8 <= killed_at < 120 and not (tmp_path / "sft").exists()

    metrics = finish(launch(tmp_path, base_models["v3"], train_data, **train), tmp_path)
    assert metrics["resumed_from_step"] >= killed_at and metrics["global_step"] == 120
    assert metrics["zero_stage"] == 3 and metrics["eval_loss"] < metrics["base_eval_loss"]
    assert "base_eval_loss" in metrics  # carried over from the first run's step-0 evaluation
    log = (tmp_path / "train.log").read_text()
    assert f"resuming from {checkpoints}/checkpoint-" in log
    state = json.loads((checkpoints / "checkpoint-120" / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert losses[-1] < losses[0]
    sft = load_file(tmp_path / "sft" / "model.safetensors")
    assert sft["model.layers.1.mlp.experts.3.gate_proj.weight"].shape == (
        16,
        32,
    )  # gathered, not a ZeRO-3 shard


# -- profiles ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", sorted((REPO / "configs/profiles").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_profiles_apply_to_valid_params_and_keep_the_rest(tmp_path, profile):
    from deepseek_sft.config import load_all
    from deepseek_sft.train.profile import apply_profile, read_profile

    params = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text(encoding="utf-8")
    params.write_text(original, encoding="utf-8")
    keys = apply_profile(profile, params)
    merged = load_all(params)
    overlay = read_profile(profile)
    for key, value in overlay.get("train", {}).items():  # data profiles (banking77) set no train keys
        if not isinstance(value, dict):
            assert getattr(merged["train"], key) == value, key
    assert keys and all(k.split(".")[0] in overlay for k in keys)
    # the sections the profile does not name are byte-identical, comments included
    before, after = top_level_sections(original), top_level_sections(params.read_text(encoding="utf-8"))
    assert {name: before[name] for name in before if name not in overlay} == {
        name: after[name] for name in after if name not in overlay
    }


def top_level_sections(text: str) -> dict[str, str]:
    """params.yaml text split at its top-level keys: {section name: its lines}."""
    sections, name = {}, ""
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#") and ":" in line:
            name = line.split(":", 1)[0]
        sections[name] = sections.get(name, "") + line + "\n"
    return sections


def test_profile_flags_and_invalid_profiles(tmp_path):
    from deepseek_sft.train.profile import apply_profile, dvc_flags

    flags = dvc_flags(
        {"train": {"learning_rate": 2.0e-5, "deepspeed": None, "lora": {"target_parameters": ["a.b"]}}}
    )
    assert flags == [
        "-S",
        "train.learning_rate=2.0e-05",
        "-S",
        "train.deepspeed=null",
        "-S",
        "train.lora.target_parameters=[a.b]",
    ]
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    before = params.read_text(encoding="utf-8")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 2e-5\n", encoding="utf-8")
    with pytest.raises(
        ParamsError, match=r"(?s)bad.yaml: the merged params would be invalid:\n.*train.learning_rate"
    ):
        apply_profile(bad, params)
    assert params.read_text(encoding="utf-8") == before  # nothing written
    new_key = tmp_path / "new.yaml"
    new_key.write_text("train:\n  unfreeze:\n    every: 7\n  eval_steps: 50\n", encoding="utf-8")
    apply_profile(new_key, params)
    section = load_section("train", params).section
    assert section.unfreeze.every == 7 and section.eval_steps == 50


def test_deepspeed_ops_compile_into_the_virtualenv_unless_told_otherwise(tmp_path):
    """Two checkouts must not recompile each other's DeepSpeed op (~27 s) through ~/.cache/torch_extensions."""
    probe = "import os, deepseek_sft; print(os.environ['TORCH_EXTENSIONS_DIR'])"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    own = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert own.stdout.strip() == str(Path(sys.prefix) / "torch_extensions")
    chosen = subprocess.run(
        [sys.executable, "-c", probe],
        env={**env, "TORCH_EXTENSIONS_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert chosen.stdout.strip() == str(tmp_path)
