"""A data set's source tables as lazy polars scans: a team's own logs, or a GroupLens folder.

A data set is up to three tables, named as in the feature spec (:mod:`features.spec`)::

    interactions  one row per event (a rating, a click), with the user and item keys
    users         one row per user (optional)
    items         one row per item (optional)

Each table is one file, a folder of shards, or a glob pattern, in parquet or CSV, scanned
lazily: building :class:`Tables` reads only parquet footers and CSV headers, so a spec can be
checked against :meth:`Tables.schemas` before any row is read.

GroupLens MovieLens folders give the normalized columns of :mod:`features.sources`; ml-100k and
ml-1m are small and read eagerly by :func:`features.sources.load_movielens`, the larger ones
(ml-10m, ml-20m, ml-25m, ml-latest) are scanned lazily.

Example::

    tables = scan_tables("logs/part-*.parquet", users="users.parquet")
    check_columns(spec, tables.schemas())   # no data read yet
    frame = tables.joined().collect()
"""

from __future__ import annotations

import glob as globbing
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from features.config import DataConfig
from features.sources import (
    DataError,
    _read_delimited,
    _split_title_year,
    _with_int_ids,
    load_movielens,
)

FORMATS: tuple[str, ...] = ("auto", "parquet", "csv")
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet", ".pq")
CSV_SUFFIXES: tuple[str, ...] = (".csv", ".tsv", ".txt")
_PARQUET_MAGIC = b"PAR1"
_GLOB_CHARS = ("*", "?", "[")
#: The files each GroupLens layout needs, in the order layouts are tried.
GROUPLENS_LAYOUTS: dict[str, tuple[str, ...]] = {
    "recbole": ("ml-100k.inter", "ml-100k.user", "ml-100k.item"),
    "ml-100k": ("u.data", "u.user", "u.item"),
    "ml-1m": ("ratings.dat", "users.dat", "movies.dat"),
    "ml-10m": ("ratings.dat", "movies.dat"),
    "ml-20m": ("ratings.csv", "movies.csv"),
}
#: ml-10m and later rate in half stars.
_HALF_STAR_RANGE = (0.5, 5.0)
_NO_GENRES = "(no genres listed)"


@dataclass
class Tables:
    """The source tables of a data set, as lazy scans (nothing read yet).

    Args:
        interactions: one row per event, with the user and item keys.
        users: one row per user, or None when the data set has no users table.
        items: one row per item, or None when the data set has no items table.
        name: what the data set is called in logs, e.g. ``"ml-100k"`` or the interactions path.
        files: the files behind each table present (for per-rank sharding); ``{}`` for tables
            made from frames in memory.

    Example::

        tables = grouplens_tables(embedded_ml100k_folder())
        tables.schemas()["items"]["genres"]      # List(String)
    """

    interactions: pl.LazyFrame
    users: pl.LazyFrame | None
    items: pl.LazyFrame | None
    name: str
    files: dict[str, list[Path]]

    def present(self) -> dict[str, pl.LazyFrame]:
        """The tables that exist, by name (``interactions`` first)."""
        tables = {"interactions": self.interactions, "users": self.users, "items": self.items}
        return {name: lf for name, lf in tables.items() if lf is not None}

    def schemas(self) -> dict[str, dict[str, pl.DataType]]:
        """``{table: {column: dtype}}`` of the tables present, from ``collect_schema()``.

        No rows are read: the shape :func:`features.spec.check_columns` takes.

        Example::

            check_columns(spec, tables.schemas())
        """
        return {name: dict(lf.collect_schema()) for name, lf in self.present().items()}

    def joined(self, user_key: str = "user_id", item_key: str = "item_id") -> pl.LazyFrame:
        """Interactions left-joined with users on ``user_key`` and items on ``item_key``.

        Whichever of users and items exist are joined; interaction order is kept.

        Args:
            user_key: the column that interactions and users share.
            item_key: the column that interactions and items share.

        Raises:
            DataError: a key that the interactions or the joined table lacks (named, with the
                columns that table has).

        Example::

            frame = tables.joined().collect()   # one row per interaction
        """
        joined = self.interactions
        for table, key in (("users", user_key), ("items", item_key)):
            other = getattr(self, table)
            if other is None:
                continue
            for side, lf in (("interactions", self.interactions), (table, other)):
                columns = lf.collect_schema().names()
                if key not in columns:
                    raise DataError(
                        f"{self.name}: cannot join {table} on {key!r}: table {side!r} lacks it "
                        f"(its columns: {', '.join(columns)})"
                    )
            joined = joined.join(other, on=key, how="left", maintain_order="left")
        return joined


