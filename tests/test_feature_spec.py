"""The declarative feature spec (features/spec.py): validation with key paths, the raw values
each kind derives, stable hashing, and the shipped MovieLens specs equal to today's code."""

from __future__ import annotations

import hashlib
import json

import copy
import os
import subprocess
import sys

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features.config import DataConfig
from features.sources import load_movielens
from features.spec import (
    DataSpec, FeatureSpec, LabelSpec, SpecError, check_columns, feature_expr, feature_exprs,
    hash_bucket, hash_bucket_expr, load_spec, spec_from_dict, stable_hash,
    stable_hash_scriptable,
)  # fmt: skip

CLICK_SPEC = {
    "label": {"column": "clicked", "kind": "click"},
    "features": [
        {"name": "user_id", "table": "interactions", "column": "user_id", "kind": "id"},
        {"name": "item_id", "table": "interactions", "column": "item_id", "kind": "id",
         "hash_buckets": 1000},
        {"name": "price", "table": "items", "column": "price", "kind": "bucketized", "width": 10},
        {"name": "tags", "table": "items", "column": "tags", "kind": "multi_hot", "separator": "|"},
    ],
}  # fmt: skip


def with_feature(index: int, **changes) -> dict:
    """CLICK_SPEC with feature ``index`` changed (a value of None removes the key)."""
    spec = copy.deepcopy(CLICK_SPEC)
    spec["features"][index].update(changes)
    spec["features"][index] = {k: v for k, v in spec["features"][index].items() if v is not None}
    return spec


@pytest.fixture(scope="module")
def movielens():
    return load_movielens(DataConfig())


# --- validation, with key paths -------------------------------------------------------------


def test_a_typo_in_a_key_fails_with_its_key_path_and_the_nearest_key():
    spec = with_feature(2, column=None, colum="price")
    typo = r"^data\.features\[2\]\.colum: unknown key \(did you mean 'column'\?\)"
    with pytest.raises(SpecError, match=typo):
        spec_from_dict(spec)


def test_an_unknown_kind_fails_naming_the_kinds():
    with pytest.raises(SpecError) as err:
        spec_from_dict(with_feature(3, kind="bucket", separator=None))
    assert str(err.value) == (
        "data.features[3].kind: unknown kind 'bucket'; "
        "expected one of id, categorical, multi_hot, bucketized, prefix, history"
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        (with_feature(1, name="user_id"),
         r"^data\.features\[1\]\.name: duplicate feature name 'user_id' \(also features\[0\]\)"),
        (with_feature(0, length=3), r"^data\.features\[0\]\.length: not a parameter of kind 'id'"),
        (with_feature(3, width=5), r"^data\.features\[3\]\.width: not a parameter of kind 'multi"),
        (with_feature(2, width=None, boundaries=[10, 50, 50]),
         r"^data\.features\[2\]\.boundaries\[2\]: boundaries must increase, got 50 then 50"),
        (with_feature(2, width=0), r"^data\.features\[2\]\.width: must be at least 1, got 0"),
        (with_feature(2, boundaries=[1, 2]), r"^data\.features\[2\]\.kind: bucketized takes"),
        (with_feature(1, min_count=2),
         r"^data\.features\[1\]\.hash_buckets: an open \(hashed\) vocabulary takes no min_count"),
        (with_feature(2, width=None, boundaries=[1, 2], labels=["a", "b"]),
         r"^data\.features\[2\]\.labels: 2 boundaries make 3 buckets, got 2 labels"),
        (with_feature(0, table="events"),
         r"^data\.features\[0\]\.table: unknown table 'events'; expected one of interactions"),
        ({**CLICK_SPEC, "label": {"column": "clicked", "kind": "ctr"}},
         r"^data\.label\.kind: unknown label kind 'ctr'; expected one of rating, click"),
        ({"label": {"column": "clicked"}}, r"^data\.features: missing required key"),
    ],
)  # fmt: skip
def test_a_spec_that_cannot_work_fails_on_load_with_the_key_path(spec, message):
    with pytest.raises(SpecError, match=message):
        spec_from_dict(spec)


def test_constructing_a_feature_directly_is_validated_too():
    with pytest.raises(SpecError, match=r"^length: missing: kind 'prefix' needs"):
        FeatureSpec(name="zip", table="users", column="zip_code", kind="prefix")


