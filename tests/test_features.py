"""Vocabularies, splits and batches on the real embedded ML-100K."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from features import DataConfig, load_movielens
from features.batches import prepare
from features.spec import load_spec
from features.splits import split_rows
from features.vocab import FeatureVocabs

FEATURES = load_spec("ml100k").kjt_names
SINGLE = load_spec("ml100k").single_names


def test_random_split_is_deterministic_disjoint_and_complete(prepared):
    ratings = prepared.movielens.ratings
    first = split_rows(ratings, DataConfig(seed=3))
    again = split_rows(ratings, DataConfig(seed=3))
    other = split_rows(ratings, DataConfig(seed=4))
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["test"], other["test"])
    assert [len(first[k]) for k in ("train", "valid", "test")] == [80_000, 10_000, 10_000]
    everything = np.concatenate(list(first.values()))
    assert len(everything) == len(np.unique(everything)) == ratings.height


def test_temporal_split_puts_each_users_latest_ratings_last(prepared):
    ratings = prepared.movielens.ratings
    rows = split_rows(ratings, DataConfig(split="temporal"))
    everything = np.concatenate(list(rows.values()))
    assert len(np.unique(everything)) == ratings.height == len(everything)
    tagged = ratings.with_row_index("row").with_columns(
        pl.when(pl.col("row").is_in(rows["train"])).then(0)
        .when(pl.col("row").is_in(rows["valid"])).then(1).otherwise(2).alias("split")
    )  # fmt: skip
    per_user = tagged.group_by("user_id", "split").agg(
        pl.col("timestamp").min().alias("first"), pl.col("timestamp").max().alias("last")
    )
    train = per_user.filter(pl.col("split") == 0)
    test = per_user.filter(pl.col("split") == 2)
    joined = train.join(test, on="user_id", suffix="_test")
    assert joined.height == 943
    assert (joined["last"] <= joined["first_test"]).all()


def test_vocabulary_survives_save_and_load(prepared, tmp_path):
    path = prepared.vocabs.save(tmp_path / "vocab.json")
    loaded = FeatureVocabs.load(path)
    assert loaded.sizes == prepared.vocabs.sizes
    joined = prepared.movielens.joined().head(500)
    assert prepared.vocabs.encode(joined).equals(loaded.encode(joined))


def test_unknown_values_map_to_zero(prepared):
    frame = pl.DataFrame(
        {
            "user_id": [99_999], "item_id": [424_242], "age": [None], "gender": ["X"],
            "occupation": ["astronaut"], "zip_code": ["ZZZZZ"], "year": [1066],
            "genres": [["Space Opera"]],
        },
        schema_overrides={"age": pl.Int32, "year": pl.Int32},
    )  # fmt: skip
    encoded = prepared.vocabs.encode(frame).row(0, named=True)
    assert all(encoded[name] == 0 for name in FEATURES if name != "genres")
    assert encoded["genres"] == [0]


def test_known_values_get_nonzero_indices(prepared):
    encoded = prepared.vocabs.encode(prepared.movielens.joined())
    for name in FEATURES:
        if name == "genres":
            continue
        assert (encoded[name] > 0).mean() > 0.99, name


def test_batch_shapes_and_lengths_match_the_data(prepared):
    data = prepared.data
    rows = data.splits["train"][:64]
    batch = data.batch(rows)
    assert len(batch) == 64 and batch.labels.dtype == torch.float32
    assert batch.sparse.keys() == list(FEATURES)
    lengths = batch.sparse.to_dict()
    for name in SINGLE:
        assert lengths[name].lengths().tolist() == [1] * 64
    items = prepared.movielens.items
    joined = prepared.movielens.ratings[rows.numpy()].join(items, on="item_id", how="left", maintain_order="left")
    assert lengths["genres"].lengths().tolist() == joined["genres"].list.len().to_list()
    expected = torch.tensor(prepared.movielens.ratings["rating"].to_numpy()[rows.numpy()])
    assert torch.equal(batch.labels, expected)


def test_batches_cover_the_split_once(prepared):
    seen = torch.cat([b.rows for b in prepared.data.batches("valid", 1000, shuffle=True, seed=1)])
    assert torch.equal(seen.sort().values, prepared.data.splits["valid"])


def test_min_count_and_max_size_count_interactions_of_a_side_table_feature(prepared):
    """An item id kept by min_count has at least that many ratings; max_size keeps the most
    rated occupations (a user attribute counts once per rating of its users)."""
    spec = load_spec("ml100k")
    spec["item_id"].min_count = 20
    spec["occupation"].max_size = 3
    ml = prepared.movielens
    vocabs = FeatureVocabs.build(spec, ml.ratings.lazy(), ml.users.lazy(), ml.items.lazy())
    per_item = ml.ratings.group_by("item_id").len()
    expected = per_item.filter(pl.col("len") >= 20)["item_id"].sort().cast(pl.Utf8).to_list()
    assert vocabs["item_id"].values == expected
    top = ml.joined().group_by("occupation").len().sort("len", descending=True).head(3)
    assert vocabs["occupation"].values == sorted(top["occupation"].to_list())
    assert vocabs.sizes["item_id"] == len(expected) + 1 < prepared.vocabs.sizes["item_id"]


def test_an_ml20m_folder_is_a_source_with_its_shipped_spec(tmp_path):
    """GroupLens' CSV layout (ml-20m, ml-25m: no users table) prepares with the ml20m spec:
    user ids from the ratings, items' years and genres from movies.csv."""
    folder = tmp_path / "ml-25m"
    folder.mkdir()
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(
            f"{u},{m},{(u * m) % 5 + 1}.0,{1000 + u * 10 + m}\n" for u in range(1, 21) for m in (1, 2, 3)
        )
    )  # fmt: skip
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n"
        '2,"Heat, The (1995)",Action|Crime\n3,Some Film (2003),(no genres listed)\n'
    )
    prepared = prepare(DataConfig(source=str(folder)))
    assert prepared.movielens.name == "ml-25m" and prepared.movielens.users is None
    assert prepared.vocabs.spec.names == ("user_id", "item_id", "release_year", "genres")
    assert prepared.vocabs.sizes == {"user_id": 21, "item_id": 4, "release_year": 3, "genres": 5}
    batch = prepared.data.batch(torch.arange(6))
    assert batch.sparse.keys() == ["user_id", "item_id", "release_year", "genres"]
    assert len(prepared.data) == 60