def _format_of(files: list[Path], format: str, what: str, where: str) -> str:
    """The one format of ``files``: ``format`` itself, or (``auto``) what their suffixes say."""
    if format not in FORMATS:
        raise DataError(f"{what} table {where}: unknown format {format!r}; expected one of "
                        f"{', '.join(FORMATS)}")  # fmt: skip
    if format != "auto":
        return format
    by_format: dict[str, Path] = {}
    for file in files:
        suffix = file.suffix.lower()
        if suffix in PARQUET_SUFFIXES:
            by_format.setdefault("parquet", file)
        elif suffix in CSV_SUFFIXES:
            by_format.setdefault("csv", file)
        else:
            raise DataError(
                f"{what} table {where}: cannot tell the format of {file} from its suffix "
                f"{suffix!r} (parquet: {', '.join(PARQUET_SUFFIXES)}; csv: "
                f"{', '.join(CSV_SUFFIXES)}); pass format='parquet' or format='csv'"
            )
    if len(by_format) > 1:
        raise DataError(
            f"{what} table {where}: mixed formats, parquet ({by_format['parquet']}) and csv "
            f"({by_format['csv']}); one table is one format"
        )
    return next(iter(by_format))


def _resolve(path: Path, what: str) -> list[Path]:
    """The files behind ``path``: the file itself, a folder's shards, or a glob's matches."""
    if path.is_file():
        return [path]
    if path.is_dir():
        for suffix in (".parquet", ".csv"):
            shards = sorted(f for f in path.glob(f"*{suffix}") if f.is_file())
            if shards:
                return shards
        raise DataError(f"{what} table {path}: the folder holds no *.parquet or *.csv files")
    if any(c in str(path) for c in _GLOB_CHARS):
        matches = sorted(Path(p) for p in globbing.glob(str(path)) if Path(p).is_file())
        if not matches:
            raise DataError(f"{what} table {path}: the glob pattern matches no files")
        return matches
    raise DataError(f"{what} table {path}: no such file or folder")


def _check_parquet_magic(file: Path, what: str) -> None:
    # Only the first shard is checked: four bytes, so a CSV named .parquet fails here, clearly.
    with file.open("rb") as handle:
        head = handle.read(len(_PARQUET_MAGIC))
    if head != _PARQUET_MAGIC:
        found = "it is empty" if not head else f"it starts with {head!r}, not {_PARQUET_MAGIC!r}"
        raise DataError(f"{what} table {file}: not a parquet file ({found})")


def _shard_schema(file: Path, format: str, separator: str, what: str) -> dict[str, pl.DataType]:
    """One shard's columns: a parquet footer, or a CSV header (its dtypes as inferred)."""
    try:
        if format == "parquet":
            return dict(pl.read_parquet_schema(file))
        return dict(pl.scan_csv(file, separator=separator).collect_schema())
    except (pl.exceptions.PolarsError, OSError) as err:
        raise DataError(f"{what} table {file}: cannot read its {format} schema: {err}") from err


def _check_same_schema(files: list[Path], format: str, separator: str, what: str) -> None:
    """Fail at the first shard whose columns (parquet: and dtypes) differ from the first's."""
    first = _shard_schema(files[0], format, separator, what)
    for file in files[1:]:
        schema = _shard_schema(file, format, separator, what)
        if list(schema) != list(first):
            missing = [c for c in first if c not in schema]
            extra = [c for c in schema if c not in first]
            if missing:
                detail = f"lacks column {missing[0]!r}"
            elif extra:
                detail = f"has extra column {extra[0]!r}"
            else:
                detail = f"orders its columns {', '.join(schema)}"
            raise DataError(
                f"{what} table: shard {file} {detail}, unlike {files[0]} "
                f"(columns: {', '.join(first)})"
            )
        # CSV dtypes are only inferred from a shard's first rows, so only parquet's are compared.
        if format == "parquet":
            for column, dtype in schema.items():
                if dtype != first[column]:
                    raise DataError(
                        f"{what} table: shard {file} has column {column!r} as {dtype}, but "
                        f"{files[0]} has it as {first[column]}"
                    )