def test_a_missing_column_fails_from_the_schemas_alone_naming_feature_column_and_columns():
    spec = spec_from_dict(CLICK_SPEC)
    schemas = {
        "interactions": {"user_id": pl.Int64, "item_id": pl.Int64, "clicked": pl.Int8},
        "users": {"user_id": pl.Int64},
        "items": {"item_id": pl.Int64, "cost": pl.Float64, "tags": pl.Utf8},
    }
    with pytest.raises(SpecError) as err:
        check_columns(spec, schemas)
    assert str(err.value) == (
        "data.features[2].column: feature 'price' reads column 'price', which table 'items' "
        "lacks (its columns: item_id, cost, tags)"
    )


def test_a_list_feature_on_a_string_column_fails_asking_for_a_separator():
    spec = spec_from_dict(with_feature(3, separator=None))
    schemas = {
        "interactions": {"user_id": pl.Int64, "item_id": pl.Int64, "clicked": pl.Int8},
        "items": {"item_id": pl.Int64, "price": pl.Float64, "tags": pl.Utf8},
    }
    with pytest.raises(SpecError, match=r"^data\.features\[3\]\.column: .* must be a list; it"):
        check_columns(spec, schemas)


def test_load_spec_names_the_file_and_key_path_of_a_bad_spec(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "label: {column: rating}\nfeatures:\n  - {name: a, table: users, column: a, kind: idd}\n"
    )
    with pytest.raises(SpecError, match=rf"^{path}: data\.features\[0\]\.kind: unknown kind 'idd'"):
        load_spec(path)
    with pytest.raises(SpecError, match=r"shipped name \(ml100k, ml100k_history, ml1m, ml20m\)"):
        load_spec("ml10k")


# --- the shipped MovieLens specs are today's features ----------------------------------------


#: Digests of what the first, MovieLens-only implementation (commit 6f1d471: hand-written
#: derivations in features/vocab.py) built from the embedded ML-100K: the vocabularies (values
#: in index order, as JSON) and the encoded single-valued and genre index tensors.
ML100K_VOCAB_SHA256 = "c2657a1d5d695c7509e660648192b0f36c668a24684cc87a6d333c66b3e471da"
ML100K_SINGLE_SHA256 = "b6914de881eacea60c48dbad4b6ed4a9e7c46713ae24f8a3425c7fd9c5eea567"
ML100K_GENRES_SHA256 = "d2ede7517cea1e2e294efbb36483c506035a43809056cd7739aaa346d9dce72d"
ML100K_FEATURES = ("user_id", "item_id", "age", "gender", "occupation", "zip_prefix",
                   "release_year", "genres")  # fmt: skip


@pytest.mark.parametrize("name", ["ml100k", "ml1m"])
def test_shipped_spec_keeps_the_first_feature_order_with_genres_the_only_multi_hot(name):
    spec = load_spec(name)
    assert spec.names == spec.kjt_names == ML100K_FEATURES
    assert spec.multi_hot == frozenset({"genres"})
    assert spec.label == LabelSpec(column="rating", kind="rating") and spec.label.loss == "mse"


def test_shipped_ml100k_spec_reproduces_the_first_implementations_vocabularies(prepared):
    values = {name: prepared.vocabs[name].values for name in ML100K_FEATURES}
    assert hashlib.sha256(json.dumps(values).encode()).hexdigest() == ML100K_VOCAB_SHA256


def test_shipped_ml100k_spec_reproduces_the_first_implementations_encoded_rows(prepared):
    data = prepared.data
    assert hashlib.sha256(data.single.numpy().tobytes()).hexdigest() == ML100K_SINGLE_SHA256
    genres = data.multi["genres"].padded.numpy().tobytes()
    assert hashlib.sha256(genres).hexdigest() == ML100K_GENRES_SHA256


def test_shipped_specs_check_against_the_movielens_frames(movielens):
    schemas = {"interactions": movielens.ratings.schema, "users": movielens.users.schema,
               "items": movielens.items.schema}  # fmt: skip
    for name in ("ml100k", "ml1m"):
        check_columns(load_spec(name), schemas)


def test_ml1m_age_codes_and_missing_ages_bucket_into_ml1m_groups():
    ages = pl.DataFrame({"age": [1, 18, 25, 35, 45, 50, 56, 17, 24, None]}, {"age": pl.Int32})
    got = ages.select(feature_expr(load_spec("ml1m")["age"]))["age"]
    assert got.to_list() == ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+", "<18",
                             "18-24", None]  # fmt: skip


# --- the raw values of each kind --------------------------------------------------------------


