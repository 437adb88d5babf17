"""Teacher caches: a frozen language teacher computes its per-example context once."""

from __future__ import annotations

import pytest
import torch

from recdistill.models import build_model
from recdistill.models.cache import ContextCache

ROWS = torch.tensor([3, 11, 2024, 50_000, 77_777, 99_998])
SMALL_T5 = {"d_model": 64, "d_ff": 128, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 3,
            "dropout": 0.0}  # fmt: skip
FP16_TOL = {"atol": 2e-2, "rtol": 1e-2}


def build(prepared, name):
    torch.manual_seed(0)
    return build_model(name, prepared, SMALL_T5 if name == "t5" else {"dropout": 0.0})


class CallCounter:
    """Counts the rows each call of a module receives (a forward hook, the module untouched)."""

    def __init__(self, module):
        self.calls, self.rows = 0, 0
        module.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        self.calls += 1
        self.rows += len(args[0] if args else kwargs["input_ids"])


def context_module(teacher):
    """The module that computes the cached context: the T5 encoder or MiniLM's layer 1."""
    return teacher.t5.encoder if hasattr(teacher, "t5") else teacher.encoder.encoder.layer[0]


@pytest.fixture(scope="module", params=["t5", "minilm"])
def teachers(prepared, request):
    """(frozen with cache, same weights frozen without cache) of one kind."""
    cached = build(prepared, request.param).freeze(cache_budget_bytes=1 << 26)
    plain = build(prepared, request.param).freeze(cache_budget_bytes=0)
    return cached, plain


def test_freeze_sets_eval_mode_no_grad_and_the_cache(prepared):
    teacher = build(prepared, "t5")
    assert teacher.context_cache is None and teacher.training
    teacher.freeze(cache_budget_bytes=1 << 20)
    assert not teacher.training and teacher.context_cache is not None
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()  # e.g. a distillation module holding it is put in training
    assert not teacher.training
    teacher.unfreeze()
    assert teacher.training and teacher.context_cache is None
    assert all(p.requires_grad for p in teacher.parameters())


def test_cached_middle_equals_uncached_and_skips_the_encoder(prepared, teachers):
    cached, plain = teachers
    batch = prepared.data.batch(ROWS)
    question = torch.randn(len(ROWS), cached.early_dim)
    with torch.no_grad():
        expected = plain.middle(question, batch)
        first = cached.middle(question, batch)  # misses: computes and stores
        counter = CallCounter(context_module(cached))
        again = cached.middle(question, batch)
        early = cached.early(batch)
    assert counter.calls == 0  # hits: no encoder
    torch.testing.assert_close(first, expected, **FP16_TOL)
    torch.testing.assert_close(again, first)
    torch.testing.assert_close(early, plain.early(batch), **FP16_TOL)
    stats = cached.cache_stats()
    assert stats["misses"] >= len(ROWS) and stats["hits"] >= 2 * len(ROWS)
    assert stats["rows_stored"] >= len(ROWS)


def test_only_missing_rows_run_the_encoder(prepared, teachers):
    cached, _ = teachers
    known = prepared.data.batch(ROWS)
    mixed = prepared.data.batch(torch.cat([ROWS[:3], torch.tensor([123, 456])]))
    with torch.no_grad():
        cached.middle(torch.zeros(len(ROWS), cached.early_dim), known)
        counter = CallCounter(context_module(cached))
        cached.middle(torch.zeros(5, cached.early_dim), mixed)
    assert counter.calls == 1 and counter.rows == 2


def test_gradient_reaches_the_question_through_a_cached_middle(prepared, teachers):
    cached, _ = teachers
    batch = prepared.data.batch(ROWS)
    question = torch.randn(len(ROWS), cached.early_dim, requires_grad=True)
    cached.head(cached.middle(question, batch)).sum().backward()
    assert question.grad is not None and question.grad.abs().sum() > 0


def test_over_the_budget_rows_are_recomputed_with_the_same_answers(prepared):
    roomy = build(prepared, "t5").freeze(cache_budget_bytes=1 << 26)
    tight_budget = int(roomy.tokens.lengths[ROWS[:2]].sum()) * roomy.context_width * 2  # two rows
    tight = build(prepared, "t5").freeze(cache_budget_bytes=tight_budget)
    batch = prepared.data.batch(ROWS)
    question = torch.randn(len(ROWS), tight.early_dim)
    with torch.no_grad():
        expected = roomy.middle(question, batch)
        first = tight.middle(question, batch)
        counter = CallCounter(context_module(tight))
        second = tight.middle(question, batch)
    assert tight.cache_stats()["rows_stored"] == 2
    assert tight.cache_stats()["bytes_used"] <= tight_budget
    assert counter.calls == 1 and counter.rows == len(ROWS) - 2  # the rest is recomputed
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)


def test_an_unfrozen_teacher_never_caches(prepared):
    teacher = build(prepared, "t5").eval()
    batch = prepared.data.batch(ROWS)
    counter = CallCounter(context_module(teacher))
    with torch.no_grad():
        teacher.middle(torch.zeros(len(ROWS), teacher.early_dim), batch)
        teacher.middle(torch.zeros(len(ROWS), teacher.early_dim), batch)
    assert counter.calls == 2 and teacher.cache_stats()["hits"] == 0


# ---------------------------------------------------------------- the store itself


def test_context_cache_stores_variable_lengths_in_fp16():
    cache = ContextCache(num_rows=10, width=3, budget_bytes=1000)
    states = torch.randn(2, 4, 3)
    rows, lengths = torch.tensor([5, 2]), torch.tensor([4, 2])
    out = cache.fetch(rows, lengths, lambda index: states[index])
    torch.testing.assert_close(out, states.half().float())
    again = cache.fetch(rows, lengths, lambda index: pytest.fail("should be a hit"))
    torch.testing.assert_close(again[0], states[0].half().float())
    torch.testing.assert_close(again[1, :2], states[1, :2].half().float())
    assert cache.store.dtype == torch.float16
    assert cache.bytes_used == (4 + 2) * 3 * 2  # only the real tokens
    assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 2


def test_context_cache_stores_a_repeated_row_once():
    cache = ContextCache(num_rows=4, width=2, budget_bytes=1000)
    states = torch.randn(3, 2, 2)
    cache.fetch(torch.tensor([1, 1, 2]), torch.tensor([2, 2, 2]), lambda index: states[index])
    assert cache.rows_stored == 2 and cache.bytes_used == 2 * 2 * 2 * 2


def test_context_cache_rejects_a_negative_budget():
    with pytest.raises(ValueError, match="cache_budget_bytes"):
        ContextCache(num_rows=4, width=2, budget_bytes=-1)
