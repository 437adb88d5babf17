"""The embedding-table recommenders MLP-S / M / L follow the stage API exactly."""

from __future__ import annotations

import pytest
import torch

from recdistill.models import build_model, count_parameters
from recdistill.stages import check_staged

#: Pinned sizes on ML-100K (the paper's ~2M / ~3M / ~4M); a change here changes every result.
PARAMS = {"mlp_s": 1_873_089, "mlp_m": 2_694_273, "mlp_l": 3_940_481}
WIDTHS = {"mlp_s": (1376, 64), "mlp_m": (1664, 256), "mlp_l": (1664, 512)}


@pytest.fixture(scope="module")
def batch(prepared):
    return prepared.data.batch(prepared.data.splits["valid"][:64])


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_count_is_pinned(prepared, name):
    assert count_parameters(build_model(name, prepared)) == PARAMS[name]


@pytest.mark.parametrize("name", list(PARAMS))
def test_stages_compose_to_forward(prepared, batch, name):
    torch.manual_seed(0)
    model = build_model(name, prepared).eval()
    check_staged(model, name)
    h = model.early(batch)
    z = model.middle(h, batch)
    y = model.head(z)
    assert (h.shape, z.shape, y.shape) == ((64, WIDTHS[name][0]), (64, WIDTHS[name][1]), (64,))
    assert (model.early_dim, model.hidden_dim) == WIDTHS[name]
    assert torch.equal(y, model(batch))


@pytest.mark.parametrize("name", list(PARAMS))
def test_middle_answers_a_question_of_width_early_dim(prepared, name):
    torch.manual_seed(0)
    model = build_model(name, prepared).eval()
    question = torch.randn(5, model.early_dim)  # no batch: a question replaces early's output
    answer = model.middle(question)
    assert answer.shape == (5, model.hidden_dim)
    assert model.head(answer).shape == (5,)
    assert not torch.equal(model.middle(question * 2), answer)  # the answer depends on it


def test_early_concatenates_pooled_embeddings_in_feature_order(prepared, batch):
    model = build_model("mlp_s", prepared).eval()
    h = model.early(batch)
    user_table = model.sparse_arch.ebc.embedding_bags["t_user_id"].weight
    users = batch.sparse["user_id"].values()
    assert torch.equal(h[:, :640], user_table[users])  # user_id first, 640 wide


def test_head_starts_at_the_training_mean(prepared):
    model = build_model("mlp_s", prepared)
    train_mean = prepared.data.labels[prepared.data.splits["train"]].mean()
    assert model.rating_head.bias.item() == pytest.approx(train_mean.item())
