"""Which features are a function of one entity (a user, an item) and which belong to the row.

A feature whose value is fixed by the user — the user's id, a column of the users table, a
history keyed on the user — is the same on every interaction of that user; likewise for items.
Models use this to compute a part once per entity (the FM teacher's relation blocks), and a
transfer set (:mod:`features.transfer`) uses it to build rows for (user, item) pairs nobody
rated. The other features (interactions-table columns: a context, a position) belong to a row.

Example::

    blocks, rows = entity_blocks(load_spec("ml100k_history"))
    blocks  # {"user_id": ["user_id", "age", ..., "user_items"], "item_id": ["item_id", ...]}
    rows    # []
"""

from __future__ import annotations

from features.spec import DataSpec


def entity_blocks(spec: DataSpec) -> tuple[dict[str, list[str]], list[str]]:
    """``({key feature: its member features}, row features)``, features in spec order.

    The keys are the spec's user and item id features (kind ``id`` over the tables' keys, with
    a stored vocabulary, so that an index is one entity) and the key of every history. A
    users-table feature joins the user key's block, an items-table one the item key's, a
    history its key's; every other feature is a row feature.
    """
    keys: list[str] = []
    table_of: dict[str, str] = {}
    for part, table in (("user", "users"), ("item", "items")):
        name = spec.entity_feature(part)
        if name is not None and spec[name].hash_buckets is None:
            keys.append(name)
            table_of[table] = name
    keys += [f.key for f in spec.histories if f.key not in keys]
    blocks: dict[str, list[str]] = {key: [key] for key in keys}
    rows: list[str] = []
    for f in spec.features:
        if f.name in keys:
            continue
        if f.kind == "history":
            blocks[f.key].append(f.name)
        elif f.table in table_of:
            blocks[table_of[f.table]].append(f.name)
        else:
            rows.append(f.name)
    return blocks, rows


__all__ = ["entity_blocks"]
