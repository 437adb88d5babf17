"""MovieLens sources, read with polars into three normalized frames.

Three sources give the same frames:

- ``"embedded"``: ML-100K as shipped in the recbole wheel (``recbole/dataset_example/ml-100k``);
- a GroupLens ``ml-100k`` folder (``u.data``, ``u.user``, ``u.item``);
- a GroupLens ``ml-1m`` folder (``ratings.dat``, ``users.dat``, ``movies.dat``).

The frames (one row per rating / user / item)::

    ratings: user_id i64, item_id i64, rating f32, timestamp i64
    users:   user_id i64, age i32, gender str ("M"/"F"), occupation str, zip_code str
    items:   item_id i64, title str, year i32 (null when unknown), genres list[str]

Known quirks are handled here: item 267 is titled "unkonwn" with no year (title and year become
null), item 1412 has year "V" (the year is taken from its title, "(1995)"), and 18 movies are
listed twice under two ids (kept apart unless ``dedupe_titles``; a logged count either way).
"""

from __future__ import annotations

import importlib.resources
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from features.config import DataConfig

log = logging.getLogger("recdistill.features")

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip
ML1M_OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
]  # fmt: skip
_TITLE_YEAR = r"\s*\((\d{4})\)\s*$"


class DataError(ValueError):
    """Input data that cannot be read as MovieLens: the message names the file and what is wrong."""


@dataclass(frozen=True)
class MovieLens:
    """The three normalized frames of one MovieLens source."""

    ratings: pl.DataFrame
    users: pl.DataFrame | None
    items: pl.DataFrame | None
    name: str

    def joined(self, user_key: str = "user_id", item_key: str = "item_id") -> pl.DataFrame:
        """One row per rating (interaction) with the user's and the item's attributes, in
        rating order (a source without a users or items table: without those)."""
        out = self.ratings
        for table, key in ((self.users, user_key), (self.items, item_key)):
            if table is not None:
                out = out.join(table, on=key, how="left", maintain_order="left")
        return out


def _read_delimited(path: Path, separator: str, columns: list[str], header: bool) -> pl.DataFrame:
    """Read a delimited text file as string columns, naming the file on any failure."""
    if not path.is_file():
        raise DataError(f"expected file {path} (not found)")
    text = path.read_bytes().decode("latin-1")  # GroupLens files are latin-1; ASCII is a subset
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    _check_last_line(text, path, separator)
    if len(separator) > 1:  # ml-1m's "::" is not a single-byte separator
        text = text.replace(separator, "\x1f")
        separator = "\x1f"
    try:
        frame = pl.read_csv(
            io.StringIO(text),
            separator=separator,
            has_header=header,
            quote_char=None,
            infer_schema=False,
            truncate_ragged_lines=True,
        )
    except pl.exceptions.PolarsError as err:
        raise DataError(f"cannot read {path}: {err}") from err
    if header:
        # recbole headers carry types ("user_id:token"): keep the name only.
        frame = frame.rename({c: c.split(":")[0] for c in frame.columns})
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise DataError(
                f"{path}: missing column {missing[0]!r} (has {', '.join(frame.columns)})"
            )
        return frame.select(columns)
    if frame.width < len(columns):
        raise DataError(
            f"{path}: missing column {columns[frame.width]!r} "
            f"(expected {len(columns)} columns: {', '.join(columns)}; found {frame.width})"
        )
    return frame.select(frame.columns[: len(columns)]).rename(
        dict(zip(frame.columns[: len(columns)], columns))
    )


def _check_last_line(text: str, path: Path, separator: str) -> None:
    """Fail when the last line has fewer fields than the first and no newline: a cut-off copy."""
    if text.endswith("\n"):
        return
    lines = text.splitlines()
    first, last = lines[0].count(separator), lines[-1].count(separator)
    if len(lines) > 1 and last < first:
        raise DataError(
            f"{path}: line {len(lines)} ends mid-row ({last + 1} of {first + 1} fields, no "
            "newline): the file looks truncated"
        )


def _with_int_ids(frame: pl.DataFrame, column: str, path: Path) -> pl.DataFrame:
    """``column`` as integers; a file with no rows, or a row whose id is not one, fails."""
    if frame.height == 0:
        raise DataError(f"{path}: no rows")
    ids = frame[column].str.strip_chars().cast(pl.Int64, strict=False)
    if ids.null_count():
        row = ids.is_null().arg_max()
        raise DataError(
            f"{path}: {ids.null_count()} row(s) with a {column} that is not an integer "
            f"(first: row {row + 1}, {frame[column][row]!r})"
        )
    return frame.with_columns(ids)


def _require_folder(folder: Path, files: list[str]) -> None:
    if not folder.is_dir():
        raise DataError(f"expected a MovieLens folder at {folder} with {', '.join(files)}")
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"{folder}: missing {', '.join(missing)} (a MovieLens folder holds {', '.join(files)})"
        )


