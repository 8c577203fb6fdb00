"""Distillation: student size, the KL term, a short run through the Trainer that saves a loadable student."""

from __future__ import annotations

import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config

import deepseek_sft.base_model as bm
from deepseek_sft.compress import distill as D
from deepseek_sft.compress.trainer import fine_tune
from deepseek_sft.config.compress import StudentParams
from deepseek_sft.config.model import TinyDeepseekParams
from deepseek_sft.sft_data import IGNORE_INDEX, build_examples, make_collator
from test_compress import tasks, tiny_model

torch.set_num_threads(2)


def _meta_count(config) -> int:
    with torch.device("meta"):
        return D.parameter_count(AutoModelForCausalLM.from_config(config))


def test_default_student_is_about_8x_smaller_than_the_default_teacher():
    tiny = TinyDeepseekParams()
    teacher = DeepseekV3Config(
        **tiny.model_dump(exclude={"tokenizer", "rope_theta"}),
        vocab_size=tiny.tokenizer.vocab_size,
        num_key_value_heads=tiny.num_attention_heads,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    )
    student = D.student_config(teacher, StudentParams())
    ratio = _meta_count(teacher) / _meta_count(student)
    assert 7.5 < ratio < 9.0
    assert student.vocab_size == teacher.vocab_size and student.head_dim == 8 and student.tie_word_embeddings


