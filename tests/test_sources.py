"""MovieLens sources: the embedded ML-100K, GroupLens folders, quirks and bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl
import pytest

from features import DataConfig, DataError, load_movielens


def test_embedded_ml100k_has_exact_counts(prepared):
    ml = prepared.movielens
    assert ml.ratings.height == 100_000
    assert ml.users.height == 943
    assert ml.items.height == 1_682
    assert ml.ratings["user_id"].n_unique() == 943


def test_known_quirks_are_normalized(prepared):
    items = prepared.movielens.items
    unknown = items.filter(pl.col("item_id") == 267).row(0, named=True)
    assert unknown["title"] is None and unknown["year"] is None
    land = items.filter(pl.col("item_id") == 1412).row(0, named=True)
    assert land["year"] == 1995  # year "V" recovered from the title's "(1995)"
    assert not land["title"].endswith("(1995)")


def test_duplicate_titles_kept_apart_unless_deduped():
    ml = load_movielens(DataConfig(dedupe_titles=True))
    assert ml.items.height == 1_682 - 18
    assert ml.ratings.height == 100_000
    assert set(ml.ratings["item_id"].unique()) <= set(ml.items["item_id"])


def _write_ml100k(folder: Path, ratings: str) -> Path:
    folder.mkdir()
    (folder / "u.data").write_text(ratings)
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    flags = lambda on: "|".join("1" if i in on else "0" for i in range(19))  # noqa: E731
    (folder / "u.item").write_bytes(
        (
            f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags({3, 4, 5})}\n"
            f"2|Caf\xe9 au lait (1994)|01-Jan-1994||http://y|{flags({8})}\n"
        ).encode("latin-1")
    )
    return folder


def test_grouplens_ml100k_folder_loads(tmp_path):
    folder = _write_ml100k(tmp_path / "ml-100k", "1\t1\t5\t881250949\n2\t2\t3\t881250950\n")
    ml = load_movielens(str(folder))
    assert ml.ratings.height == 2
    item = ml.items.filter(pl.col("item_id") == 1).row(0, named=True)
    assert item["title"] == "Toy Story" and item["year"] == 1995
    assert item["genres"] == ["Animation", "Children's", "Comedy"]
    assert ml.items.filter(pl.col("item_id") == 2)["title"].item() == "Café au lait"


def test_grouplens_ml1m_folder_loads(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ratings.dat").write_text("1::10::4::978300760\n2::20::2::978300761\n")
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (folder / "movies.dat").write_text(
        "10::GoldenEye (1995)::Action|Adventure|Thriller\n20::Heat (1995)::Action|Crime\n"
    )
    ml = load_movielens(str(folder))
    assert ml.ratings.height == 2
    user = ml.users.filter(pl.col("user_id") == 1).row(0, named=True)
    assert user["occupation"] == "K-12 student" and user["gender"] == "F"
    item = ml.items.filter(pl.col("item_id") == 10).row(0, named=True)
    assert (item["title"], item["year"]) == ("GoldenEye", 1995)
    assert item["genres"] == ["Action", "Adventure", "Thriller"]


def test_missing_folder_names_expected_files(tmp_path):
    with pytest.raises(DataError, match=r"u\.data, u\.user, u\.item"):
        load_movielens(str(tmp_path / "nowhere"))


def test_missing_file_is_named(tmp_path):
    folder = _write_ml100k(tmp_path / "ml", "1\t1\t5\t1\n")
    (folder / "u.user").unlink()
    with pytest.raises(DataError, match=r"missing u\.user"):
        load_movielens(str(folder))


def test_missing_column_names_column_and_file(tmp_path):
    folder = _write_ml100k(tmp_path / "ml", "1\t1\t5\n")
    with pytest.raises(DataError, match=r"u\.data: missing column 'timestamp'"):
        load_movielens(str(folder))


def test_bad_ratings_dropped_with_logged_count(tmp_path, caplog):
    folder = _write_ml100k(
        tmp_path / "ml", "1\t1\t5\t1\n1\t2\t7\t2\n2\t1\tfive\t3\n2\t2\t1\t4\n"
    )
    with caplog.at_level(logging.WARNING, logger="recdistill.features"):
        ml = load_movielens(str(folder))
    assert ml.ratings.height == 2
    assert "dropped 2 invalid ratings" in caplog.text


def test_bad_ratings_rejected_in_strict_mode(tmp_path):
    folder = _write_ml100k(tmp_path / "ml", "1\t1\t5\t1\n1\t2\t7\t2\n")
    with pytest.raises(DataError, match="strict mode"):
        load_movielens(DataConfig(source=str(folder), strict=True))
