"""The tiny default's tokenizer: byte-level BPE trained with `tokenizers`, DeepSeek-V3 markers and chat template."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .config.data import TaskSpec
from .tasks import (
    ITEM_SEP,
    MARK_CLOSE,
    MARK_OPEN,
    NO_ENTITY,
    TAG_CONTINUE,
    TYPE_SEP,
    build_messages,
    entity_tag,
    format_response,
)

# DeepSeek-V3's own spellings (fullwidth bars, U+2581 for spaces), so prompts look like the real family's.
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, USER_TOKEN, ASSISTANT_TOKEN]

# DeepSeek-V3's chat template without the tool-call branches: system prompts go right after BOS, a user turn is
# "<｜User｜>content", an assistant turn "<｜Assistant｜>content<eos>", the generation prompt "<｜Assistant｜>".
# bos/eos come from the tokenizer so the template also fits a hub tokenizer that lacks one.
CHAT_TEMPLATE = (
    "{%- if add_generation_prompt is not defined %}{% set add_generation_prompt = false %}{% endif -%}"
    "{%- set ns = namespace(system_prompt='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token }}{{ ns.system_prompt -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    f"{{{{- '{USER_TOKEN}' + message['content'] -}}}}"
    "{%- elif message['role'] == 'assistant' -%}"
    f"{{{{- '{ASSISTANT_TOKEN}' + message['content'] + eos_token -}}}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    f"{{%- if add_generation_prompt %}}{{{{ '{ASSISTANT_TOKEN}' }}}}{{% endif -%}}"
)


def training_texts(train_records: Iterable[dict], tasks: dict[str, TaskSpec]) -> Iterator[str]:
    """The BPE corpus: every train record's prompt text and target answer per task, plus label vocabularies.

    Only the train split feeds this, so val/test strings never become merges. Instructions and labels are
    repeated with each record as they are at training time, so they end up as few tokens.
    """
    for record in train_records:
        for task in tasks.values():
            for message in build_messages(task, record["text"]):
                yield message["content"]
            if task.field in record:
                yield format_response(task, record)
    for task in tasks.values():
        yield from task.labels or []
        yield from task.entity_types or []
    yield f"{NO_ENTITY}{ITEM_SEP}{TYPE_SEP}"


# CJK ideographs (incl. extension A and compatibility) and digits, each split off as its own pre-token.
_CJK_OR_DIGIT = Regex(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff0-9]")


def answer_vocabulary(tasks: dict[str, TaskSpec]) -> list[str]:
    """The fixed words answers are made of, in params order without repeats: labels, entity types and,
    for inline extraction, the opening mark of each type (⟦PER:) and the closing mark; for tagged extraction,
    the start tag of each type (⟨PER⟩) and the continuation tag (⟨+⟩)."""
    words = []
    for task in tasks.values():
        words += [*(task.labels or []), *(task.entity_types or [])]
        if task.type == "extraction" and task.answer_format == "inline":
            words += [f"{MARK_OPEN}{kind}{TYPE_SEP}" for kind in task.entity_types or []] + [MARK_CLOSE]
        if task.type == "extraction" and task.answer_format == "tagged":
            words += [entity_tag(kind) for kind in task.entity_types or []] + [entity_tag(TAG_CONTINUE)]
    return list(dict.fromkeys(words))


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int,
    model_max_length: int,
    split_cjk: bool = False,
    whole_words: Iterable[str] = (),
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it (special tokens, chat template) for transformers.

    `whole_words` become one token each (added tokens, matched before pre-tokenization).
    """
    backend = Tokenizer(models.BPE())
    # No prefix space: Chinese has no word-initial spaces, and a prompt must tokenize the same at any offset.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # split_cjk: merges never cross a Chinese character or digit, so "史永" is the same tokens inside
    # "给史永转" as in the answer "PER:史永". A small model then learns extraction as copying, which it
    # cannot do when the text's merges ("给史", "永转") never occur in answers.
    isolate = pre_tokenizers.Split(_CJK_OR_DIGIT, behavior="isolated")
    backend.pre_tokenizer = pre_tokenizers.Sequence([isolate, byte_level]) if split_cjk else byte_level
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    # Byte-level pre-tokenization splits "card_loss" into card / _ / loss. Measured on the tiny default: the
    # model then picks "card" from the text but the word after it from the label prior (card_activation was
    # answered card_loss 26 times in 26). One token per label makes a classification answer one decision.
    backend.add_tokens([AddedToken(word, normalized=False) for word in whole_words])
    bos_id = backend.token_to_id(BOS_TOKEN)
    # Like DeepSeek's tokenizers: plain encode() prepends BOS; chat prompts carry BOS through the template.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[USER_TOKEN, ASSISTANT_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def ensure_chat_ready(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Give a hub/local tokenizer what SFT needs (a chat template, a pad token); return what was added."""
    added = []
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
        added.append("chat_template")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; add one to the checkpoint")
        # Padding positions are masked out of attention and loss, so reusing EOS is harmless.
        tokenizer.pad_token = tokenizer.eos_token
        added.append("pad_token")
    return added


def chars_per_token(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> float:
    """Characters per token over `texts` (no special tokens): how compactly the tokenizer encodes them."""
    if not texts:
        return 0.0
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    n_tokens = sum(len(ids) for ids in encoded)
    return sum(len(t) for t in texts) / max(n_tokens, 1)
