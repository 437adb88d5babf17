"""Turn rating rows into prompts for the language teachers, with polars expressions.

A prompt is a **user part** and an **item part** (``DataConfig.user_template`` and
``item_template``), joined by one space. A part may name any column of its table (MovieLens'
by default; a team's own users and items tables are checked when the prompts are built). The default gives, in the style of the paper::

    user u-196, a 49-year-old male writer. Watched movie 'Kolya' (1996, Comedy), id m-242. Rating:

The user part may name only user fields and the item part only item fields. That is what
lets a language teacher encode each part once per *entity* (943 users and 1,682 items for
ML-100K) instead of once per rating (:func:`entity_prompts`). A template is parsed once into
literal pieces and ``{field}`` columns and becomes one ``concat_str`` expression, so all of
ML-100K is verbalized without a Python loop.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import polars as pl

from features.config import DataConfig
from features.templates import parse_template

UNKNOWN = "unknown"


def _field_expr(field: str, genre_separator: str, dtype: pl.DataType | None = None) -> pl.Expr:
    """How ``field`` reads in a prompt: MovieLens' gender as "male"/"female", a list column
    (genres, tags) joined with ``genre_separator`` ("unknown" when empty), anything else as
    text; a null is "unknown"."""
    if field == "gender":
        return (pl.col("gender")
                .replace_strict({"M": "male", "F": "female"}, default=UNKNOWN, return_dtype=pl.Utf8)
                .fill_null(UNKNOWN))  # fmt: skip
    if (field == "genres" and dtype is None) or isinstance(dtype, pl.List):
        return (pl.when(pl.col(field).list.len() > 0)
                .then(pl.col(field).cast(pl.List(pl.Utf8)).list.join(genre_separator))
                .otherwise(pl.lit(UNKNOWN)))  # fmt: skip
    return pl.col(field).cast(pl.Utf8).fill_null(UNKNOWN)


def check_prompt_columns(template: str, part: str, spec: Any, columns: Sequence[str]) -> None:
    """Refuse a template that names the label column (the language teacher would read the
    answer), and warn on one naming a column no feature of the spec uses: text the embedding
    models do not read is fine (a user's stated interests) unless it is an answer key (a
    logged outcome, a click rate) that serving will not have.

    Raises:
        ValueError: the template names ``spec.label.column``.
    """
    key = f"data.{part}_template"
    fields = [field for _, field in parse_template(template, part, columns) if field is not None]
    if spec.label.column in fields:
        raise ValueError(f"{key}: {{{spec.label.column}}} is the label column (data.label) and cannot be in "
                         "a prompt: the language teacher would read the answer")  # fmt: skip
    used = {feature.column for feature in spec.features} | {spec.user_key, spec.item_key}
    unused = sorted(set(fields) - used)
    if unused:
        warnings.warn(f"{key} names {', '.join(unused)}, which no feature of the spec reads: fine for "
                      "text only the language teacher reads, wrong for an answer key (an outcome or "
                      "rate logged after the fact) that serving will not have", stacklevel=2)  # fmt: skip


def part_expr(template: str, part: str, genre_separator: str = ", ", upto: str | None = None,
              schema: dict[str, pl.DataType] | None = None) -> pl.Expr:  # fmt: skip
    """The polars expression rendering one part's ``template`` (``part``: user or item).

    Args:
        template: the part's template.
        part: ``"user"`` or ``"item"``: which fields it may name.
        genre_separator: how the values of a list column are joined.
        upto: render only the text *before* this field's first occurrence (for the
            character offset of a field, see :func:`field_spans`).
        schema: the part's table's columns and types, when it is not MovieLens' (any column
            may then be named).
    """
    pieces: list[pl.Expr] = []
    for literal, field in parse_template(template, part, None if schema is None else list(schema)):
        if literal:
            pieces.append(pl.lit(literal))
        if field is None:
            continue
        if field == upto:
            break
        pieces.append(_field_expr(field, genre_separator, None if schema is None else schema[field]))
    return pl.concat_str(pieces) if pieces else pl.lit("")


def prompt_expr(config: DataConfig, schema: dict[str, pl.DataType] | None = None) -> pl.Expr:
    """The whole prompt (user part, a space, item part) over a joined rating frame (``schema``:
    its columns, for a team's own tables; MovieLens' fields by default)."""
    sep = config.genre_separator
    return pl.concat_str(
        [part_expr(config.user_template, "user", sep, schema=schema), pl.lit(" "),
         part_expr(config.item_template, "item", sep, schema=schema)]
    ).alias("prompt")  # fmt: skip


def verbalize(joined: pl.DataFrame, config: DataConfig | None = None) -> pl.Series:
    """One prompt per row of a joined rating frame (``MovieLens.joined()``; with a config of
    your own tables, ``data.interactions``, any of its columns may be named)."""
    config = config or DataConfig()
    schema = dict(joined.schema) if config.interactions is not None else None
    if schema is not None:
        spec = config.spec_for("ml-100k")  # the own tables' spec (the name is MovieLens' default)
        check_prompt_columns(config.user_template, "user", spec, list(schema))
        check_prompt_columns(config.item_template, "item", spec, list(schema))
    return joined.select(prompt_expr(config, schema)).to_series()


@dataclass
class EntityPrompts:
    """The text of one part for every entity, in vocabulary order.

    Attributes:
        texts: ``texts[i]`` is the part of the entity with vocabulary index ``i``; index 0 is
            the unknown entity (every field "unknown").
        id_spans: ``[(start, end)]`` character span of the id field in each text, or None when
            the template does not name the id.
    """

    texts: list[str]
    id_spans: list[tuple[int, int]] | None


def field_spans(frame: pl.DataFrame, template: str, part: str, field: str,
                genre_separator: str = ", ", schema: dict[str, pl.DataType] | None = None,
                ) -> list[tuple[int, int]] | None:  # fmt: skip
    """Character span of ``field`` in each rendered row of ``frame``, or None if not named."""
    if field not in [f for _, f in parse_template(template, part, None if schema is None else list(schema))]:
        return None
    dtype = None if schema is None else schema[field]
    spans = frame.select(
        part_expr(template, part, genre_separator, upto=field, schema=schema).str.len_chars().alias("start"),
        _field_expr(field, genre_separator, dtype).str.len_chars().alias("length"),
    )
    return [(s, s + n) for s, n in zip(spans["start"].to_list(), spans["length"].to_list())]


def entity_prompts(frame: pl.DataFrame, config: DataConfig, part: str,
                   id_field: str | None = None, spec: Any = None) -> EntityPrompts:  # fmt: skip
    """The ``part`` ("user" or "item") text of every row of an entity frame in vocabulary order.

    ``frame`` comes from :func:`features.batches.entity_frame` (row ``i`` is vocabulary index
    ``i``; row 0 the unknown entity). The template may name any of its columns.

    With the data's feature ``spec`` (a team's own tables), a template naming the label column
    is refused and one naming a column no feature reads is warned about
    (:func:`check_prompt_columns`).

    Raises:
        ValueError: the template names a column the table lacks (named, with the columns), or
            the label column.
    """
    template = config.user_template if part == "user" else config.item_template
    schema = dict(frame.schema)
    if spec is not None and config.interactions is not None:
        check_prompt_columns(template, part, spec, list(schema))
    sep = config.genre_separator
    texts = frame.select(part_expr(template, part, sep, schema=schema)).to_series().to_list()
    id_field = id_field or ("user_id" if part == "user" else "item_id")
    return EntityPrompts(texts, field_spans(frame, template, part, id_field, sep, schema))