def test_kl_term_is_zero_for_equal_logits_scaled_by_t_squared_and_masked():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5], [IGNORE_INDEX, 1, 2, IGNORE_INDEX, IGNORE_INDEX]]
    )
    assert D.response_kl(teacher, teacher, labels, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    kl1 = D.response_kl(student, teacher, labels, 1.0)
    assert kl1 > 0
    # positions whose next label is masked do not count: changing them changes nothing
    changed = student.clone()
    changed[0, 0] += 5.0  # predicts labels[0, 1] = IGNORE
    assert D.response_kl(changed, teacher, labels, 1.0) == pytest.approx(kl1.item())
    # reference: mean over the 4 response positions of sum_v p_t (log p_t - log p_s), times T^2
    t_t = 3.0
    rows = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    rows = [(b, i) for b, i in rows if labels[b, i + 1] != IGNORE_INDEX]
    ref = sum(
        torch.sum(
            torch.softmax(teacher[b, i] / t_t, -1)
            * (torch.log_softmax(teacher[b, i] / t_t, -1) - torch.log_softmax(student[b, i] / t_t, -1))
        ).item()
        for b, i in rows
    ) / len(rows)
    assert D.response_kl(student, teacher, labels, t_t).item() == pytest.approx(ref * t_t**2, rel=1e-5)


def small_student(hidden_size: int) -> StudentParams:
    """A student of the tests' tiny teacher at `hidden_size` (everything else small and fixed)."""
    return StudentParams(
        hidden_size=hidden_size,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_attention_heads=2,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
    )


def distill(student, teacher, tokenizer, examples, *, max_steps: int, alpha: float, **kwargs):
    """A short distillation run through fine_tune (8 examples per step, lr 1e-2, T = 2, seed 0)."""
    return fine_tune(
        student,
        tokenizer,
        examples,
        max_steps=max_steps,
        learning_rate=1e-2,
        batch_size=8,
        seed=0,
        trainer_class=D.distill_trainer_class(),
        teacher=teacher,
        temperature=2.0,
        alpha=alpha,
        **kwargs,
    )


@pytest.mark.slow
def test_short_distillation_run_trains_and_saves_a_loadable_student(tmp_path):
    teacher, tokenizer, train = tiny_model(n_records=30)
    student = D.build_student(teacher, small_student(hidden_size=32), seed=0)
    assert D.parameter_count(teacher) / D.parameter_count(student) > 3
    with torch.no_grad():  # a random teacher is near-uniform; make it opinionated so there is much to learn
        teacher.lm_head.weight.mul_(40.0)
    examples, _ = build_examples(train, tasks(), tokenizer, 128)
    batch = make_collator(tokenizer)(examples[:16])

    def kl_now() -> float:
        with torch.no_grad():
            return D.response_kl(
                student(**batch).logits, teacher(**batch).logits, batch["labels"], 2.0
            ).item()

    before = kl_now()
    trainer, stats = distill(student, teacher, tokenizer, examples, max_steps=6, alpha=0.9)
    assert stats["steps"] == 6 and len(trainer.loss_parts["kl"]) == 6
    assert all(math.isfinite(v) and v >= 0 for v in trainer.loss_parts["kl"])
    assert kl_now() < 0.95 * before  # the student moved towards the teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    from deepseek_sft.compress.storage import save_plain

    save_plain(student, tokenizer, tmp_path / "distill", {"dsft_distillation": {"steps": 4}})
    loaded, loaded_tok = bm.load_model_and_tokenizer(tmp_path / "distill")
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()
    ids = torch.tensor([tokenizer("转账失败了")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, student.eval()(ids).logits, atol=1e-5)


def test_student_embeddings_start_from_the_teachers_principal_directions():
    teacher, _, _ = tiny_model(n_records=20)
    student = D.build_student(teacher, small_student(hidden_size=64), seed=0)  # the teacher's width
    assert D.init_from_teacher(student, teacher) == pytest.approx(1.0)
    # at full width the projection is a rotation: every dot product between token embeddings is kept
    e_t, e_s = teacher.get_input_embeddings().weight, student.get_input_embeddings().weight
    assert torch.allclose(e_s @ e_s.T, e_t @ e_t.T, atol=1e-5)
    assert student.lm_head.weight is e_s  # tied: the head starts from the same table
    narrow = D.build_student(teacher, small_student(hidden_size=16), seed=0)
    kept = D.init_from_teacher(narrow, teacher)
    assert 16 / 64 < kept < 1.0  # the top directions hold more than their share of the energy
    assert narrow.get_input_embeddings().weight.pow(2).mean().item() == pytest.approx(
        e_t.pow(2).mean().item(), rel=1e-4
    )


def test_short_runs_train_on_every_core_and_give_the_callers_threads_back(monkeypatch):
    """Compress evaluates with one thread; its training runs must not leave the other cores idle."""
    from transformers import TrainerCallback

    from deepseek_sft.config.train import TrainParams

    teacher, tokenizer, train = tiny_model(n_records=12)
    examples, _ = build_examples(train, tasks(), tokenizer, 128)
    seen = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append((torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")))

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        params = TrainParams(deepspeed=None, num_processes=1, threads_per_process=2)
        fine_tune(
            teacher,
            tokenizer,
            examples,
            train=params,
            max_steps=2,
            learning_rate=1e-3,
            batch_size=4,
            seed=0,
            callbacks=[Watch()],
        )
        assert seen == [(2, "2"), (2, "2")]
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(2)


# --- the teacher cache ----------------------------------------------------------------------------------------


def _online_rows(teacher, batch) -> torch.Tensor:
    keep = D.target_mask(batch["labels"])
    features = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
    with torch.no_grad():
        return D.target_rows(teacher(**features, logits_to_keep=keep, use_cache=False).logits, keep)


def test_teacher_cache_gives_the_teachers_own_rows_for_packed_and_padded_batches():
    teacher, tokenizer, train = tiny_model(n_records=10)
    examples, _ = build_examples(train, tasks(), tokenizer, 128)
    examples = examples + examples[:3]  # duplicates are computed once and found again
    cache = D.TeacherTargets.compute(teacher, examples, make_collator(tokenizer), batch_size=7)
    distinct = len({D.example_key(e["input_ids"]) for e in examples})
    assert len(cache.spans) == distinct == len(examples) - 3
    assert cache.rows.shape == (sum(map(D.target_count, examples[:-3])), teacher.config.vocab_size)
    assert D.TeacherTargets.size_gb(examples[:-3], teacher.config.vocab_size) == pytest.approx(
        cache.rows.numel() * 4 / 1e9
    )
    chosen = [examples[i] for i in (12, 0, 31, 5, 30, 7)]
    for packing in (True, False):
        batch = make_collator(tokenizer, packing=packing)(chosen)
        n_targets = int(D.target_mask(batch["labels"]).sum())
        assert torch.allclose(cache.for_batch(batch, n_targets), _online_rows(teacher, batch), atol=1e-5)


def test_teacher_cache_refuses_an_unknown_example_and_a_wrong_target_count():
    teacher, tokenizer, train = tiny_model(n_records=6)
    examples, _ = build_examples(train, tasks(), tokenizer, 128)
    cache = D.TeacherTargets.compute(teacher, examples[:4], make_collator(tokenizer), batch_size=4)
    with pytest.raises(KeyError, match="not in the teacher cache"):
        cache.for_batch(make_collator(tokenizer)(examples[4:6]), 1)
    batch = make_collator(tokenizer)(examples[:2])
    with pytest.raises(ValueError, match=r"teacher cache: \d+ rows for a batch with 1 target tokens"):
        cache.for_batch(batch, 1)


def test_cached_distillation_follows_the_online_teacher_step_for_step():
    """Same seed, same examples: the cached run's KL and CE are the online run's (the teacher is the same)."""
    runs, teacher_passes = {}, {}
    for budget in (0.0, 1e-9, 1.0):  # never, too small a budget, room
        teacher, tokenizer, train = tiny_model(n_records=20)
        examples, _ = build_examples(train, tasks(), tokenizer, 128)
        student = D.build_student(teacher, small_student(hidden_size=32), seed=0)
        passes = []
        teacher.register_forward_hook(lambda *_, passes=passes: passes.append(1))
        runs[budget], _ = distill(
            student, teacher, tokenizer, examples, max_steps=4, alpha=0.5, teacher_cache_max_gb=budget
        )
        teacher_passes[budget] = len(passes)
    online, cached = runs[0.0], runs[1.0]
    assert online.cache_stats["teacher_cached"] == runs[1e-9].cache_stats["teacher_cached"] == 0
    assert cached.cache_stats["teacher_cached"] == 1
    # online: one teacher pass per step; cached: only the passes that filled the cache (60 examples, 64 a pass)
    assert teacher_passes[0.0] == teacher_passes[1e-9] == 4 and teacher_passes[1.0] == 1
    assert 0 < cached.cache_stats["teacher_cache_gb"] < 1.0
    for part in ("kl", "ce"):
        assert cached.loss_parts[part] == pytest.approx(online.loss_parts[part], rel=1e-4)
