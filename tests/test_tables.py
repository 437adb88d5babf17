"""Source tables as lazy scans: a team's own parquet/CSV logs, and GroupLens folders."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features import DataError, load_movielens
from features.sources import embedded_ml100k_folder
from features.tables import (
    Tables,
    grouplens_tables,
    in_memory_tables,
    scan_table,
    scan_tables,
)

EVENTS = pl.DataFrame(
    {"user_id": [3, 1, 2, 1], "item_id": [10, 20, 10, 30], "rating": [4.0, 5.0, 3.0, 1.0]}
)
USERS = pl.DataFrame({"user_id": [1, 2, 3], "age": [20, 30, 40]})
ITEMS = pl.DataFrame({"item_id": [10, 20, 30], "title": ["a", "b", "c"]})


def _shards(folder: Path, frame: pl.DataFrame, n: int = 2) -> list[Path]:
    folder.mkdir(exist_ok=True)
    paths = []
    for i, shard in enumerate(frame.iter_slices(n_rows=-(-frame.height // n))):
        paths.append(folder / f"part-{i}.parquet")
        shard.write_parquet(paths[-1])
    return paths


def test_parquet_file_is_a_lazy_scan(tmp_path):
    EVENTS.write_parquet(tmp_path / "events.parquet")
    scan, files = scan_table(tmp_path / "events.parquet")
    assert isinstance(scan, pl.LazyFrame)
    assert files == [tmp_path / "events.parquet"]
    assert_frame_equal(scan.collect(), EVENTS)


def test_folder_of_parquet_shards_is_one_table_in_name_order(tmp_path):
    paths = _shards(tmp_path / "logs", EVENTS, n=3)
    (tmp_path / "logs" / "notes.md").write_text("not a shard")
    scan, files = scan_table(tmp_path / "logs")
    assert files == paths
    assert_frame_equal(scan.collect(), EVENTS)


def test_glob_pattern_matches_shards(tmp_path):
    paths = _shards(tmp_path / "logs", EVENTS)
    EVENTS.head(1).write_parquet(tmp_path / "logs" / "other.parquet")
    scan, files = scan_table(str(tmp_path / "logs" / "part-*.parquet"))
    assert files == paths
    assert scan.collect().height == EVENTS.height


def test_csv_file_by_suffix(tmp_path):
    EVENTS.write_csv(tmp_path / "events.csv")
    scan, _ = scan_table(tmp_path / "events.csv")
    assert_frame_equal(scan.collect(), EVENTS)


def test_tsv_needs_its_separator(tmp_path):
    EVENTS.write_csv(tmp_path / "events.tsv", separator="\t")
    scan, _ = scan_table(tmp_path / "events.tsv", separator="\t")
    assert_frame_equal(scan.collect(), EVENTS)


def test_shard_schema_mismatch_names_file_and_column(tmp_path):
    _shards(tmp_path / "logs", EVENTS)
    EVENTS.with_columns(pl.col("rating").cast(pl.Utf8)).write_parquet(
        tmp_path / "logs" / "part-2.parquet"
    )
    with pytest.raises(DataError, match=r"part-2\.parquet has column 'rating' as String"):
        scan_table(tmp_path / "logs")


def test_shard_missing_column_is_named(tmp_path):
    _shards(tmp_path / "logs", EVENTS)
    EVENTS.drop("rating").write_parquet(tmp_path / "logs" / "part-2.parquet")
    with pytest.raises(DataError, match=r"part-2\.parquet lacks column 'rating'"):
        scan_table(tmp_path / "logs")


def test_glob_matching_nothing_fails(tmp_path):
    with pytest.raises(DataError, match=r"users table .*part-\*\.parquet: the glob pattern"):
        scan_table(str(tmp_path / "part-*.parquet"), what="users")


def test_missing_path_fails(tmp_path):
    with pytest.raises(DataError, match=r"interactions table .*nowhere\.parquet: no such file"):
        scan_table(tmp_path / "nowhere.parquet")


def test_folder_without_shards_fails(tmp_path):
    (tmp_path / "README.md").write_text("hello")
    with pytest.raises(DataError, match=r"holds no \*\.parquet or \*\.csv files"):
        scan_table(tmp_path)


def test_csv_named_parquet_is_not_parquet(tmp_path):
    EVENTS.write_csv(tmp_path / "events.parquet")
    with pytest.raises(DataError, match=r"events\.parquet: not a parquet file .*b'user'"):
        scan_table(tmp_path / "events.parquet")


def test_mixed_formats_fail(tmp_path):
    EVENTS.write_parquet(tmp_path / "part-0.parquet")
    EVENTS.write_csv(tmp_path / "part-1.csv")
    with pytest.raises(DataError, match="mixed formats"):
        scan_table(str(tmp_path / "part-*"))


def test_schemas_come_without_reading_rows(tmp_path):
    EVENTS.write_parquet(tmp_path / "events.parquet")
    USERS.write_csv(tmp_path / "users.csv")
    tables = scan_tables(tmp_path / "events.parquet", users=tmp_path / "users.csv")
    # Rows written after the scan was built still show up: nothing was read or cached.
    pl.concat([EVENTS, EVENTS]).write_parquet(tmp_path / "events.parquet")
    assert tables.schemas() == {
        "interactions": {"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float64},
        "users": {"user_id": pl.Int64, "age": pl.Int64},
    }
    assert tables.interactions.collect().height == 2 * EVENTS.height
    assert tables.files == {
        "interactions": [tmp_path / "events.parquet"],
        "users": [tmp_path / "users.csv"],
    }


def test_joined_keeps_interaction_order_and_attaches_columns(tmp_path):
    EVENTS.write_parquet(tmp_path / "events.parquet")
    USERS.reverse().write_parquet(tmp_path / "users.parquet")
    ITEMS.reverse().write_csv(tmp_path / "items.csv")
    tables = scan_tables(
        tmp_path / "events.parquet", tmp_path / "users.parquet", tmp_path / "items.csv"
    )
    joined = tables.joined().collect()
    assert joined.columns == ["user_id", "item_id", "rating", "age", "title"]
    assert joined["user_id"].to_list() == [3, 1, 2, 1]
    assert joined["age"].to_list() == [40, 20, 30, 20]
    assert joined["title"].to_list() == ["a", "b", "a", "c"]


def test_joined_on_a_missing_key_names_the_table(tmp_path):
    tables = in_memory_tables(EVENTS, users=USERS.rename({"user_id": "uid"}))
    with pytest.raises(DataError, match=r"table 'users' lacks it \(its columns: uid, age\)"):
        tables.joined()


def test_in_memory_tables_have_no_files():
    tables = in_memory_tables(EVENTS, items=ITEMS)
    assert isinstance(tables, Tables) and tables.files == {} and tables.users is None
    assert tables.joined().collect()["title"].to_list() == ["a", "b", "a", "c"]


def _ml20m(folder: Path) -> Path:
    folder.mkdir()
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,0.5,1112484676\n"
        "2,1,4.0,974820889\n"
    )
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '2,"American President, The (1995)",Comedy|Drama|Romance\n'
        "29,Babylon 5,(no genres listed)\n"
    )
    (folder / "tags.csv").write_text("userId,movieId,tag,timestamp\n1,2,funny,1112486027\n")
    return folder


def test_ml20m_layout_gives_normalized_columns(tmp_path):
    tables = grouplens_tables(_ml20m(tmp_path / "ml-20m"))
    assert tables.name == "ml-20m" and tables.users is None
    assert tables.schemas() == {
        "interactions": {
            "user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float32, "timestamp": pl.Int64
        },
        "items": {
            "item_id": pl.Int64, "title": pl.Utf8, "year": pl.Int32, "genres": pl.List(pl.Utf8)
        },
    }  # fmt: skip
    assert tables.interactions.collect()["rating"].to_list() == [3.5, 0.5, 4.0]
    items = tables.items.collect().rows_by_key("item_id", named=True, unique=True)
    assert items[2] == {
        "title": "American President, The", "year": 1995, "genres": ["Comedy", "Drama", "Romance"]
    }  # fmt: skip
    assert items[29] == {"title": "Babylon 5", "year": None, "genres": []}


def test_ml20m_drops_unparsable_ratings_unless_strict(tmp_path):
    folder = _ml20m(tmp_path / "ml-latest")
    with (folder / "ratings.csv").open("a") as f:
        f.write("3,1,five,974820889\n")
    assert grouplens_tables(folder).interactions.collect().height == 3
    with pytest.raises(pl.exceptions.PolarsError):
        grouplens_tables(folder, strict=True).interactions.collect()


def test_ml10m_layout_splits_double_colons(tmp_path):
    folder = tmp_path / "ml-10M100K"
    folder.mkdir()
    (folder / "ratings.dat").write_text("1::122::5::838985046\n1::185::4.5::838983525\n")
    (folder / "movies.dat").write_text(
        "1::Toy Story (1995)::Adventure|Animation|Children|Comedy|Fantasy\n"
        "122::Boomerang (1992)::Comedy|Romance\n"
        "185::Star Trek: Generations (1994)::Action|Sci-Fi\n"
    )
    (folder / "tags.dat").write_text("15::4973::excellent!::1215184630\n")
    tables = grouplens_tables(folder)
    assert tables.name == "ml-10m" and tables.users is None
    ratings = tables.interactions.collect()
    assert ratings.rows() == [(1, 122, 5.0, 838985046), (1, 185, 4.5, 838983525)]
    assert ratings.schema == pl.Schema(
        {"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float32, "timestamp": pl.Int64}
    )
    star_trek = tables.items.collect().row(2, named=True)
    assert star_trek == {
        "item_id": 185, "title": "Star Trek: Generations", "year": 1994,
        "genres": ["Action", "Sci-Fi"],
    }  # fmt: skip


def test_folder_of_no_layout_lists_what_each_needs(tmp_path):
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    with pytest.raises(DataError, match=r"ml-20m: ratings\.csv, movies\.csv") as err:
        grouplens_tables(tmp_path)
    assert "ml-100k: u.data, u.user, u.item" in str(err.value)


def test_embedded_ml100k_equals_load_movielens():
    tables = grouplens_tables(embedded_ml100k_folder())
    ml = load_movielens()
    assert tables.name == "ml-100k"
    assert_frame_equal(tables.interactions.collect(), ml.ratings)
    assert_frame_equal(tables.users.collect(), ml.users)
    assert_frame_equal(tables.items.collect(), ml.items)
    assert ml.ratings.height == 100_000
    assert_frame_equal(tables.joined().collect(), ml.joined())
