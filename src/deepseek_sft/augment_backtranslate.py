"""Back-translation for the augment stage: a pluggable translator and entity masking around it.

Entities are replaced by placeholders ([E0], [E1], ...) before translating to the pivot language and
back, then restored verbatim, so an entity's text and type never change. A round trip that loses,
duplicates or invents a placeholder is dropped (counted as `entity_lost`).

Translators (anything with ``translate(texts, source, target) -> list[str]``):
- `Seq2SeqTranslator`: two local model directories (e.g. Marian / opus-mt) run with
  AutoModelForSeq2SeqLM.generate. transformers 5 removed the "translation" pipeline task, so the
  model is driven directly (greedy decoding: deterministic);
- `HttpTranslator`: a LibreTranslate-style HTTP API (POST {q, source, target, format}).
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Protocol

from .augment_edits import Edited, SpansByField
from .config.augment import BackTranslationParams
from .language import tidy_spaces

PLACEHOLDER = "[E{}]"
PLACEHOLDER_RE = re.compile(r"\[\s*[Ee]\s*(\d+)\s*\]")


class Translator(Protocol):
    """What back-translation needs: a batch of texts from one language into another."""

    def translate(self, texts: list[str], source: str, target: str) -> list[str]:
        """Translations of `texts`, same length and order."""
        ...


class Seq2SeqTranslator:
    """Local seq2seq translation models, one directory per direction (loaded lazily, never downloaded)."""

    def __init__(self, models: dict[tuple[str, str], str], max_new_tokens: int = 256):
        self.models = models
        self.max_new_tokens = max_new_tokens
        self._loaded: dict[tuple[str, str], tuple] = {}

    def _load(self, direction: tuple[str, str]):
        if direction not in self._loaded:
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

            path = self.models[direction]
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForSeq2SeqLM.from_pretrained(path, local_files_only=True).eval()
            self._loaded[direction] = (tokenizer, model)
        return self._loaded[direction]

    def translate(self, texts: list[str], source: str, target: str) -> list[str]:
        """Greedy translations with the model for (source, target)."""
        import torch

        if (source, target) not in self.models:
            raise ValueError(f"no local translation model for {source}->{target}")
        tokenizer, model = self._load((source, target))
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=self.max_new_tokens, num_beams=1, do_sample=False)
        return tokenizer.batch_decode(out, skip_special_tokens=True)


class HttpTranslator:
    """A LibreTranslate-style endpoint: POST {"q": [...], "source", "target"} -> {"translatedText": [...]}."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0):
        self.url, self.api_key, self.timeout = url, api_key, timeout

    def translate(self, texts: list[str], source: str, target: str) -> list[str]:
        """Translations from the API; a reply of the wrong shape raises ValueError."""
        import httpx

        body = {"q": texts, "source": source, "target": target, "format": "text"}
        if self.api_key:
            body["api_key"] = self.api_key
        response = httpx.post(self.url, json=body, timeout=self.timeout)
        response.raise_for_status()
        out = response.json().get("translatedText")
        if not isinstance(out, list) or len(out) != len(texts) or not all(isinstance(t, str) for t in out):
            raise ValueError(f"{self.url}: expected translatedText as a list of {len(texts)} strings")
        return out


def make_translator(params: BackTranslationParams) -> Translator:
    """The translator `augment.backtranslation` describes."""
    if params.backend == "http":
        key = os.environ.get(params.api_key_env) if params.api_key_env else None
        return HttpTranslator(params.url, key, params.timeout)
    return Seq2SeqTranslator(
        {
            (params.source_lang, params.pivot_lang): params.to_pivot_model,
            (params.pivot_lang, params.source_lang): params.from_pivot_model,
        }
    )


def unique_spans(spans: SpansByField) -> list[tuple[int, int]] | None:
    """Distinct (start, end) of all entity fields, sorted; None if two distinct spans overlap."""
    keys = sorted({(s["start"], s["end"]) for field_spans in spans.values() for s in field_spans})
    for (_, end), (start, _) in itertools.pairwise(keys):
        if start < end:
            return None
    return keys


def mask(text: str, keys: list[tuple[int, int]]) -> str:
    """`text` with the k-th entity span replaced by [Ek]."""
    out, cursor = [], 0
    for k, (start, end) in enumerate(keys):
        out += [text[cursor:start], PLACEHOLDER.format(k)]
        cursor = end
    out.append(text[cursor:])
    return "".join(out)


def unmask(
    translated: str, text: str, keys: list[tuple[int, int]], spans: SpansByField, strip_ws: bool
) -> Edited:
    """Put the entity texts back into a round-trip translation; spans follow their placeholders."""
    # text without whitespace (clean removed it from Chinese): a translator's spaces would be new noise;
    # spaced text (English, mixed): keep the spaces that separate words, as clean does
    translated = re.sub(r"\s+", "", translated) if strip_ws else tidy_spaces(translated)
    found = [int(m.group(1)) for m in PLACEHOLDER_RE.finditer(translated)]
    if sorted(found) != list(range(len(keys))):
        return Edited(reason="entity_lost")
    out, cursor, length, new_pos = [], 0, 0, {}
    for m in PLACEHOLDER_RE.finditer(translated):
        k = int(m.group(1))
        before = translated[cursor : m.start()]
        out.append(before)
        length += len(before)
        surface = text[keys[k][0] : keys[k][1]]
        new_pos[keys[k]] = length
        out.append(surface)
        length += len(surface)
        cursor = m.end()
    out.append(translated[cursor:])
    new_text = "".join(out)
    if not new_text.strip():
        return Edited(reason="empty_translation")
    if new_text == text:
        return Edited(reason="unchanged")
    moved: SpansByField = {}
    for name, field_spans in spans.items():
        moved[name] = []
        for span in field_spans:
            start, surface = new_pos[(span["start"], span["end"])], text[span["start"] : span["end"]]
            moved[name].append({**span, "start": start, "end": start + len(surface), "text": surface})
        moved[name].sort(key=lambda s: (s["start"], s["end"]))
    return Edited(text=new_text, spans=moved)


def backtranslate(
    items: list[tuple[str, SpansByField]], translator: Translator, params: BackTranslationParams
) -> list[Edited]:
    """Round-trip each (text, spans) through the pivot language, entities masked; one Edited per item."""
    results: list[Edited | None] = [None] * len(items)
    masked, where, keys_of = [], [], {}
    for i, (text, spans) in enumerate(items):
        keys = unique_spans(spans)
        if keys is None:
            results[i] = Edited(reason="overlapping_entities")
            continue
        keys_of[i] = keys
        masked.append(mask(text, keys))
        where.append(i)
    if masked:
        pivot = translator.translate(masked, params.source_lang, params.pivot_lang)
        back = translator.translate(pivot, params.pivot_lang, params.source_lang)
        if len(back) != len(masked):
            raise ValueError(f"translator returned {len(back)} texts for {len(masked)}")
        for i, translated in zip(where, back, strict=True):
            text, spans = items[i]
            strip_ws = not re.search(r"\s", text)
            results[i] = unmask(translated, text, keys_of[i], spans, strip_ws)
    return [r for r in results if r is not None]
