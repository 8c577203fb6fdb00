"""Knowledge distillation: a smaller student of the teacher's architecture family, trained on its logits.

Loss per step: alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels),
both over the response tokens only (the SFT labels mask the prompt). T^2 keeps the soft-target gradients on
the scale of the hard-target ones (Hinton et al., 2015). The student shares the teacher's tokenizer, so the two
vocabularies (and logits) line up token for token. Training runs through the train stage's Trainer machinery
(`DistillTrainer` only swaps the loss); the teacher stays frozen in eval mode beside it. When its logits at
the target tokens fit the memory budget, the teacher runs once per distinct example before training
(`TeacherTargets`) instead of at every step.
"""

from __future__ import annotations

import itertools
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, set_seed

from ..config.compress import StudentParams
from ..sft_data import IGNORE_INDEX
from ..train.varlen import example_lengths
from .trainer import base_trainer_class

log = logging.getLogger(__name__)

# examples per teacher forward pass while filling the cache: larger than a training batch, since no
# gradients are kept (fewer, fuller passes)
CACHE_BATCH_SIZE = 64


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


def example_key(input_ids) -> bytes:
    """An example's identity in the teacher cache: its token ids (equal ids, equal teacher logits)."""
    return torch.as_tensor(input_ids, dtype=torch.int64).numpy().tobytes()


def batch_examples(inputs: dict) -> list[torch.Tensor]:
    """The token ids of each example in a collated batch, in order: packed rows are split where position
    ids restart, right-padded rows are cut at their attention mask."""
    ids = inputs["input_ids"]
    if "attention_mask" in inputs:
        return [row[mask.bool()] for row, mask in zip(ids, inputs["attention_mask"], strict=True)]
    positions = inputs["position_ids"].expand_as(ids)
    return [
        piece for row, pos in zip(ids, positions, strict=True) for piece in row.split(example_lengths(pos))
    ]


def target_count(example: dict) -> int:
    """Target rows of one example: its response tokens (position 0 is always prompt, never a target)."""
    return sum(1 for label in example["labels"] if label != IGNORE_INDEX)


class TeacherTargets:
    """The frozen teacher's logits at every example's target positions, computed once before training.

    A distillation step otherwise spends about half its time on the teacher's forward pass, and the default
    run shows the student each example ~1.9 times (1,500 steps x 16 of 12,471 examples). Rows are stored in
    float32, as the teacher returns them, and looked up by the example's token ids.
    """

    def __init__(self, rows: torch.Tensor, spans: dict[bytes, tuple[int, int]]):
        self.rows, self.spans = rows, spans

    @staticmethod
    def size_gb(examples: list[dict], vocab_size: int) -> float:
        """Memory the cache takes: every target row, vocabulary-wide, in float32."""
        return sum(target_count(e) for e in examples) * vocab_size * 4 / 1e9

    @classmethod
    @torch.no_grad()
    def compute(cls, teacher: nn.Module, examples: list[dict], collator, batch_size: int) -> TeacherTargets:
        """Run the teacher over the distinct examples, `batch_size` at a time, through the training collator."""
        distinct = list({example_key(e["input_ids"]): e for e in examples}.items())
        counts = [target_count(e) for _, e in distinct]
        rows = torch.empty(sum(counts), teacher.config.vocab_size, dtype=torch.float32)
        starts = [0, *itertools.accumulate(counts)]
        spans = {key: (starts[i], starts[i + 1]) for i, (key, _) in enumerate(distinct)}
        teacher.eval()
        for first in range(0, len(distinct), batch_size):
            batch = collator([e for _, e in distinct[first : first + batch_size]])
            batch = {k: v.to(teacher.device) for k, v in batch.items() if k != "shift_labels"}
            keep = target_mask(batch.pop("labels"))
            logits = teacher(**batch, logits_to_keep=keep, use_cache=False).logits
            end = starts[min(first + batch_size, len(distinct))]
            rows[starts[first] : end] = target_rows(logits, keep).float().cpu()
        return cls(rows, spans)

    def for_batch(self, inputs: dict, n_targets: int) -> torch.Tensor:
        """[n_targets, vocab] teacher rows of a collated batch, in the order target_rows gives the student's."""
        try:
            spans = [self.spans[example_key(ids)] for ids in batch_examples(inputs)]
        except KeyError:
            raise KeyError(
                "a batch example is not in the teacher cache (was it built from these examples?)"
            ) from None
        rows = torch.cat([self.rows[a:b] for a, b in spans])
        if rows.shape[0] != n_targets:
            raise ValueError(
                f"teacher cache: {rows.shape[0]} rows for a batch with {n_targets} target tokens"
            )
        return rows