def _clean_ratings(raw: pl.DataFrame, path: Path, strict: bool) -> pl.DataFrame:
    """Cast the string columns; drop (or, when strict, reject) rows that are not valid ratings."""
    typed = raw.select(
        pl.col("user_id").str.strip_chars().cast(pl.Int64, strict=False),
        pl.col("item_id").str.strip_chars().cast(pl.Int64, strict=False),
        pl.col("rating").str.strip_chars().cast(pl.Float64, strict=False),
        pl.col("timestamp")
        .str.strip_chars()
        .cast(pl.Float64, strict=False)
        .cast(pl.Int64, strict=False),
    )
    valid = (
        pl.col("user_id").is_not_null()
        & pl.col("item_id").is_not_null()
        & pl.col("timestamp").is_not_null()
        & pl.col("rating").is_between(1.0, 5.0)
        & pl.col("rating").is_not_nan()
    )
    clean = typed.filter(valid.fill_null(False))
    bad = typed.height - clean.height
    if bad and strict:
        first = raw.filter(~typed.select(valid.fill_null(False)).to_series()).row(0)
        raise DataError(
            f"{path}: {bad} ratings are not numbers in 1..5 or lack ids/timestamps "
            f"(first bad row: {first}); strict mode rejects them"
        )
    if clean.height == 0:
        raise DataError(
            f"{path}: no valid ratings (none of its {typed.height} rows has integer ids, a "
            "timestamp and a rating in 1..5)"
        )
    if bad:
        log.warning("%s: dropped %d invalid ratings (not numbers in 1..5, or bad ids)", path, bad)
    return clean.with_columns(pl.col("rating").cast(pl.Float32))


def _split_title_year(items: pl.DataFrame) -> pl.DataFrame:
    """Normalize title and year: a year that is not a number comes from a "(YYYY)" title suffix."""
    year_in_title = pl.col("title").str.extract(_TITLE_YEAR, 1).cast(pl.Int32, strict=False)
    year = pl.col("year").str.strip_chars().cast(pl.Int32, strict=False)
    title = pl.col("title").str.replace(_TITLE_YEAR, "").str.strip_chars()
    return items.with_columns(
        pl.when(title.str.to_lowercase().is_in(["unkonwn", "unknown", ""]))
        .then(None)
        .otherwise(title)
        .alias("title"),
        pl.coalesce(year, year_in_title).alias("year"),
    )


def _dedupe(ml: MovieLens) -> MovieLens:
    """Map each item whose (title, year) repeats an earlier item onto the earlier item's id."""
    canon = ml.items.with_columns(
        pl.col("item_id").min().over(["title", "year"]).alias("canonical")
    ).with_columns(
        pl.when(pl.col("title").is_null())
        .then(pl.col("item_id"))
        .otherwise(pl.col("canonical"))
        .alias("canonical")
    )
    repeats = canon.filter(pl.col("canonical") != pl.col("item_id"))
    if repeats.height:
        log.info("%s: %d items repeat an earlier title and year", ml.name, repeats.height)
    mapping = dict(zip(repeats["item_id"].to_list(), repeats["canonical"].to_list()))
    if not mapping:
        return ml
    ratings = ml.ratings.with_columns(pl.col("item_id").replace(mapping))
    items = ml.items.filter(~pl.col("item_id").is_in(list(mapping)))
    return MovieLens(ratings, ml.users, items, ml.name)


def _finish(ratings: pl.DataFrame, users: pl.DataFrame, items: pl.DataFrame, name: str) -> MovieLens:
    users = users.select(
        pl.col("user_id").cast(pl.Int64),
        pl.col("age").cast(pl.Int32, strict=False),
        pl.col("gender").str.strip_chars().str.to_uppercase(),
        pl.col("occupation").str.strip_chars(),
        pl.col("zip_code").str.strip_chars(),
    )
    items = _split_title_year(items).select(
        pl.col("item_id").cast(pl.Int64),
        "title",
        "year",
        pl.col("genres").list.eval(pl.element().filter(pl.element() != "unknown")),
    )
    ml = MovieLens(ratings, users, items, name)
    dupes = items.filter(pl.col("title").is_not_null()).select(
        pl.struct("title", "year").is_duplicated().sum()
    )
    if dupes.item():
        log.info("%s: %d items share a title and year with another item", name, dupes.item())
    return ml


def _load_recbole(folder: Path, strict: bool) -> MovieLens:
    _require_folder(folder, ["ml-100k.inter", "ml-100k.user", "ml-100k.item"])
    ratings = _read_delimited(
        folder / "ml-100k.inter", "\t", ["user_id", "item_id", "rating", "timestamp"], header=True
    )
    users = _read_delimited(
        folder / "ml-100k.user",
        "\t",
        ["user_id", "age", "gender", "occupation", "zip_code"],
        header=True,
    )
    users = _with_int_ids(users, "user_id", folder / "ml-100k.user")
    items = _read_delimited(
        folder / "ml-100k.item", "\t", ["item_id", "movie_title", "release_year", "class"], True
    )
    items = _with_int_ids(items, "item_id", folder / "ml-100k.item").select(
        "item_id",
        pl.col("movie_title").alias("title"),
        pl.col("release_year").alias("year"),
        pl.col("class").str.split(" ").alias("genres"),
    )
    return _finish(_clean_ratings(ratings, folder / "ml-100k.inter", strict), users, items, "ml-100k")


