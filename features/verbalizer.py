"""Turn rating rows into prompts for the language teachers, with polars expressions.

The default template (``DataConfig.template``) gives, in the style of the paper::

    user u-196, a 49-year-old male writer. Watched movie 'Kolya' (1996, Comedy), id m-242. Rating:

A template is parsed once into literal pieces and ``{field}`` columns and becomes one
``concat_str`` expression, so all of ML-100K is verbalized without a Python loop.
"""

from __future__ import annotations

import string

import polars as pl

from features.config import DataConfig

UNKNOWN = "unknown"


def _field_exprs(genre_separator: str) -> dict[str, pl.Expr]:
    text = lambda col: pl.col(col).cast(pl.Utf8).fill_null(UNKNOWN)  # noqa: E731
    return {
        "user_id": text("user_id"),
        "item_id": text("item_id"),
        "age": text("age"),
        "gender": pl.col("gender")
        .replace_strict({"M": "male", "F": "female"}, default=UNKNOWN, return_dtype=pl.Utf8)
        .fill_null(UNKNOWN),
        "occupation": text("occupation"),
        "zip_code": text("zip_code"),
        "title": text("title"),
        "year": text("year"),
        "genres": pl.when(pl.col("genres").list.len() > 0)
        .then(pl.col("genres").list.join(genre_separator))
        .otherwise(pl.lit(UNKNOWN)),
    }


FIELDS: tuple[str, ...] = tuple(_field_exprs(", "))


def prompt_expr(template: str, genre_separator: str = ", ") -> pl.Expr:
    """The polars expression that renders ``template`` over a joined rating frame.

    Raises:
        ValueError: the template names a field that does not exist (or the label, ``rating``).
    """
    exprs = _field_exprs(genre_separator)
    parts: list[pl.Expr] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"data.template: cannot parse {template!r}: {err}") from err
    for literal, field, _spec, _conv in parsed:
        if literal:
            parts.append(pl.lit(literal))
        if field is None:
            continue
        if field == "rating":
            raise ValueError("data.template: {rating} is the label and cannot be in a prompt")
        if field not in exprs:
            raise ValueError(
                f"data.template: unknown field {{{field}}}; allowed fields are "
                f"{', '.join(FIELDS)}"
            )
        parts.append(exprs[field])
    return pl.concat_str(parts).alias("prompt")


def verbalize(joined: pl.DataFrame, config: DataConfig | None = None) -> pl.Series:
    """One prompt per row of a joined rating frame (``MovieLens.joined()``)."""
    config = config or DataConfig()
    return joined.select(prompt_expr(config.template, config.genre_separator)).to_series()