def distill_trainer_class():
    """`DistillTrainer`: the train stage's SFTTrainer with the distillation loss added."""
    base = base_trainer_class()

    class DistillTrainer(base):
        """SFTTrainer whose loss is alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE.

        SFTTrainer computes the student's logits only at target positions (`logits_to_keep` mask); the
        teacher's rows at the same positions come from its cache (computed once, when it takes at most
        `teacher_cache_max_gb`) or from running the teacher with the same mask at every step.
        """

        def __init__(
            self,
            *args,
            teacher: nn.Module,
            temperature: float,
            alpha: float,
            teacher_cache_max_gb: float = 0.0,
            **kwargs,
        ):
            super().__init__(*args, **kwargs)
            self.teacher = teacher.eval().requires_grad_(False)
            self.temperature, self.alpha = temperature, alpha
            self.teacher_cache_max_gb = teacher_cache_max_gb
            self.teacher_targets: TeacherTargets | None = None
            self.loss_parts: dict[str, list[float]] = {"kl": [], "ce": []}
            self.cache_stats: dict[str, float] = {}

        def train(self, *args, **kwargs):
            """Fill the teacher cache first when it fits (inside the caller's thread and attention setup)."""
            gb = TeacherTargets.size_gb(self.train_dataset, self.teacher.config.vocab_size)
            self.cache_stats = {"teacher_cache_gb": gb, "teacher_cache_s": 0.0, "teacher_cached": 0}
            if 0 < gb <= self.teacher_cache_max_gb and self.teacher_targets is None:
                started = time.perf_counter()
                self.teacher_targets = TeacherTargets.compute(
                    self.teacher, self.train_dataset, self.data_collator, CACHE_BATCH_SIZE
                )
                self.cache_stats |= {"teacher_cache_s": time.perf_counter() - started, "teacher_cached": 1}
                log.info(
                    "teacher cache: %.2f GB of target logits in %.1fs",
                    gb,
                    self.cache_stats["teacher_cache_s"],
                )
            return super().train(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ce, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            keep = target_mask(inputs["labels"])
            student_rows = target_rows(outputs.logits, keep)
            kl = kl_divergence(student_rows, self._teacher_rows(inputs, keep), self.temperature)
            if model.training:
                self.loss_parts["kl"].append(float(kl.detach()))
                self.loss_parts["ce"].append(float(ce.detach()))
            loss = self.alpha * kl + (1.0 - self.alpha) * ce
            return (loss, outputs) if return_outputs else loss

        def _teacher_rows(self, inputs: dict, keep: torch.Tensor) -> torch.Tensor:
            if self.teacher_targets is not None:
                return self.teacher_targets.for_batch(inputs, int(keep.sum())).to(keep.device)
            features = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
            with torch.no_grad():
                self.teacher.to(keep.device)
                logits = self.teacher(**features, logits_to_keep=keep, use_cache=False).logits
            return target_rows(logits, keep)

    return DistillTrainer


def parameter_count(model: nn.Module) -> int:
    """Parameters held by a model (tied tensors once)."""
    return sum(p.numel() for p in model.parameters())
