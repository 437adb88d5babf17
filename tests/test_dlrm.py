"""The DLRM recommenders (TorchRec's SparseArch, DenseArch, InteractionArch, OverArch) follow
the stage API, fit the student's budget and serve with torch alone."""

from __future__ import annotations

import pytest
import torch
from torchrec.models.dlrm import InteractionArch, OverArch

from features.batches import prepare
from features.config import DataConfig
from recdistill.models import build_model, count_parameters
from recdistill.models.dlrm import DLRMConfig
from recdistill.stages import check_staged

#: Pinned sizes on ML-100K with the history spec; a change here changes every result.
PARAMS = {"dlrm_s": 429_057, "dlrm_m": 956_417, "dlrm_l": 2_306_049}


@pytest.fixture(scope="module")
def history():
    return prepare(DataConfig(features="ml100k_history"))


@pytest.fixture(scope="module")
def batch(history):
    return history.data.batch(history.data.splits["valid"][:64])


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_count_is_pinned_and_the_student_fits_mlp_s_budget(history, name):
    assert count_parameters(build_model(name, history)) == PARAMS[name]
    assert PARAMS["dlrm_s"] < 2_000_000


@pytest.mark.parametrize("name", list(PARAMS))
def test_stages_compose_to_forward(history, batch, name):
    torch.manual_seed(0)
    model = build_model(name, history).eval()
    check_staged(model, name)
    h = model.early(batch)
    z = model.middle(h, batch)
    features, dim = len(history.vocabs.sizes), model.config.embedding_dim
    assert h.shape == (64, features * dim) and z.shape == (64, model.config.over[-1])
    assert (model.early_dim, model.hidden_dim) == (features * dim, model.config.over[-1])
    assert torch.equal(model.head(z), model(batch))
    assert (z >= 0).all()  # hidden_activation "relu"


def test_it_is_made_of_torchrecs_dlrm_parts(history):
    model = build_model("dlrm_s", history)
    assert isinstance(model.tower.interaction, InteractionArch)
    assert isinstance(model.tower.over_arch, OverArch)
    assert model.rating_head is model.tower.over_arch.model[1]


def test_the_interaction_is_the_pairwise_dot_products(history, batch):
    """z depends on h only through the dense vector and the F + 1 vectors' dot products."""
    torch.manual_seed(0)
    model = build_model("dlrm_s", history, {"embedding_dim": 8}).eval()
    h = model.early(batch)
    features = len(history.vocabs.sizes)
    vectors = h.reshape(64, features, 8)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8))
    rotated = (vectors @ rotation).reshape(64, -1)  # the same dot products among the sparse ones
    dense = model.tower.dense_arch(torch.ones(1, 1))
    # rotating the sparse vectors changes only their dot products with the dense vector
    with torch.no_grad():
        model.tower.dense_arch.model._mlp[0]._linear.bias.copy_(torch.zeros(8))
        model.tower.dense_arch.model._mlp[0]._linear.weight.zero_()
    assert torch.allclose(model.middle(h), model.middle(rotated), atol=1e-5)
    assert dense.shape == (1, 8)


def test_a_question_of_width_early_dim_is_answered(history, batch):
    model = build_model("dlrm_s", history)
    assert model.middle(torch.randn(5, model.early_dim)).shape == (5, model.hidden_dim)


def test_the_dcn_interaction_option(history, batch):
    model = build_model("dlrm_s", history, {"interaction": "dcn", "dcn_layers": 1, "dcn_rank": 4})
    assert model(batch).shape == (64,)


def test_the_tower_scripts(history, batch):
    torch.manual_seed(0)
    model = build_model("dlrm_s", history).eval()
    h = model.early(batch)
    scripted = torch.jit.script(model.tower)
    assert torch.allclose(scripted(h), model.tower(h))


@pytest.mark.parametrize("bad, match", [
    ({"embedding_dim": 0}, "embedding_dim must be positive"),
    ({"over": []}, "over must be a non-empty list"),
    ({"interaction": "cross"}, "interaction must be one of dot, dcn"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
])  # fmt: skip
def test_a_bad_config_names_the_option(bad, match):
    with pytest.raises(ValueError, match=match):
        DLRMConfig(**bad)


def test_on_a_click_label_it_outputs_0_l_logits(tmp_path):
    from tests.test_click_log import click_config, write_click_log  # the shared click log

    clicks = prepare(click_config(write_click_log(tmp_path)))
    model = build_model("dlrm_s", clicks, {"embedding_dim": 4, "over": [8]})
    out = model(clicks.data.batch(clicks.data.splits["train"][:16]))
    assert out.shape == (16, 2) and torch.equal(out[:, 0], torch.zeros(16))
