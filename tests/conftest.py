"""Shared fixtures: the real embedded MovieLens-100K, prepared once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def entity_cache_dir(tmp_path_factory):
    """Per-entity language-teacher caches go to a folder of this test session, not ~/.cache."""
    folder = tmp_path_factory.mktemp("entity_states")
    previous = os.environ.get("RECDISTILL_CACHE_DIR")
    os.environ["RECDISTILL_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("RECDISTILL_CACHE_DIR", None)
    else:
        os.environ["RECDISTILL_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def prepared():
    """The embedded ML-100K, encoded and split with the default config (random, seed 0)."""
    from features.batches import prepare

    return prepare()


@pytest.fixture(scope="session")
def trained_student(prepared):
    """An MLP-S student trained 20 Adagrad steps, shared by the export and registry tests."""
    from tests.mlflow_server import train_student

    return train_student(prepared, steps=20)
