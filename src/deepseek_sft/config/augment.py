"""Params of stage augment: extra training records made from the train split only."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Section

METHODS = ("synonym", "structure", "mention", "backtranslation")


class SynonymParams(Section):
    """Replace dictionary terms outside entity spans by a synonym from the same group."""

    dictionary: str = Field(
        default="resources/financial_synonyms.tsv",
        description="TSV file: one synonym group per line, terms separated by tabs, # comments; terms in the "
        "records' language (Latin-script terms match whole words; a dictionary in another script adds nothing)",
    )
    max_replacements: int = Field(default=2, ge=1, le=50, description="terms replaced per augmented record")


class StructureParams(Section):
    """Reorder clauses (split at ，/,/；/;) inside a CJK sentence, or whole sentences (。/！/？, and ./!/? in Latin
    text, which is only ever reordered by whole sentences: its clauses carry capitals and full stops)."""

    sentence_reorder: bool = Field(
        default=True,
        description="also swap whole sentences when there are several (the only reordering of Latin text)",
    )


class MentionParams(Section):
    """Replace entities by other mentions of the same type from the train split (mention replacement)."""

    max_replacements: int = Field(
        default=3, ge=1, le=50, description="entities replaced per augmented record"
    )


class BackTranslationParams(Section):
    """Translate to a pivot language and back, entities masked so they survive unchanged."""

    backend: Literal["local", "http"] = Field(
        default="local", description="local = transformers translation pipelines; http = a translation API"
    )
    source_lang: str = Field(
        default="zh",
        description="language of the records; a mismatch with their script adds nothing, with a warning",
    )
    pivot_lang: str = Field(default="en", description="language translated through")
    to_pivot_model: str | None = Field(default=None, description="local: model directory source -> pivot")
    from_pivot_model: str | None = Field(default=None, description="local: model directory pivot -> source")
    url: str | None = Field(
        default=None,
        description="http: POST endpoint taking {q: [...], source, target} (LibreTranslate style)",
    )
    api_key_env: str | None = Field(default=None, description="http: env var with the API key; null = none")
    timeout: float = Field(default=60.0, gt=0.0, le=3600.0, description="http: seconds per request")
    batch_size: int = Field(default=16, ge=1, le=4096, description="texts per translation call")

    @model_validator(mode="after")
    def _check_backend(self):
        if self.backend == "http" and self.url is None:
            raise ValueError("backend 'http' needs url")
        return self


class AugmentParams(Section):
    """Stage augment: adds label-preserving variants of train records (val/test are never read)."""

    enabled: bool = Field(default=True, description="false = train_augmented.jsonl is a copy of train.jsonl")
    methods: list[Literal["synonym", "structure", "mention", "backtranslation"]] = Field(
        default_factory=lambda: ["synonym", "structure"], description="methods used, in this order"
    )
    ratio: float = Field(
        default=0.2,
        ge=0.0,
        le=10.0,
        description="records added per train record, shared equally by the methods",
    )
    balance_by: str | None = Field(
        default=None,
        description="a label field (e.g. intent): records of rare labels are varied first, so each label "
        "gets about the same number of variants; null = every record alike",
    )
    synonym: SynonymParams = Field(default_factory=SynonymParams)
    structure: StructureParams = Field(default_factory=StructureParams)
    mention: MentionParams = Field(default_factory=MentionParams)
    backtranslation: BackTranslationParams = Field(default_factory=BackTranslationParams)

    @model_validator(mode="after")
    def _check_methods(self):
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods lists a method twice: {self.methods}")
        bt = self.backtranslation
        local_bt = self.enabled and "backtranslation" in self.methods and bt.backend == "local"
        if local_bt and (bt.to_pivot_model is None or bt.from_pivot_model is None):
            raise ValueError("backtranslation with backend 'local' needs to_pivot_model and from_pivot_model")
        return self