def test_bucketized_by_boundaries_without_labels_names_each_interval():
    feature = FeatureSpec("price", "items", "price", "bucketized", boundaries=[10, 20.5])
    prices = pl.DataFrame({"price": [-1.0, 10.0, 20.4, 20.5, None]})
    assert prices.select(feature_expr(feature))["price"].to_list() == [
        "<10", "[10,20.5)", "[10,20.5)", ">=20.5", None,
    ]  # fmt: skip


def test_bucketized_by_width_floors_to_multiples_of_the_width():
    feature = FeatureSpec("price", "items", "price", "bucketized", width=10)
    prices = pl.DataFrame({"price": [0.0, 9.99, 10.0, 25.0, -0.5, None]})
    floored = prices.select(feature_expr(feature))["price"]
    assert floored.to_list() == ["0", "0", "10", "20", "-10", None]


def test_multi_hot_from_a_separated_string_column_drops_empty_parts():
    feature = FeatureSpec("tags", "items", "tags", "multi_hot", separator="|")
    tags = pl.DataFrame({"tags": ["a|b", "c", "", "a||d|", None]})
    assert tags.select(feature_expr(feature))["tags"].to_list() == [
        ["a", "b"], ["c"], [], ["a", "d"], None,
    ]  # fmt: skip


def test_prefix_and_id_kinds_read_any_column_as_strings():
    frame = pl.DataFrame({"zip": [12345, None], "id": [7, 8]})
    zips = frame.select(feature_expr(FeatureSpec("z", "users", "zip", "prefix", length=2)))
    ids = frame.select(feature_expr(FeatureSpec("i", "users", "id", "id")))
    assert zips["z"].to_list() == ["12", None] and ids["i"].to_list() == ["7", "8"]


def test_embedding_widths_resolve_feature_then_kind_then_spec_then_fallback():
    spec = spec_from_dict(
        {**with_feature(0, embedding_dim=8), "kind_embedding_dims": {"multi_hot": 4}}
    )
    assert spec.embedding_dims({"id": 64, "bucketized": 16}) == {
        "user_id": 8, "item_id": 64, "price": 16, "tags": 4,
    }  # fmt: skip
    with pytest.raises(SpecError, match=r"^features\[2\]\.embedding_dim: no width for 'price'"):
        spec.embedding_dims({"id": 64})


# --- stable hashing for open vocabularies -----------------------------------------------------

HASHED = ["a", "item-42", "Zürich", "日本", ""]


def test_stable_hash_is_the_published_fnv1a_32():
    assert stable_hash("a") == 0xE40C292C
    assert stable_hash("") == 0x811C9DC5


def test_hash_buckets_are_the_same_in_another_process_with_another_hash_seed():
    code = (
        "from features.spec import hash_bucket; "
        f"print([hash_bucket(v, 1000) for v in {HASHED!r}])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    run = [sys.executable, "-c", code]
    out = subprocess.run(run, capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == str([hash_bucket(v, 1000) for v in HASHED])


def test_hash_bucket_expr_maps_strings_and_lists_to_1_to_buckets_and_null_to_0():
    lists = [["a", None], [], None, ["日本"], ["a"], ["x"]]
    frame = pl.DataFrame({"s": HASHED + [None], "l": lists})
    got = frame.select(hash_bucket_expr(pl.col("s"), 7), hash_bucket_expr(pl.col("l"), 7))
    assert got["s"].to_list() == [hash_bucket(v, 7) for v in HASHED] + [0]
    assert got["l"].to_list() == [[hash_bucket("a", 7), 0], [], None, [hash_bucket("日本", 7)],
                                  [hash_bucket("a", 7)], [hash_bucket("x", 7)]]  # fmt: skip
    assert all(1 <= b <= 7 for b in got["s"].to_list()[:-1])


def test_the_scripted_hash_equals_the_python_hash_on_non_ascii_strings():
    torch = pytest.importorskip("torch")
    scripted = torch.jit.script(stable_hash_scriptable)
    assert [scripted(v) for v in HASHED] == [stable_hash(v) for v in HASHED]


def test_a_data_spec_built_in_code_reads_like_the_yaml():
    spec = DataSpec(
        features=[FeatureSpec("user_id", "interactions", "user_id", "id")],
        label=LabelSpec("clicked", "click"),
    )
    assert spec.names == ("user_id",) and spec.label.loss == "bce" and "auc" in spec.label.metrics