def _load_ml100k(folder: Path, strict: bool) -> MovieLens:
    _require_folder(folder, ["u.data", "u.user", "u.item"])
    ratings = _read_delimited(
        folder / "u.data", "\t", ["user_id", "item_id", "rating", "timestamp"], header=False
    )
    users = _read_delimited(
        folder / "u.user", "|", ["user_id", "age", "gender", "occupation", "zip_code"], False
    )
    users = _with_int_ids(users, "user_id", folder / "u.user")
    item_cols = ["item_id", "title", "release_date", "video_release_date", "url"] + [
        f"g_{g}" for g in ML100K_GENRES
    ]
    raw = _read_delimited(folder / "u.item", "|", item_cols, header=False)
    raw = _with_int_ids(raw, "item_id", folder / "u.item")
    flags = pl.concat_list(
        [pl.when(pl.col(f"g_{g}") == "1").then(pl.lit(g)) for g in ML100K_GENRES]
    ).list.drop_nulls()
    items = raw.select(
        "item_id",
        "title",
        pl.col("release_date").str.slice(-4).alias("year"),
        flags.alias("genres"),
    )
    return _finish(_clean_ratings(ratings, folder / "u.data", strict), users, items, "ml-100k")


def _load_ml1m(folder: Path, strict: bool) -> MovieLens:
    _require_folder(folder, ["ratings.dat", "users.dat", "movies.dat"])
    ratings = _read_delimited(
        folder / "ratings.dat", "::", ["user_id", "item_id", "rating", "timestamp"], False
    )
    users = _read_delimited(
        folder / "users.dat", "::", ["user_id", "gender", "age", "occupation", "zip_code"], False
    )
    users = _with_int_ids(users, "user_id", folder / "users.dat").with_columns(
        pl.col("occupation")
        .str.strip_chars()
        .cast(pl.Int64, strict=False)
        .replace_strict(dict(enumerate(ML1M_OCCUPATIONS)), default="other")
    )
    items = _read_delimited(folder / "movies.dat", "::", ["item_id", "title", "genres"], False)
    items = _with_int_ids(items, "item_id", folder / "movies.dat").select(
        "item_id",
        "title",
        pl.lit(None, dtype=pl.Utf8).alias("year"),
        pl.col("genres").str.split("|"),
    )
    return _finish(_clean_ratings(ratings, folder / "ratings.dat", strict), users, items, "ml-1m")


def embedded_ml100k_folder() -> Path:
    """The ML-100K folder inside the installed recbole wheel."""
    try:
        root = importlib.resources.files("recbole") / "dataset_example" / "ml-100k"
    except ModuleNotFoundError as err:
        raise DataError(
            "the embedded ML-100K ships in the recbole wheel: run `make setup` "
            "(pip install --no-deps recbole==1.2.1)"
        ) from err
    return Path(str(root))


def load_movielens(config: DataConfig | str = "embedded") -> MovieLens:
    """Load a MovieLens source into normalized frames.

    Args:
        config: a :class:`DataConfig`, or just its ``source`` (``"embedded"`` or a folder path).

    Raises:
        DataError: a missing folder, file or column (named), or bad ratings in strict mode.

    Example::

        ml = load_movielens()          # the embedded ML-100K
        ml.ratings.height              # 100000
    """
    cfg = DataConfig(source=config) if isinstance(config, str) else config
    if cfg.source == "embedded":
        ml = _load_recbole(embedded_ml100k_folder(), cfg.strict)
    else:
        folder = Path(cfg.source).expanduser()
        if not folder.exists():
            raise DataError(
                f"data source {folder}: no such folder (expected a MovieLens folder with u.data, "
                "u.user, u.item, or ratings.dat, users.dat, movies.dat)"
            )
        if (folder / "ratings.dat").exists() or (folder / "movies.dat").exists():
            ml = _load_ml1m(folder, cfg.strict)
        elif (folder / "ml-100k.inter").exists():
            ml = _load_recbole(folder, cfg.strict)
        elif folder.is_dir() and not (folder / "u.data").exists() and not (folder / "u.item").exists():
            raise DataError(
                f"{folder}: not a MovieLens folder; expected u.data, u.user, u.item (ml-100k) "
                "or ratings.dat, users.dat, movies.dat (ml-1m)"
            )
        else:
            ml = _load_ml100k(folder, cfg.strict)
    return _dedupe(ml) if cfg.dedupe_titles else ml
