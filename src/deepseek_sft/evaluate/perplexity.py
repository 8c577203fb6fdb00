"""Perplexity on response tokens only, over the same examples training builds (sft_data.build_examples)."""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .metrics import perplexity

IGNORE = -100


def left_pad_examples(examples: Sequence[dict], pad_id: int, device) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, position_ids and labels, left-padded so every response ends the row.

    Position ids count real tokens only, exactly as generate() numbers a left-padded prompt.
    """
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[row, width - n :] = torch.tensor(ex["input_ids"], dtype=torch.long)
        mask[row, width - n :] = 1
        labels[row, width - n :] = torch.tensor(ex["labels"], dtype=torch.long)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def _tail_length(labels: torch.Tensor) -> int:
    """Positions whose logits are needed: the longest response plus the prompt's last token."""
    scored = labels != IGNORE
    first = torch.where(scored.any(dim=1), scored.float().argmax(dim=1), labels.shape[1])
    return int(labels.shape[1] - first.min()) + 1


@torch.inference_mode()
def response_nll(model, examples: Sequence[dict], pad_id: int, batch_size: int) -> list[tuple[float, int]]:
    """(summed NLL, scored tokens) of each example's response tokens (labels != -100), in input order.

    Rows are left-padded so all responses end at the last column; the LM head then runs only over the
    tail that holds responses (`logits_to_keep`) instead of every prompt token: most of the saving of
    a vocabulary-sized head.
    """
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = left_pad_examples([examples[i] for i in chunk], pad_id, model.device)
        labels = batch.pop("labels")
        extra = {"logits_to_keep": min(_tail_length(labels), labels.shape[1])} if keep_arg else {}
        logits = model(**batch, use_cache=False, **extra).logits.float()
        # logits[:, j] predicts the token after position j; align on the last logits.shape[1] columns
        targets = labels[:, labels.shape[1] - logits.shape[1] + 1 :]
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE,
            reduction="none",
        ).view(targets.shape)
        counts = (targets != IGNORE).sum(dim=1)
        for i, total, n in zip(chunk, nll.sum(dim=1).tolist(), counts.tolist(), strict=True):
            out[i] = (float(total), int(n))
    return out


def perplexity_by_task(examples: Sequence[dict], nll: Sequence[tuple[float, int]]) -> dict[str, dict]:
    """Token-weighted perplexity per task (exp of total NLL / total response tokens)."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ex, (total, n) in zip(examples, nll, strict=True):
        sums[ex["task"]][0] += total
        sums[ex["task"]][1] += n
    return {
        task: {
            "perplexity": perplexity(total, int(n)),
            "ppl_tokens": int(n),
            "nll_per_token": total / n if n else 0.0,
        }
        for task, (total, n) in sums.items()
    }
