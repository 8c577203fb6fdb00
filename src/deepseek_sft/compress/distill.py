"""Knowledge distillation: a smaller student of the teacher's architecture family, trained on its logits.

Loss per step: alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels),
both over the response tokens only (the SFT labels mask the prompt). T^2 keeps the soft-target gradients on
the scale of the hard-target ones (Hinton et al., 2015). The student shares the teacher's tokenizer, so the two
vocabularies (and logits) line up token for token. Training runs through the train stage's Trainer machinery
(`DistillTrainer` only swaps the loss); the teacher stays frozen in eval mode beside it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, set_seed

from ..config.compress import StudentParams
from ..sft_data import IGNORE_INDEX
from .trainer import base_trainer_class

log = logging.getLogger(__name__)


def student_config(teacher_config, student: StudentParams):
    """The teacher's config with the student's sizes (vocabulary, special tokens, RoPE etc. unchanged)."""
    values = teacher_config.to_dict()
    values.update(student.model_dump())
    values["num_key_value_heads"] = student.num_attention_heads
    # head_dim / qk_head_dim are derived from the head sizes when the config is built: recompute them
    for key in ("dsft_compression", "quantization_config", "architectures", "head_dim", "qk_head_dim"):
        values.pop(key, None)
    return teacher_config.__class__.from_dict(values)


def build_student(teacher: nn.Module, student: StudentParams, seed: int) -> nn.Module:
    """A freshly initialised (seeded) student in the teacher's dtype, with the teacher's generation config."""
    set_seed(seed)
    config = student_config(teacher.config, student)
    model = AutoModelForCausalLM.from_config(
        config, dtype=teacher.dtype, attn_implementation=teacher.config._attn_implementation
    )
    model.generation_config = teacher.generation_config
    return model


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher: nn.Module) -> float:
    """Start the student's embedding table (and an untied lm_head) from the teacher's, projected onto the top
    `student.hidden_size` principal directions of the teacher's embedding (SVD), per-coordinate RMS kept.

    Only the vocabulary tables carry over: the student's width differs, and they are most of its parameters.
    Returns the share of the teacher embedding's energy the projection keeps.
    """
    embedding = teacher.get_input_embeddings().weight.float()
    _, singular, vh = torch.linalg.svd(embedding, full_matrices=False)
    width = student.config.hidden_size
    basis = vh[:width].T  # [teacher hidden, student hidden]
    targets = [(student.get_input_embeddings().weight, embedding)]
    if not student.config.tie_word_embeddings and student.get_output_embeddings() is not None:
        targets.append(
            (student.get_output_embeddings().weight, teacher.get_output_embeddings().weight.float())
        )
    for weight, source in targets:
        projected = source @ basis
        projected *= source.pow(2).mean().sqrt() / projected.pow(2).mean().sqrt().clamp(min=1e-12)
        weight.copy_(projected.to(weight.dtype))
    return float(singular[:width].pow(2).sum() / singular.pow(2).sum())


def kl_divergence(student_rows: torch.Tensor, teacher_rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over rows of KL(softmax(teacher / T) || softmax(student / T)); rows are [n, vocab] logits."""
    if student_rows.shape[0] == 0:
        return student_rows.sum() * 0.0
    s = F.log_softmax(student_rows.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_rows.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a target (logits at t predict labels at t + 1), as the SFT loss uses."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX) != IGNORE_INDEX


def target_rows(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[n_targets, vocab] logits: selected by `keep` unless the model already returned only those rows."""
    rows = logits.reshape(-1, logits.shape[-1])
    if rows.shape[0] == keep.numel() and rows.shape[0] != int(keep.sum()):
        return rows[keep.reshape(-1)]
    return rows


def response_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """`kl_divergence` over the response positions of full [batch, seq, vocab] logits."""
    keep = target_mask(labels)
    return kl_divergence(target_rows(student_logits, keep), target_rows(teacher_logits, keep), temperature)


def distill_trainer_class():
    """`DistillTrainer`: the train stage's SFTTrainer with the distillation loss added."""
    base = base_trainer_class()

    class DistillTrainer(base):
        """SFTTrainer whose loss is alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE.

        SFTTrainer computes the student's logits only at target positions (`logits_to_keep` mask); the
        teacher runs with the same mask, so both give the same [n_targets, vocab] rows.
        """

        def __init__(self, *args, teacher: nn.Module, temperature: float, alpha: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher.eval().requires_grad_(False)
            self.temperature, self.alpha = temperature, alpha
            self.loss_parts: dict[str, list[float]] = {"kl": [], "ce": []}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ce, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            keep = target_mask(inputs["labels"])
            features = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
            with torch.no_grad():
                self.teacher.to(outputs.logits.device)
                teacher_logits = self.teacher(**features, logits_to_keep=keep, use_cache=False).logits
            kl = kl_divergence(
                target_rows(outputs.logits, keep), target_rows(teacher_logits, keep), self.temperature
            )
            if model.training:
                self.loss_parts["kl"].append(float(kl.detach()))
                self.loss_parts["ce"].append(float(ce.detach()))
            loss = self.alpha * kl + (1.0 - self.alpha) * ce
            return (loss, outputs) if return_outputs else loss

    return DistillTrainer


def parameter_count(model: nn.Module) -> int:
    """Parameters held by a model (tied tensors once)."""
    return sum(p.numel() for p in model.parameters())
