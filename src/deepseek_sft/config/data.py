"""Params of the data stages (fetch, clean, label_qa) and of `tasks`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Section
from .sources import ColumnMapping, HfParams, LlmParams, LocalParams, WebParams

__all__ = ["ColumnMapping", "FetchParams", "HfParams", "LocalParams", "TaskSpec"]


class TaskSpec(Section):
    """One thing the model is taught: a record field turned into an instruction -> response pair."""

    type: Literal["classification", "extraction", "generation"] = Field(
        description="classification: one label; extraction: entity spans; generation: free text"
    )
    field: str = Field(description="record field holding the answer (e.g. intent, entities, summary)")
    instruction: str = Field(description="instruction shown to the model before the input text")
    labels: list[str] | None = Field(
        default=None, description="allowed labels (classification); null = whatever the data holds"
    )
    entity_types: list[str] | None = Field(
        default=None, description="allowed entity types (extraction); null = whatever the data holds"
    )
    enabled: bool = Field(
        default=True,
        description="false leaves the task out of every stage (e.g. a dataset that lacks its field)",
    )
    system_prompt: str | None = Field(
        default=None,
        description="system message before the instruction; null = none (a template may add its own default: "
        "SmolLM2's ChatML adds ~20 tokens, so a short one saves them on every example)",
    )
    answer_format: Literal["items", "inline", "tagged"] = Field(
        default="items",
        description="extraction answers: items = TYPE:text|...; inline = the text echoed with ⟦TYPE:text⟧ "
        "marks; tagged = the text echoed with ⟨TYPE⟩ after an entity's first character, ⟨+⟩ after the others",
    )


class SyntheticParams(Section):
    """The embedded, offline corpus of Chinese financial customer-service requests."""

    num_records: int = Field(default=6000, ge=50, le=2_000_000, description="records to generate")
    annotator_error_rates: dict[str, float] = Field(
        default_factory=lambda: {"ann_a": 0.03, "ann_b": 0.04, "ann_c": 0.10},
        description="simulated annotators -> probability of an error per layer (>= 3 annotators)",
    )

    @model_validator(mode="after")
    def _check_annotators(self):
        if len(self.annotator_error_rates) < 3:
            raise ValueError("annotator_error_rates needs at least 3 annotators")
        for name, rate in self.annotator_error_rates.items():
            if not 0.0 <= rate <= 0.5:
                raise ValueError(f"annotator_error_rates.{name}={rate}: allowed range is 0.0..0.5")
        return self


class FetchParams(Section):
    """Stage fetch: where raw records come from."""

    source: Literal["synthetic", "local", "hf", "web", "llm"] = Field(
        default="synthetic", description="record source"
    )
    synthetic: SyntheticParams = Field(default_factory=SyntheticParams)
    local: LocalParams = Field(default_factory=LocalParams)
    hf: HfParams = Field(default_factory=HfParams)
    web: WebParams = Field(default_factory=WebParams)
    llm: LlmParams = Field(default_factory=LlmParams)

    @model_validator(mode="after")
    def _check_source(self):
        if self.source in ("local", "hf") and getattr(self, self.source).path is None:
            raise ValueError(f"source={self.source!r} needs fetch.{self.source}.path")
        return self


class CleanParams(Section):
    """Stage clean: text normalisation, filters and deduplication."""

    nfkc: bool = Field(default=True, description="Unicode NFKC (full-width -> half-width)")
    remove_whitespace: bool = Field(default=True, description="drop whitespace (Chinese has none)")
    remove_latin_digits: bool = Field(
        default=False, description="drop Latin letters and digits (destroys MONEY/DATE entities)"
    )
    to_simplified: bool = Field(default=False, description="traditional -> simplified Chinese (OpenCC)")
    min_chars: int = Field(default=4, ge=1, description="shorter texts are rejected")
    max_chars: int = Field(default=512, ge=1, description="longer texts are rejected")
    dedup_exact: bool = Field(default=True, description="drop exact duplicate texts")
    near_dup_threshold: float | None = Field(
        default=0.9,
        ge=0.5,
        le=1.0,
        description="MinHash Jaccard above which texts are near-duplicates; null=off",
    )

    @model_validator(mode="after")
    def _check_bounds(self):
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars={self.min_chars} > max_chars={self.max_chars}")
        return self


class LabelQaParams(Section):
    """Stage label_qa: agreement gate, adjudication, split."""

    kappa_threshold: float = Field(
        default=0.8, ge=0.0, le=1.0, description="min Cohen's kappa per pair/layer"
    )
    on_fail: Literal["error", "warn"] = Field(
        default="error", description="what a kappa below threshold does"
    )
    exclude_annotators: list[str] = Field(
        default_factory=list, description="annotators left out of QA and votes"
    )
    val_fraction: float = Field(default=0.15, ge=0.15, le=0.5, description="validation share (>= 0.15)")
    test_fraction: float = Field(default=0.15, ge=0.05, le=0.5, description="test share")
    stratify_by: str | None = Field(
        default="intent",
        description="classification field whose class shares each split should keep (the hash split keeps "
        "them approximately; stratify_deviation_<split> in metrics says how well); null = none",
    )
    train_per_label: int | None = Field(
        default=None,
        ge=1,
        description="keep at most N train records per stratify_by label (nested subsets: a learning curve over "
        "data size by params only); val and test are untouched; null = all",
    )
    split_key: Literal["text", "id"] = Field(
        default="text",
        description="what a record's split is hashed from: its normalised text (identical texts stay "
        "together; stable when ids are row numbers) or its id",
    )

    @model_validator(mode="after")
    def _check_split(self):
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for training")
        return self