def scan_table(
    path: str | Path, format: str = "auto", separator: str = ",", what: str = "interactions"
) -> tuple[pl.LazyFrame, list[Path]]:
    """A file, a folder of shards, or a glob pattern, as one lazy scan.

    A folder contributes every ``*.parquet`` inside it, else every ``*.csv`` (sorted by name,
    not recursive); a glob pattern (``"logs/part-*.parquet"``) every file it matches, sorted.
    Only parquet footers and CSV headers are read here.

    Args:
        path: the file, folder or glob pattern.
        format: ``"auto"`` (by suffix: ``.parquet``/``.pq`` are parquet, ``.csv``/``.tsv``/
            ``.txt`` are csv), ``"parquet"`` or ``"csv"``.
        separator: the CSV field separator, one byte (``"\\t"`` for TSV); unused for parquet.
        what: the table's name, for error messages (``"interactions"``, ``"users"``, ...).

    Returns:
        The lazy scan and the files behind it, in scan order.

    Raises:
        DataError: naming ``what`` and the path: no such path; a glob matching nothing; a
            folder with neither parquet nor csv files; mixed formats; a file that is not
            parquet; or shards whose columns differ (the first differing file and column).

    Example::

        logs, files = scan_table("logs/part-*.parquet")
        logs.collect_schema()      # from the first footer; no rows read
    """
    where = Path(path).expanduser()
    files = _resolve(where, what)
    fmt = _format_of(files, format, what, str(where))
    if fmt == "parquet":
        _check_parquet_magic(files[0], what)
    elif len(separator) != 1:
        raise DataError(f"{what} table {where}: the csv separator must be one character, got "
                        f"{separator!r}")  # fmt: skip
    _check_same_schema(files, fmt, separator, what)
    if fmt == "parquet":
        return pl.scan_parquet(files), files
    return pl.scan_csv(files, separator=separator), files


def scan_tables(
    interactions: str | Path,
    users: str | Path | None = None,
    items: str | Path | None = None,
    format: str = "auto",
    separator: str = ",",
) -> Tables:
    """A team's own logs as :class:`Tables`: each table a file, folder or glob (see scan_table).

    Args:
        interactions: where the interactions are.
        users: where the users table is, if there is one.
        items: where the items table is, if there is one.
        format: ``"auto"``, ``"parquet"`` or ``"csv"``, for every table.
        separator: the CSV field separator, for every CSV table.

    Raises:
        DataError: as :func:`scan_table`, naming the table.

    Example::

        tables = scan_tables("logs/", users="users.csv", items="items.parquet")
    """
    scans: dict[str, pl.LazyFrame | None] = {"users": None, "items": None}
    files: dict[str, list[Path]] = {}
    for what, path in (("interactions", interactions), ("users", users), ("items", items)):
        if path is not None:
            scans[what], files[what] = scan_table(path, format, separator, what)
    return Tables(
        interactions=scans["interactions"],
        users=scans["users"],
        items=scans["items"],
        name=str(interactions),
        files=files,
    )


def in_memory_tables(
    interactions: pl.DataFrame,
    users: pl.DataFrame | None = None,
    items: pl.DataFrame | None = None,
    name: str = "in-memory",
) -> Tables:
    """Frames already in memory as :class:`Tables` (no files behind them).

    Args:
        interactions: one row per event.
        users: one row per user, if any.
        items: one row per item, if any.
        name: what the data set is called in logs.

    Example::

        ml = load_movielens()
        tables = in_memory_tables(ml.ratings, ml.users, ml.items, name=ml.name)
    """
    return Tables(
        interactions=interactions.lazy(),
        users=None if users is None else users.lazy(),
        items=None if items is None else items.lazy(),
        name=name,
        files={},
    )


def _grouplens_layout(folder: Path) -> str:
    """Which GroupLens layout ``folder`` is, by its files."""
    if not folder.is_dir():
        raise DataError(f"MovieLens folder {folder}: no such folder")
    has = {name for layout in GROUPLENS_LAYOUTS.values() for name in layout
           if (folder / name).is_file()}  # fmt: skip
    for layout, needs in GROUPLENS_LAYOUTS.items():
        if set(needs) <= has:
            return layout
    needs = "; ".join(f"{layout}: {', '.join(n)}" for layout, n in GROUPLENS_LAYOUTS.items())
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
    raise DataError(
        f"{folder}: not a GroupLens MovieLens folder (it holds {found}); each layout needs: "
        f"{needs}"
    )


def _valid_ratings(ratings: pl.LazyFrame, strict: bool) -> pl.LazyFrame:
    """Normalized interactions; unless strict, rows with a bad id, rating or timestamp dropped."""
    ratings = ratings.select(
        pl.col("user_id"),
        pl.col("item_id"),
        pl.col("rating").cast(pl.Float32),
        pl.col("timestamp"),
    )
    if strict:  # the scan parses strictly: a bad value fails when the rows are read
        return ratings
    low, high = _HALF_STAR_RANGE
    valid = pl.all_horizontal(pl.all().is_not_null()) & pl.col("rating").is_between(low, high)
    return ratings.filter(valid)


def _normalized_items(items: pl.LazyFrame) -> pl.LazyFrame:
    """item_id, title and year (from the "(YYYY)" title suffix), genres split on "|"."""
    items = items.with_columns(pl.lit(None, dtype=pl.Utf8).alias("year"))
    return _split_title_year(items).select(
        pl.col("item_id").cast(pl.Int64),
        "title",
        "year",
        pl.col("genres")
        .str.split("|")
        .list.eval(pl.element().filter(pl.element() != _NO_GENRES))
        .alias("genres"),
    )


