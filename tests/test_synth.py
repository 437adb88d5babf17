"""``recdistill data synth``: a synthetic rating log in the MovieLens shape, as parquet shards."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.config import DataConfig
from features.sources import MovieLens
from features.synth import GENERATOR_VERSION, SynthSpec, write_synthetic
from features.spec import feature_expr, load_spec
from features.vocab import FeatureVocabs
from pipelines.cli import main

SPEC = SynthSpec(rows=20_000, users=300, items=200, seed=7, shard_rows=8_000)
#: The frames of ``features.sources.load_movielens``, column for column.
MOVIELENS_SCHEMAS = {
    "ratings": {"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float32,
                "timestamp": pl.Int64},
    "users": {"user_id": pl.Int64, "age": pl.Int32, "gender": pl.Utf8, "occupation": pl.Utf8,
              "zip_code": pl.Utf8},
    "items": {"item_id": pl.Int64, "title": pl.Utf8, "year": pl.Int32,
              "genres": pl.List(pl.Utf8)},
}  # fmt: skip


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "set"
    write_synthetic(out, SPEC)
    return out


@pytest.fixture(scope="module")
def synth(synth_dir) -> MovieLens:
    return MovieLens(
        pl.read_parquet(synth_dir / "ratings" / "*.parquet"),
        pl.read_parquet(synth_dir / "users.parquet"),
        pl.read_parquet(synth_dir / "items.parquet"),
        "synth",
    )


def _files(folder: Path) -> dict[str, bytes]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def test_writes_ratings_shards_users_items_and_meta(synth_dir):
    assert sorted(_files(synth_dir)) == [
        "items.parquet", "meta.json", "ratings/part-00000.parquet", "ratings/part-00001.parquet",
        "ratings/part-00002.parquet", "users.parquet",
    ]  # fmt: skip
    meta = json.loads((synth_dir / "meta.json").read_text())
    assert meta["generator_version"] == GENERATOR_VERSION and meta["shards"] == 3
    assert (meta["spec"]["seed"], meta["spec"]["rows"], meta["spec"]["users"]) == (7, 20_000, 300)


def test_frames_have_the_movielens_columns_and_types(synth):
    for name, schema in MOVIELENS_SCHEMAS.items():
        assert dict(getattr(synth, name).schema) == schema, name
    assert synth.ratings.height == SPEC.rows
    assert synth.users["user_id"].to_list() == list(range(1, SPEC.users + 1))
    assert synth.items["item_id"].to_list() == list(range(1, SPEC.items + 1))


def test_ratings_are_whole_numbers_from_1_to_5_with_known_ids(synth):
    ratings = synth.ratings
    assert set(ratings["rating"].unique().to_list()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert ratings["user_id"].is_between(1, SPEC.users).all()
    assert ratings["item_id"].is_between(1, SPEC.items).all()


def test_items_have_titles_years_and_one_to_three_genres(synth):
    items = synth.items
    assert items["title"].str.starts_with("The ").all()
    assert not items.select(pl.struct("title", "year").is_duplicated().any()).item()
    assert items["genres"].list.len().is_between(1, 3).all()
    assert "unknown" not in items["genres"].explode().to_list()


def test_the_movielens_feature_definitions_read_it(synth):
    vocabs = FeatureVocabs.build(load_spec("ml100k"), synth.ratings, synth.users, synth.items)
    encoded = vocabs.encode(synth.joined())
    assert vocabs.sizes["user_id"] == SPEC.users + 1 and vocabs.sizes["age"] == 8
    assert encoded["user_id"].min() >= 1 and encoded["genres"].explode().min() >= 1


def test_shards_hold_at_most_shard_rows(synth_dir):
    heights = [pl.read_parquet(p).height for p in sorted((synth_dir / "ratings").iterdir())]
    assert heights == [8_000, 8_000, 4_000]


def test_the_same_seed_writes_identical_files(synth_dir, tmp_path):
    write_synthetic(tmp_path / "again", SPEC)
    assert _files(tmp_path / "again") == _files(synth_dir)


def test_another_seed_draws_other_data(synth, tmp_path):
    other = SynthSpec(rows=SPEC.rows, users=SPEC.users, items=SPEC.items, seed=8,
                      shard_rows=SPEC.shard_rows)  # fmt: skip
    write_synthetic(tmp_path / "other", other)
    ratings = pl.read_parquet(tmp_path / "other" / "ratings" / "*.parquet")
    assert not ratings.equals(synth.ratings)
    assert not pl.read_parquet(tmp_path / "other" / "users.parquet").equals(synth.users)


def test_item_popularity_is_skewed(synth):
    counts = synth.ratings["item_id"].value_counts()["count"].sort(descending=True)
    top_tenth = counts.head(SPEC.items // 10).sum() / SPEC.rows
    assert top_tenth > 0.4


@dataclass
class Factorization:
    """``rating ~ mu + b_u + b_i + <p_u, q_i>``, fit by ridge alternating least squares."""

    mu: float
    user_bias: np.ndarray  # [U]
    item_bias: np.ndarray  # [I]
    user_factors: np.ndarray  # [U, rank]
    item_factors: np.ndarray  # [I, rank]

    @classmethod
    def fit(cls, user, item, rating, rank: int, ridge: float = 5.0, sweeps: int = 6):
        """``user``, ``item``: 0-based ids ``[N]``; rank 0 fits the biases alone."""
        rng = np.random.default_rng(0)
        model = cls(rating.mean(), np.zeros(SPEC.users), np.zeros(SPEC.items),
                    0.1 * rng.standard_normal((SPEC.users, rank)),
                    0.1 * rng.standard_normal((SPEC.items, rank)))  # fmt: skip
        sides = (
            (user, item, model.user_bias, model.user_factors, model.item_bias, model.item_factors),
            (item, user, model.item_bias, model.item_factors, model.user_bias, model.user_factors),
        )
        for _ in range(sweeps):
            for own, other, bias, factors, other_bias, other_factors in sides:
                # [N, 1 + rank]: a one for the bias, then the other side's factors
                design = np.hstack([np.ones((len(rating), 1)), other_factors[other]])
                target = rating - model.mu - other_bias[other]
                order = np.argsort(own, kind="stable")
                bounds = np.searchsorted(own[order], np.arange(len(bias) + 1))
                for entity in range(len(bias)):
                    rows = order[bounds[entity] : bounds[entity + 1]]
                    x = design[rows]
                    solved = np.linalg.solve(x.T @ x + ridge * np.eye(rank + 1), x.T @ target[rows])
                    bias[entity], factors[entity] = solved[0], solved[1:]
        return model

    def predict(self, user, item) -> np.ndarray:
        dot = (self.user_factors[user] * self.item_factors[item]).sum(axis=1)
        return self.mu + self.user_bias[user] + self.item_bias[item] + dot


@pytest.fixture(scope="module")
def split(synth):
    """0-based user and item ids, ratings, and a seeded 80/20 train mask."""
    ratings = synth.ratings
    train = np.random.default_rng(0).random(ratings.height) < 0.8
    return (
        ratings["user_id"].to_numpy() - 1,
        ratings["item_id"].to_numpy() - 1,
        ratings["rating"].to_numpy().astype(np.float64),
        train,
    )


def _held_out_mse(split, rank: int) -> float:
    user, item, rating, train = split
    model = Factorization.fit(user[train], item[train], rating[train], rank)
    return float(np.mean((rating[~train] - model.predict(user[~train], item[~train])) ** 2))


def test_user_and_item_biases_predict_held_out_ratings_better_than_the_mean(split):
    _, _, rating, train = split
    mean_mse = np.mean((rating[~train] - rating[train].mean()) ** 2)
    assert _held_out_mse(split, rank=0) < 0.8 * mean_mse


def test_latent_factors_predict_beyond_the_biases(split):
    assert _held_out_mse(split, rank=SPEC.factors) < 0.8 * _held_out_mse(split, rank=0)


def test_age_groups_and_genres_interact_beyond_the_biases(synth, split):
    # User factors depend on the age group and item factors on the genres: the mean bias
    # residual of each (age group, genre) pair, learned on the training ratings, lowers the
    # held-out error. (Age groups span many users, so a cell does not just memorize users.)
    user, item, rating, train = split
    biases = Factorization.fit(user[train], item[train], rating[train], rank=0)
    frame = synth.joined().select(
        feature_expr(load_spec("ml100k")["age"]).alias("age_group"),
        "genres",
        pl.Series("residual", rating - biases.predict(user, item)),
        pl.Series("train", train),
    ).with_row_index("row")
    cells = (
        frame.filter("train")
        .explode("genres")
        .group_by("age_group", "genres")
        .agg((pl.col("residual").sum() / (pl.len() + 20.0)).alias("cell"))
    )
    test = (
        frame.filter(~pl.col("train"))
        .explode("genres")
        .join(cells, on=["age_group", "genres"], how="left")
        .group_by("row")
        .agg(pl.col("residual").first(), pl.col("cell").fill_null(0).mean())
    )
    with_cells = test.select(((pl.col("residual") - pl.col("cell")) ** 2).mean()).item()
    assert with_cells < 0.98 * test.select((pl.col("residual") ** 2).mean()).item()


def test_cli_writes_the_set(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["data", "synth", "--rows", "500", "--users", "20", "--items", "30", "--out", str(out),
            "--shard-rows", "200"]  # fmt: skip
    assert main(argv) == 0
    assert len(list((out / "ratings").glob("part-*.parquet"))) == 3
    assert "wrote 500 ratings in 3 shard(s)" in capsys.readouterr().out


@pytest.mark.parametrize("option", ["--rows", "--users", "--items", "--shard-rows"])
def test_cli_refuses_a_size_below_one_naming_the_option(option, tmp_path, capsys):
    sizes = {"--rows": "10", "--users": "5", "--items": "5", "--shard-rows": "10", option: "0"}
    argv = ["data", "synth", "--out", str(tmp_path / "x")] + [a for kv in sizes.items() for a in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"recdistill: error: {option} must be at least 1 (got 0)\n"
    assert not (tmp_path / "x").exists()


def test_cli_refuses_a_non_empty_out_without_force(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["data", "synth", "--rows", "100", "--users", "5", "--items", "5", "--out", str(out)]
    assert main(argv) == 2
    assert "is not empty; pass --force" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_force_replaces_an_earlier_set_and_its_stale_shards(tmp_path):
    out = tmp_path / "set"
    write_synthetic(out, SynthSpec(rows=300, users=5, items=5, shard_rows=100))
    (out / "notes.txt").write_text("mine")
    write_synthetic(out, SynthSpec(rows=150, users=5, items=5, shard_rows=100), force=True)
    shards = sorted(p.name for p in (out / "ratings").iterdir())
    assert shards == ["part-00000.parquet", "part-00001.parquet"]
    assert pl.read_parquet(out / "ratings" / "*.parquet").height == 150
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["rows", "users", "items", "shard_rows"])
def test_spec_rejects_a_size_below_one_naming_it(name):
    sizes = {"rows": 10, "users": 5, "items": 5, "shard_rows": 10, name: 0}
    with pytest.raises(ValueError, match=f"^{name} must be an integer of at least 1"):
        SynthSpec(**sizes)
