"""The OpenAI-compatible API driven by the official `openai` client against a running `scripts/serve.py`
(issue 16, item 5): chat completions through the model's own chat template, streamed chat (server-sent
events ending with `data: [DONE]`), text completions, and errors the client parses.

Two checkpoints: a pretrained-style one (a tiny LlamaForCausalLM with a byte-level BPE tokenizer and
SmolLM2's ChatML template, the shape of SmolLM2-135M-Instruct, the project's real target) and the tiny
DeepSeek-V3 default with its own tokenizer and template. Both are built here from configs: nothing from a hub.
"""

from __future__ import annotations

import os
import sys

import httpx
import openai
import pytest
import torch
import yaml

from deepseek_sft.base_model import load_model_and_tokenizer
from deepseek_sft.config import load_section
from deepseek_sft.evaluate.generate import decode_answers, generate_batched
from deepseek_sft.serve.loadtest import free_port, spawned_service
from test_serve import build_tiny_model_dir

from conftest import REPO

# SmolLM2-135M-Instruct's chat template (ChatML, with its default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ENGLISH = [
    "My card was stolen yesterday, please block it.",
    "How do I transfer money to another bank account?",
    "Why was I charged a fee for my top up?",
    "The exchange rate on my payment looks wrong.",
    "I want to change my PIN and my address.",
] * 20
MESSAGES = [{"role": "user", "content": "My card was stolen, what do I do?"}]


def build_tiny_llama_chatml(path) -> str:
    """Save a tiny random LlamaForCausalLM with a trained byte-level BPE tokenizer and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(ENGLISH, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=["llama-chatml", "deepseek-tiny"])
def served(request, tmp_path_factory):
    """A running service on a built checkpoint: (base URL, model dir)."""
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "llama-chatml":
        model_dir = build_tiny_llama_chatml(tmp / "tiny-llama")
    else:
        model_dir = build_tiny_model_dir(
            tmp / "tiny-deepseek", load_section("serve", REPO / "params.yaml").tasks
        )
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["serve"] |= {"model_dir": model_dir, "num_threads": 1, "log_level": "warning"}
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    env = {**os.environ, "DSFT_PARAMS": str(tmp / "params.yaml")}
    env.pop("DSFT_SERVE_TOKEN", None)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, str(REPO / "scripts" / "serve.py"), "--port", str(port)]
    with spawned_service(command, url, 120, env=env, log_path=tmp / "serve.log"):
        yield url, model_dir


@pytest.fixture(scope="module")
def reference(served):
    """The checkpoint loaded in the test process, for the greedy answers the service must give."""
    torch.set_num_threads(1)
    return load_model_and_tokenizer(served[1])


def greedy(reference, ids: list[int], max_new_tokens: int) -> str:
    model, tokenizer = reference
    return decode_answers(tokenizer, generate_batched(model, tokenizer, [ids], max_new_tokens, 1))[0]


@pytest.fixture(scope="module")
def client(served):
    http = httpx.Client(trust_env=False, timeout=60)  # loopback: no proxy from the environment
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", max_retries=0, http_client=http)


@pytest.mark.slow
def test_chat_completion_goes_through_the_models_own_chat_template(client, served, reference):
    _, tokenizer = reference
    chat = client.chat.completions.create(model="whatever", messages=MESSAGES, max_tokens=12)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(ids, add_special_tokens=False)["input_ids"]
    assert chat.object == "chat.completion" and chat.model == os.path.basename(served[1])
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert chat.usage.prompt_tokens == len(ids)  # the template's rendering, generation prompt included
    print(f"\n{os.path.basename(served[1])}: {chat.usage} {choice.message.content!r}")
    assert choice.message.content == greedy(reference, ids, 12)
    assert chat.usage.completion_tokens <= 12
    assert [m.id for m in client.models.list().data] == [os.path.basename(served[1])]


@pytest.mark.slow
def test_streamed_chat_equals_the_whole_answer_and_ends_with_done(client, served):
    whole = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=12)
    chunks = list(
        client.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(content) == whole.choices[0].message.content
    print(f"\nstreamed in {len(content)} content chunks: {content}")
    if whole.usage.completion_tokens > 1:
        assert len(content) > 1  # token by token, not one blob at the end
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens

    with httpx.stream(
        "POST",
        f"{served[0]}/v1/chat/completions",
        json={"messages": MESSAGES, "max_tokens": 4, "stream": True},
        trust_env=False,
        timeout=60,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


@pytest.mark.slow
def test_text_completion_continues_the_raw_prompt(client, reference):
    _, tokenizer = reference
    prompt = "How do I transfer money"
    completion = client.completions.create(model="m", prompt=prompt, max_tokens=8)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == greedy(reference, tokenizer(prompt)["input_ids"], 8)
    streamed = client.completions.create(model="m", prompt=prompt, max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text


@pytest.mark.slow
def test_errors_are_parsed_by_the_client(client):
    with pytest.raises(openai.UnprocessableEntityError) as empty:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": " "}])
    assert empty.value.status_code == 422 and empty.value.code == "empty_input"
    assert "messages content is empty" in empty.value.message
    assert empty.value.type == "invalid_request_error"

    with pytest.raises(openai.BadRequestError) as two:
        client.chat.completions.create(model="m", messages=MESSAGES, n=2)
    assert two.value.code == "unsupported" and two.value.param == "n" and "n=2" in two.value.message

    with pytest.raises(openai.UnprocessableEntityError) as too_many:
        client.completions.create(model="m", prompt="hi", max_tokens=100_000)
    assert too_many.value.code == "max_tokens_exceeded" and too_many.value.param == "max_tokens"

    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="m", input="hi")
    assert missing.value.code == "not_found" and "/v1/embeddings" in missing.value.message