def _ml10m(folder: Path, strict: bool) -> Tables:
    ratings_path, movies_path = folder / "ratings.dat", folder / "movies.dat"
    # "::" is two bytes and scan_csv takes one: split on ":" and keep fields 0, 2, 4, 6.
    fields = ["user_id", "_", "item_id", "__", "rating", "___", "timestamp"]
    dtypes = [pl.Int64, pl.Utf8, pl.Int64, pl.Utf8, pl.Float64, pl.Utf8, pl.Int64]
    raw = pl.scan_csv(
        ratings_path,
        has_header=False,
        separator=":",
        quote_char=None,
        schema=dict(zip(fields, dtypes)),
        ignore_errors=not strict,
    )
    interactions = _valid_ratings(raw, strict)
    # movies.dat is small and its titles may hold ":", so it is read whole, split on "::".
    movies = _read_delimited(movies_path, "::", ["item_id", "title", "genres"], header=False)
    movies = _with_int_ids(movies, "item_id", movies_path)
    items = _normalized_items(movies.lazy())
    files = {"interactions": [ratings_path], "items": [movies_path]}
    return Tables(interactions, None, items, "ml-10m", files)


def _scan_header_csv(path: Path, columns: dict[str, pl.DataType], strict: bool) -> pl.LazyFrame:
    """A GroupLens CSV with a header, its ``columns`` typed; a missing column fails now."""
    scan = pl.scan_csv(path, schema_overrides=columns, ignore_errors=not strict)
    try:
        has = scan.collect_schema().names()
    except pl.exceptions.PolarsError as err:
        raise DataError(f"cannot read {path}: {err}") from err
    missing = [c for c in columns if c not in has]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r} (has {', '.join(has)})")
    return scan


def _ml20m(folder: Path, strict: bool) -> Tables:
    ratings_path, movies_path = folder / "ratings.csv", folder / "movies.csv"
    ratings = _scan_header_csv(
        ratings_path,
        {"userId": pl.Int64, "movieId": pl.Int64, "rating": pl.Float64, "timestamp": pl.Int64},
        strict,
    ).select(
        pl.col("userId").alias("user_id"),
        pl.col("movieId").alias("item_id"),
        "rating",
        "timestamp",
    )
    movies = _scan_header_csv(
        movies_path, {"movieId": pl.Int64, "title": pl.Utf8, "genres": pl.Utf8}, strict
    ).select(pl.col("movieId").alias("item_id"), "title", "genres")
    name = folder.name.lower() if folder.name.lower().startswith("ml-") else "ml-csv"
    files = {"interactions": [ratings_path], "items": [movies_path]}
    return Tables(_valid_ratings(ratings, strict), None, _normalized_items(movies), name, files)


def grouplens_tables(folder: str | Path, strict: bool = False) -> Tables:
    """A GroupLens MovieLens folder as :class:`Tables`, in the columns of features.sources.

    The columns (users only where the data set has them)::

        interactions: user_id i64, item_id i64, rating f32, timestamp i64
        users:        user_id i64, age i32, gender str, occupation str, zip_code str
        items:        item_id i64, title str, year i32 (null when unknown), genres list[str]

    The layout is told by the files: ml-100k (``u.data``, ...), its recbole copy
    (``ml-100k.inter``, ...) and ml-1m (``ratings.dat``, ``users.dat``, ...) are read eagerly by
    :func:`features.sources.load_movielens`; ml-10m (``ratings.dat`` and ``movies.dat``, no
    users) and ml-20m / ml-25m / ml-latest (``ratings.csv``, ``movies.csv``) are scanned lazily,
    with no users table. ``tags.dat`` / ``tags.csv`` and the other files are not read.

    Args:
        folder: the unpacked GroupLens folder.
        strict: for ml-100k and ml-1m, reject (instead of dropping) invalid ratings when read;
            for the lazy layouts, parse strictly so a bad value fails when rows are collected
            (otherwise rows with an unparsable field or a rating outside 0.5..5 are dropped).

    Raises:
        DataError: a folder that matches no layout (with what each layout needs), or a missing
            file or column (named).

    Example::

        tables = grouplens_tables(embedded_ml100k_folder())
        tables.interactions.collect().height     # 100000
    """
    folder = Path(folder).expanduser()
    layout = _grouplens_layout(folder)
    if layout == "ml-10m":
        return _ml10m(folder, strict)
    if layout == "ml-20m":
        return _ml20m(folder, strict)
    ml = load_movielens(DataConfig(source=str(folder), strict=strict))
    names = GROUPLENS_LAYOUTS[layout]
    tables = ("interactions", "users", "items")
    files = {table: [folder / name] for table, name in zip(tables, names)}
    return Tables(ml.ratings.lazy(), ml.users.lazy(), ml.items.lazy(), ml.name, files)
