"""The per-entity cache: frozen lower layers run once per user and per item, on disk, reused."""

from __future__ import annotations

import pytest
import torch

from features import DataConfig
from features.batches import prepare
from recdistill.models import build_model
from recdistill.models.entity_cache import EntityStates, cache_key

ROWS = torch.tensor([3, 11, 2024, 50_000, 77_777, 99_998])
SMALL_T5 = {"d_model": 64, "d_ff": 128, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 3,
            "dropout": 0.0}  # fmt: skip
MINILM = {"dropout": 0.0, "frozen_layers": 1}
FP16_TOL = {"atol": 2e-2, "rtol": 1e-2}


class RowCounter:
    """Counts calls of a module and the rows they carry (a forward hook, the module untouched)."""

    def __init__(self, module):
        self.calls, self.rows = 0, 0
        self.handle = module.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        self.calls += 1
        self.rows += len(args[0] if args else kwargs.get("input_ids", kwargs.get("hidden_states")))


def minilm(prepared, cache_dir, seed=0):
    torch.manual_seed(seed)
    return build_model("minilm", prepared, {**MINILM, "cache_dir": str(cache_dir)})


def test_the_frozen_part_runs_once_per_entity_not_per_rating(prepared, tmp_path):
    teacher = minilm(prepared, tmp_path)
    counter = RowCounter(teacher.encoder.encoder.layer[0])
    with torch.no_grad():
        teacher(prepared.data.batch(ROWS))
        teacher(prepared.data.batch(prepared.data.splits["train"][:2048]))
    sizes = prepared.vocabs.sizes
    assert counter.rows == sizes["user_id"] + sizes["item_id"]  # 944 + 1,683, whatever the rows
    stats = teacher.cache_stats()
    assert stats["user"]["built"] and stats["item"]["built"]
    assert stats["item"]["entities"] == sizes["item_id"]


def test_a_second_build_reuses_the_file_and_answers_the_same(prepared, tmp_path):
    batch = prepared.data.batch(ROWS)
    first = minilm(prepared, tmp_path).eval()
    with torch.no_grad():
        expected = first(batch)
    second = minilm(prepared, tmp_path).eval()
    counter = RowCounter(second.encoder.encoder.layer[0])
    with torch.no_grad():
        again = second(batch)
    assert counter.calls == 0
    assert not second.cache_stats()["user"]["built"] and not second.cache_stats()["item"]["built"]
    assert second.cache_stats()["item"]["path"] == first.cache_stats()["item"]["path"]
    torch.testing.assert_close(again, expected)


def test_the_cache_is_fp16_on_disk_and_memory_mapped(prepared, tmp_path):
    teacher = minilm(prepared, tmp_path)
    states = teacher.part_states("item")
    assert states.states.dtype == torch.float16
    assert states.path.stat().st_size == 2 * states.states.numel()
    assert states.path.parent == tmp_path


def test_cached_answers_equal_the_frozen_layers_run_on_the_spot(prepared, tmp_path):
    teacher = minilm(prepared, tmp_path).eval()
    batch = prepared.data.batch(ROWS)
    question = torch.randn(len(ROWS), teacher.early_dim)
    with torch.no_grad():
        cached = teacher.middle(question, batch)
        parts = []
        for part in ("user", "item"):
            tokens = teacher.parts.users if part == "user" else teacher.parts.items
            ids, mask = tokens.lookup(batch.ids(f"{part}_id"))
            parts.append((teacher.encode_part(ids, mask, teacher.first_position(part)), mask))
        states = torch.cat([p[0] for p in parts], 1)
        mask = torch.cat([p[1] for p in parts], 1)
        torch.testing.assert_close(cached, teacher._upper(question, states, mask), **FP16_TOL)


@pytest.mark.parametrize("change", ["template", "weights"])
def test_a_changed_template_or_weights_builds_a_new_cache(prepared, tmp_path, change):
    base = minilm(prepared, tmp_path)
    base.part_states("user")
    if change == "template":
        other = prepare(DataConfig(user_template="a {age}-year-old {occupation}, id u-{user_id}."))
        teacher = minilm(other, tmp_path)
    else:
        teacher = minilm(prepared, tmp_path)
        with torch.no_grad():
            teacher.encoder.embeddings.word_embeddings.weight[100] += 1.0
    states = teacher.part_states("user")
    assert states.built and states.path != base.part_states("user").path


def test_a_truncated_cache_file_is_rebuilt(prepared, tmp_path):
    path = minilm(prepared, tmp_path).part_states("user").path
    path.write_bytes(path.read_bytes()[:1000])
    states = minilm(prepared, tmp_path).part_states("user")
    assert states.built and states.path.stat().st_size == 2 * states.states.numel()


def test_freeze_keeps_eval_mode_and_no_gradients_even_inside_a_training_module(prepared, tmp_path):
    teacher = minilm(prepared, tmp_path)
    assert teacher.training and any(p.requires_grad for p in teacher.parameters())
    teacher.freeze()
    teacher.train()  # e.g. a distillation module holding it is put in training
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher.unfreeze()
    assert teacher.training
    assert all(not p.requires_grad for m in teacher.lower_modules() for p in m.parameters())
    assert all(p.requires_grad for p in teacher.encoder.encoder.layer[1].parameters())


def test_frozen_t5_reads_its_encoder_states_from_the_cache(prepared, tmp_path):
    torch.manual_seed(0)
    teacher = build_model("t5", prepared, {**SMALL_T5, "cache_dir": str(tmp_path)}).eval()
    batch = prepared.data.batch(ROWS)
    question = torch.randn(len(ROWS), teacher.early_dim)
    with torch.no_grad():
        expected = teacher.middle(question, batch)  # trainable encoder: run on the spot
        teacher.freeze()
        first = teacher.middle(question, batch)  # builds the cache
        counter = RowCounter(teacher.t5.encoder)
        again = teacher.middle(question, batch)
    assert counter.calls == 0
    torch.testing.assert_close(first, expected, **FP16_TOL)
    torch.testing.assert_close(again, first)


def test_a_training_t5_encodes_each_distinct_entity_of_a_batch_once(prepared, tmp_path):
    torch.manual_seed(0)
    teacher = build_model("t5", prepared, {**SMALL_T5, "cache_dir": str(tmp_path)}).train()
    batch = prepared.data.batch(prepared.data.splits["train"][:512])
    counter = RowCounter(teacher.t5.encoder)
    teacher(batch)
    distinct = len(torch.unique(batch.ids("user_id"))) + len(torch.unique(batch.ids("item_id")))
    assert counter.rows == distinct < 2 * len(batch)
    assert not list(tmp_path.iterdir())  # nothing cached while the encoder trains


def test_cache_keys_depend_on_every_part():
    assert cache_key("a", "b") != cache_key("a", "c") != cache_key("b", "a")
    assert len(cache_key("a")) == 32
