"""A prompt template parsed and checked: which ``{field}`` columns each part (user, item) may
name. The verbalizer renders templates (:mod:`features.verbalizer`); the ``data:`` section checks
them when it is loaded (:class:`features.config.DataConfig`); neither imports the other for it.
"""

from __future__ import annotations

import string
from typing import Sequence

#: Fields each part of a prompt may name (columns of the user and item tables).
USER_FIELDS: tuple[str, ...] = ("user_id", "age", "gender", "occupation", "zip_code")
ITEM_FIELDS: tuple[str, ...] = ("item_id", "title", "year", "genres")
FIELDS: tuple[str, ...] = USER_FIELDS + ITEM_FIELDS
PARTS = {"user": USER_FIELDS, "item": ITEM_FIELDS}


def parse_template(template: str, part: str, fields: Sequence[str] | None = None) -> list[tuple[str, str | None]]:
    """``[(literal, field or None)]`` of one part's template, every field checked against
    ``fields`` (the columns of the part's table; MovieLens' by default)."""
    key = f"data.{part}_template"
    try:
        parsed = [(literal, field) for literal, field, _spec, _conv in string.Formatter().parse(template)]
    except ValueError as err:
        raise ValueError(f"{key}: cannot parse {template!r}: {err}") from err
    allowed = tuple(fields) if fields is not None else PARTS[part]
    for _literal, field in parsed:
        if field is None:
            continue
        if field == "rating":
            raise ValueError(f"{key}: {{rating}} is the label and cannot be in a prompt")
        if field not in allowed:
            other = "item" if part == "user" else "user"
            hint = (f" ({{{field}}} is an {other} field: put it in data.{other}_template)"
                    if fields is None and field in PARTS[other] else "")  # fmt: skip
            where = f"the {part}s table's columns" if fields is not None else f"the {part} part"
            raise ValueError(
                f"{key}: unknown field {{{field}}}{hint}; {where} may use "
                f"{', '.join(allowed)}"
            )
    return parsed


def check_templates(user_template: str, item_template: str) -> None:
    """Raise ``ValueError`` naming the key when either part's template is not valid."""
    parse_template(user_template, "user")
    parse_template(item_template, "item")
