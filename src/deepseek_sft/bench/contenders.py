"""Build each contender's Trainer (model loaded inside, in the order its own code path loads it)."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import set_seed

from ..base_model import load_model_and_tokenizer
from ..config import StageParams
from ..sft_data import make_collator
from .runs import RunSpec, batch_layout, shared_arguments


@dataclass
class Built:
    """A ready Trainer, its tokenizer and the gradient accumulation it runs with."""

    trainer: object
    tokenizer: object
    grad_accum: int


def project_params(train, spec: RunSpec, global_batch: int):
    """params.train for one bench layout: same hyperparameters, one epoch over the budget, no checkpoints."""
    per_device, accum = batch_layout(global_batch, train.per_device_train_batch_size, spec.processes)
    return train.model_copy(
        update={
            "per_device_train_batch_size": per_device,
            "gradient_accumulation_steps": accum,
            "num_train_epochs": 1.0,
            "max_steps": -1,
            "save_steps": 10**9,
            "eval_steps": None,
            "eval_base": False,
            "num_processes": spec.processes,
            "threads_per_process": spec.threads,
            "deepspeed": train.deepspeed if spec.deepspeed else None,
        }
    )


def build_project(stage: StageParams, spec, examples, global_batch, out_dir, load_kwargs, base) -> Built:
    """(a) the train stage's trainer: its TrainingArguments, DeepSpeed, model preparation, collator and loss."""
    from ..train.runner import prepare_model
    from ..train.setup import (
        check_launch,
        configure_threads,
        init_deepspeed_comm,
        load_deepspeed_config,
        resolve_precision,
        set_dropout,
        training_arguments,
    )
    from ..train.trainer import SFTTrainer

    p = project_params(stage.section, spec, global_batch)
    configure_threads(p)
    check_launch(p)
    ds_config = load_deepspeed_config(p.deepspeed)
    bf16, fp16, _ = resolve_precision(p)
    args = training_arguments(p, stage.seed, out_dir, (bf16, fp16))
    args.report_to, args.disable_tqdm = [], True
    if ds_config is not None:
        init_deepspeed_comm()
    set_seed(stage.seed)
    model, tokenizer = load_model_and_tokenizer(base, **load_kwargs)
    set_dropout(model, p.dropout)
    prepared = prepare_model(model, StageParams(stage.seed, stage.tasks, p), ds_config)
    trainer = SFTTrainer(
        model=prepared.model,
        args=args,
        train_dataset=examples,
        data_collator=make_collator(tokenizer, packing=p.packing),
        processing_class=tokenizer,
        callbacks=[c for c in (prepared.unfreeze,) if c is not None],
        monitor=prepared.monitor,
        aux_loss_coef=0.0 if p.freeze_router else p.router_aux_loss_coef,
    )
    return Built(trainer, tokenizer, p.gradient_accumulation_steps)


def _precision(train) -> tuple[bool, bool]:
    from ..train.setup import resolve_precision

    bf16, fp16, _ = resolve_precision(train)
    return bf16, fp16


def build_hf(stage: StageParams, spec, examples, global_batch, out_dir, load_kwargs, base) -> Built:
    """(b) plain transformers.Trainer: the model's own loss (full logits), dynamic right padding, no packing."""
    from transformers import Trainer, TrainingArguments

    fields = shared_arguments(
        stage.section, spec, global_batch, out_dir, stage.seed, _precision(stage.section)
    )
    args = TrainingArguments(**fields)
    set_seed(stage.seed)
    model, tokenizer = load_model_and_tokenizer(base, **load_kwargs)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=make_collator(tokenizer, packing=False),  # DataCollatorForSeq2Seq, pad to batch max
        processing_class=tokenizer,
    )
    return Built(trainer, tokenizer, args.gradient_accumulation_steps)


def build_trl(stage: StageParams, spec, examples, global_batch, out_dir, load_kwargs, base) -> Built:
    """(c) TRL's SFTTrainer with its own collator, loss and defaults (see TRL_DEFAULTS) on the same tokens.

    The examples go in pre-tokenized (input_ids + labels, prompt masked): TRL keeps a given `labels` column as
    is, so every contender trains on identical tokens and targets.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    fields = shared_arguments(
        stage.section, spec, global_batch, out_dir, stage.seed, _precision(stage.section)
    )
    args = SFTConfig(**fields)
    set_seed(stage.seed)
    model, tokenizer = load_model_and_tokenizer(base, **load_kwargs)
    dataset = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return Built(trainer, tokenizer, args.gradient_accumulation_steps)


BUILDERS = {"project": build_project, "hf": build_hf, "trl": build_trl}


def trl_defaults() -> dict:
    """SFTConfig's defaults that decide how TRL batches and scores (recorded in bench.json)."""
    from trl import SFTConfig, __version__

    config = SFTConfig(output_dir="/tmp/unused", use_cpu=True, report_to="none")
    keys = (
        "packing",
        "packing_strategy",
        "padding_free",
        "completion_only_loss",
        "assistant_only_loss",
        "loss_type",
        "max_length",
        "pad_to_multiple_of",
        "shuffle_dataset",
        "gradient_checkpointing",
        "bf16",
        "learning_rate",
        "logging_steps",
    )
    return {"trl_version": __version__, **{k: getattr(config, k) for k in keys}}
