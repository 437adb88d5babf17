"""A transfer set: (user, item) pairs nobody rated, for the committee to label.

Distillation on the labelled rows alone hands on what the teachers say where the labels already
are; on pairs nobody rated the student learns the teachers' function itself (Hinton et al.'s
transfer set; "function matching", Beyer et al. 2022). The pairs are drawn once per seed and
are the same for every method, so a comparison stays fair. A pair's row is built from its
user's and its item's features (:func:`features.entities.entity_blocks`): the id, the users' or
items' table attributes and the histories, exactly as a rated row of that user and item has
them. A spec with per-row features (a context column) has no such row, and is refused.

Policies (``TransferConfig.policy``):

- ``popularity``: a user drawn in proportion to its training interactions, an item likewise
  (independently): pairs that look like the log's;
- ``uniform``: users and items with at least one training interaction, uniformly.

Example::

    pairs = transfer_set(prepared, count=200_000, policy="popularity", seed=0)
    batch = pairs.batch(torch.arange(1024))  # rows len(prepared.data) .. + 1023; labels NaN
"""

from __future__ import annotations

import numpy as np
import torch

from features.encoded import MultiHot, RatingsData
from features.entities import entity_blocks
from features.history import RowHistory
from features.sources import DataError

POLICIES: tuple[str, ...] = ("popularity", "uniform")


def _first_rows(ids: np.ndarray, size: int) -> np.ndarray:
    """``[size]`` the first data row of each entity index (-1: none)."""
    first = np.full(size, -1)
    first[ids[::-1]] = np.arange(len(ids))[::-1]
    return first


def transfer_set(prepared, count: int, policy: str = "popularity", seed: int = 0):
    """``count`` unrated (user, item) pairs as a :class:`features.encoded.RatingsData` whose
    labels are NaN and whose rows are numbered after the data's (``row_offset = len(data)``),
    so per-row teacher caches never mix them with rated rows.

    Args:
        prepared: the prepared data (in memory).
        count: how many distinct pairs.
        policy: ``popularity`` or ``uniform``.
        seed: the draw's seed.

    Raises:
        DataError: the spec has per-row features or no user / item id feature, or fewer
            unrated pairs exist than ``count``.
        ValueError: an unknown policy or a count below 1.
    """

    if policy not in POLICIES:
        raise ValueError(f"distill.transfer.policy: {policy!r} is not a policy of a ratings log; expected "
                         f"one of {', '.join(POLICIES)} (mixup is for images)")  # fmt: skip
    if count < 1:
        raise ValueError(f"distill.transfer.pairs: must be at least 1, got {count}")
    spec, data = prepared.vocabs.spec, prepared.data
    if callable(getattr(data, "sample", None)):
        raise DataError("distill.transfer: a streamed log has no transfer set yet (its users and "
                        "items are not all in memory)")  # fmt: skip
    blocks, rows = entity_blocks(spec)
    user, item = spec.entity_feature("user"), spec.entity_feature("item")
    if rows:
        raise DataError(f"distill.transfer: feature {rows[0]!r} belongs to a row, not to a user or "
                        "an item, so an unrated pair has no value for it")  # fmt: skip
    if user not in blocks or item not in blocks or set(blocks) != {user, item}:
        raise DataError("distill.transfer: needs the spec's user and item id features (kind id "
                        "over the tables' keys, not hashed) and histories keyed on them")  # fmt: skip
    users, items = data.entity_ids(user).numpy(), data.entity_ids(item).numpy()
    n_users, n_items = data.sizes[user], data.sizes[item]
    train = data.splits["train"].numpy()
    weights = {}
    for name, ids, size in ((user, users, n_users), (item, items, n_items)):
        counts = np.bincount(ids[train], minlength=size).astype(np.float64)
        weights[name] = counts if policy == "popularity" else (counts > 0).astype(np.float64)
    observed = set((users * n_items + items).tolist())  # every split's pairs: all are rated
    free = int((weights[user] > 0).sum()) * int((weights[item] > 0).sum()) - len(observed)
    if count > free:
        raise DataError(f"distill.transfer.pairs: {count:,} asked, but only about {free:,} unrated "
                        "pairs of trained users and items exist")  # fmt: skip
    rng = np.random.default_rng(seed)
    chosen: dict[int, None] = {}  # insertion-ordered: the draw order
    pu, pi = weights[user] / weights[user].sum(), weights[item] / weights[item].sum()
    while len(chosen) < count:
        need = count - len(chosen)
        draw = rng.choice(n_users, 2 * need, p=pu) * n_items + rng.choice(n_items, 2 * need, p=pi)
        for code in draw.tolist():
            if code not in observed and code not in chosen:
                chosen[code] = None
                if len(chosen) == count:
                    break
    codes = np.fromiter(chosen, dtype=np.int64, count=count)
    pair_user, pair_item = codes // n_items, codes % n_items
    # each pair takes its user's features from a rated row of that user, its item's likewise
    source = {user: _first_rows(users, n_users)[pair_user], item: _first_rows(items, n_items)[pair_item]}
    owner = {name: key for key, names in blocks.items() for name in names}
    single = torch.stack([data.single[torch.from_numpy(source[owner[name]]), j]
                          for j, name in enumerate(data.single_names)], dim=1)  # fmt: skip
    multi = {}
    for name, bag in data.multi.items():
        if isinstance(bag, RowHistory):
            multi[name] = RowHistory(bag.bags, single[:, data.single_names.index(bag.bags.key)])
        else:
            padded, lengths = bag.take(torch.from_numpy(source[owner[name]]))
            multi[name] = MultiHot(padded, lengths)
    labels = torch.full((count,), float("nan"))
    out = RatingsData(single, multi, labels, {"train": torch.arange(count)}, data.sizes,
                      data.single_names, data.task)  # fmt: skip
    out.row_offset = len(data)
    return out


__all__ = ["POLICIES", "transfer_set"]
