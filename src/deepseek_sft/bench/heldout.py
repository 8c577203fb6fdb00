"""The one held-out loss every contender is scored with: mean cross-entropy over the response tokens of val.

Token-weighted (total NLL of all response tokens / their count), the same definition as the train stage's
eval_loss. Examples are right-padded in length-sorted batches, and logits are computed only at the positions
that predict a response token (the others would be thrown away).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..sft_data import IGNORE_INDEX


def _right_pad(examples: Sequence[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[row, :n] = torch.tensor(ex["input_ids"])
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex["labels"])
    return ids, mask, labels


@torch.inference_mode()
def heldout_sums(model, examples: Sequence[dict], pad_id: int, batch_size: int = 64) -> tuple[float, int]:
    """(summed NLL, number of response tokens) of `examples` (dicts with input_ids and labels)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total, count = 0.0, 0
    try:
        for start in range(0, len(order), batch_size):
            ids, mask, labels = _right_pad([examples[i] for i in order[start : start + batch_size]], pad_id)
            # position t predicts token t+1: keep the positions whose next token is a target
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
            keep = targets != IGNORE_INDEX
            if not keep.any():
                continue
            out = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                logits_to_keep=keep.to(device),
                use_cache=False,
            )
            logits = out.logits.float().reshape(-1, out.logits.shape[-1])
            total += float(F.cross_entropy(logits, targets[keep].to(device), reduction="sum"))
            count += int(keep.sum())
    finally:
        model.train(was_training)
    return total, count


def heldout_loss(model, examples: Sequence[dict], pad_id: int, batch_size: int = 64) -> float:
    """Mean cross-entropy per response token of `examples` (nan if they hold no response token)."""
    total, count = heldout_sums(model, examples, pad_id, batch_size)
    return total / count if count else float("nan")
