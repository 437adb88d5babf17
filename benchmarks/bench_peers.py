"""Peers: what a recsys engineer would fit instead of the library, on the library's own splits.

The data and the train / valid / test rows are exactly those of ``features.batches.prepare``
(embedded ML-100K). The random split changes with the seed; the temporal split (per user, by
time) is the same for every seed, so there the seed changes only the peer's own randomness.
Every peer sees the TRAIN rows only, and every feature built from ratings (the implicit
feedback) is built from the training rows only.

Peers:

- ``myfm``: a Bayesian factorization machine (myFM, Gibbs sampling, predictions averaged over
  the kept posterior samples), in two relation blocks. Per user: its id, age bucket, gender,
  occupation and zip prefix (one-hot), and the items it rated in training (weights
  ``1/sqrt(n)``, SVD++'s implicit feedback). Per item: its id and release-year bucket
  (one-hot), its genres (weights ``1/n``) and the users who rated it in training
  (``1/sqrt(n)``). Rank, iterations and kept samples: ``MYFM``.
- ``myfm_noimplicit``: the same without the two implicit-feedback bags.
- ``svdpp``: SVD++ (scikit-surprise) on (user id, item id, rating) alone, its hyper-parameters
  chosen on this split's VALID rows from ``SVDPP_GRID`` (``benchmarks/bench_svdpp.py``'s
  default grid), fitted with ``random_state=seed``.

Metrics, on predictions clipped to the training labels' range (1..5 stars), as
``recdistill.training.evaluate`` scores the library's models: valid and test MSE / RMSE / MAE,
and the test MSE per cold / medium / warm item and user (fewer than 5, 5 to 20, more than 20
training ratings: the library's own slice functions). Also each fit's wall seconds and the
machine's load average before and after it.

Neither myFM nor scikit-surprise is a dependency of the library or its tests: install them by
hand into the venv (myFM needs ``setuptools<81`` for ``pkg_resources``)::

    .venv/bin/pip install myfm==0.4.0 "setuptools<81" scikit-surprise

Usage (one JSON line per peer, split and seed; lines already in ``--out`` are skipped, so an
interrupted run resumes; the summary tables are printed from the whole file at the end)::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_peers.py \\
        --peers myfm myfm_noimplicit svdpp --splits random temporal --seeds 0 1 2 \\
        --out docs/results/peers.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import time
import warnings
from importlib import metadata
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # myFM draws a progress bar per Gibbs iteration
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # myFM 0.4.0's import

import numpy as np  # noqa: E402
import scipy.sparse as sps  # noqa: E402
import torch  # noqa: E402

import bench_svdpp  # noqa: E402
from features.batches import Prepared, RatingsData, prepare  # noqa: E402
from features.config import DataConfig  # noqa: E402
from recdistill.training.evaluation import (  # noqa: E402
    DEFAULT_SLICE_EDGES,
    SLICE_ENTITIES,
    SLICE_NAMES,
    label_range,
    slice_index,
    training_counts,
)

#: myFM's settings: factor rank, Gibbs iterations, and the last samples kept for prediction.
MYFM = {"rank": 16, "n_iter": 300, "n_kept_samples": 250}
#: The user block's one-hot features, then the item block's (the entity's id first).
USER_FEATURES = ("user_id", "age", "gender", "occupation", "zip_prefix")
ITEM_FEATURES = ("item_id", "release_year")
#: SVD++'s grid, searched on valid (``benchmarks/bench_svdpp.py``'s defaults).
SVDPP_GRID = {"n_factors": (10, 30), "lr_all": (0.005, 0.01), "reg_all": (0.02, 0.05, 0.1),
              "n_epochs": (20, 40)}  # fmt: skip


# ---- scoring, as the library slices ---------------------------------------------------------


def row_slices(data: RatingsData) -> dict[str, np.ndarray]:
    """Per sliced entity (``item``, ``user``), ``[N]`` slice of every row: 0 cold, 1 medium,
    2 warm by the entity's number of training ratings (``recdistill.training.evaluation``)."""
    return {entity: slice_index(training_counts(data, feature), DEFAULT_SLICE_EDGES)[data.entity_ids(feature)].numpy()
            for entity, feature in SLICE_ENTITIES.items()}  # fmt: skip


def errors(data: RatingsData, rows: np.ndarray, predictions: np.ndarray,
           slices: dict[str, np.ndarray] | None = None) -> dict:  # fmt: skip
    """MSE, RMSE and MAE of ``predictions`` (``[B]``, for ``rows``) clipped to the training labels'
    range; with ``slices`` (:func:`row_slices`) also ``mse_{entity}_{slice}`` (None for a slice
    without rows) and ``n_{entity}_{slice}``, as ``recdistill.training.evaluate`` reports them."""
    err = np.clip(predictions, *label_range(data)) - data.labels.numpy()[rows].astype(np.float64)
    mse = float(np.mean(err**2))
    out = {"mse": mse, "rmse": math.sqrt(mse), "mae": float(np.mean(np.abs(err)))}
    for entity, per_row in (slices or {}).items():
        for index, name in enumerate(SLICE_NAMES):
            mask = per_row[rows] == index
            out[f"mse_{entity}_{name}"] = float(np.mean(err[mask] ** 2)) if mask.any() else None
            out[f"n_{entity}_{name}"] = int(mask.sum())
    return out


# ---- myFM: relation blocks ------------------------------------------------------------------


def entity_table(data: RatingsData, features: tuple[str, ...]) -> np.ndarray:
    """``[V, F]`` vocabulary index of each of ``features`` per entity of ``features[0]`` (its id
    feature; ``V`` its vocabulary size). Ids on no row keep index 0 and are never looked up."""
    ids = data.entity_ids(features[0]).numpy()
    columns = data.single[:, [data.single_names.index(f) for f in features]].numpy()
    table = np.zeros((data.sizes[features[0]], len(features)), dtype=np.int64)
    table[ids] = columns  # an entity's attributes are the same on all its rows
    return table


def one_hot(table: np.ndarray, sizes: list[int]) -> sps.csr_matrix:
    """``[V, sum(sizes)]`` one-hot of each column of ``table`` (``[V, F]``), side by side."""
    n, width = table.shape
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return sps.csr_matrix((np.ones(n * width), (np.repeat(np.arange(n), width), (table + offsets).ravel())),
                          shape=(n, sum(sizes)))  # fmt: skip


def bag(owners: np.ndarray, members: np.ndarray, shape: tuple[int, int], exponent: float) -> sps.csr_matrix:
    """``[owners, members]`` weighted bag: each owner's members weighted ``1 / n**exponent``
    (``n``: how many members it has; 1: their mean, 0.5: SVD++'s ``1/sqrt(n)``)."""
    matrix = sps.csr_matrix((np.ones(len(owners)), (owners, members)), shape=shape)
    counts = np.diff(matrix.indptr)
    matrix.data = np.repeat(1.0 / np.maximum(counts, 1) ** exponent, counts)
    return matrix


def genre_bag(data: RatingsData) -> sps.csr_matrix:
    """``[items, genres]`` each item's genres, weights ``1/n``."""
    items, first_row = np.unique(data.entity_ids("item_id").numpy(), return_index=True)
    genres = data.multi["genres"]
    padded, lengths = genres.padded.numpy()[first_row], genres.lengths.numpy()[first_row]
    present = np.arange(padded.shape[1]) < lengths[:, None]  # [items, G]
    return bag(np.repeat(items, lengths), padded[present], (data.sizes["item_id"], data.sizes["genres"]), 1.0)


def relation_blocks(data: RatingsData, implicit: bool) -> tuple[sps.csr_matrix, sps.csr_matrix]:
    """``(user block [users, Du], item block [items, Di])``: one row of features per entity;
    ``implicit`` adds each user's training items and each item's training users."""
    users, items = data.sizes["user_id"], data.sizes["item_id"]
    user_parts = [one_hot(entity_table(data, USER_FEATURES), [data.sizes[f] for f in USER_FEATURES])]
    item_parts = [one_hot(entity_table(data, ITEM_FEATURES), [data.sizes[f] for f in ITEM_FEATURES]),
                  genre_bag(data)]  # fmt: skip
    if implicit:
        train = data.splits["train"].numpy()
        user_ids, item_ids = data.entity_ids("user_id").numpy()[train], data.entity_ids("item_id").numpy()[train]
        user_parts.append(bag(user_ids, item_ids, (users, items), 0.5))
        item_parts.append(bag(item_ids, user_ids, (items, users), 0.5))
    return sps.hstack(user_parts, format="csr"), sps.hstack(item_parts, format="csr")


def run_myfm(prepared: Prepared, seed: int, implicit: bool) -> dict:
    """Fit myFM on the training rows; valid and test errors and the fit's seconds."""
    import myfm  # a peer, not a dependency: imported only when it runs

    data = prepared.data
    user_block, item_block = relation_blocks(data, implicit)
    user_ids, item_ids = data.entity_ids("user_id").numpy(), data.entity_ids("item_id").numpy()

    def relations(rows: np.ndarray) -> list:
        return [myfm.RelationBlock(user_ids[rows], user_block), myfm.RelationBlock(item_ids[rows], item_block)]

    train = data.splits["train"].numpy()
    model = myfm.MyFMRegressor(rank=MYFM["rank"], random_seed=seed)
    start = time.perf_counter()
    model.fit(None, data.labels.numpy()[train].astype(np.float64), X_rel=relations(train),
              n_iter=MYFM["n_iter"], n_kept_samples=MYFM["n_kept_samples"])  # fmt: skip
    fit_seconds = time.perf_counter() - start
    slices = row_slices(data)
    scores = {split: errors(data, rows, model.predict(None, relations(rows)), slices if split == "test" else None)
              for split, rows in ((s, data.splits[s].numpy()) for s in ("valid", "test"))}  # fmt: skip
    return {"params": {**MYFM, "implicit": implicit}, **scores, "fit_seconds": round(fit_seconds, 1),
            "block_columns": {"user": user_block.shape[1], "item": item_block.shape[1]}}  # fmt: skip


# ---- SVD++ ----------------------------------------------------------------------------------


def run_svdpp(prepared: Prepared, seed: int) -> dict:
    """SVD++ with the grid point best on VALID (every point fitted with ``seed``); its valid and
    test errors, its fit's seconds, and the grid."""
    trainset = bench_svdpp.surprise_trainset(prepared)
    valid = bench_svdpp.rows_of(prepared, "valid")
    grid, best, best_mse = [], None, math.inf
    for values in itertools.product(*SVDPP_GRID.values()):
        params = dict(zip(SVDPP_GRID, values))
        start = time.perf_counter()
        algo = bench_svdpp.fit(trainset, params, seed)
        seconds = time.perf_counter() - start
        valid_mse = bench_svdpp.score(algo, valid)["mse"]
        grid.append({"params": params, "valid_mse": valid_mse, "fit_seconds": round(seconds, 1)})
        print(f"  svdpp {params}: valid MSE {valid_mse:.4f} ({seconds:.0f} s)", flush=True)
        if valid_mse < best_mse:
            best, best_mse = (algo, params, seconds), valid_mse
    algo, params, fit_seconds = best
    data, slices = prepared.data, row_slices(prepared.data)
    scores = {}
    for split in ("valid", "test"):
        rows = bench_svdpp.rows_of(prepared, split)
        predictions = np.array([algo.predict(u, i, clip=True).est
                                for u, i in zip(rows["user_id"].tolist(), rows["item_id"].tolist())])  # fmt: skip
        scores[split] = errors(data, data.splits[split].numpy(), predictions, slices if split == "test" else None)
    return {"params": params, **scores, "fit_seconds": round(fit_seconds, 1),
            "grid_seconds": round(sum(g["fit_seconds"] for g in grid), 1), "grid": grid}  # fmt: skip


PEERS: dict[str, Callable[[Prepared, int], dict]] = {
    "myfm": lambda prepared, seed: run_myfm(prepared, seed, implicit=True),
    "myfm_noimplicit": lambda prepared, seed: run_myfm(prepared, seed, implicit=False),
    "svdpp": run_svdpp,
}
#: The package each peer fits with (its version goes into every line).
PEER_PACKAGES = {"myfm": "myfm", "myfm_noimplicit": "myfm", "svdpp": "scikit-surprise"}


# ---- the run and its summary ----------------------------------------------------------------


def machine() -> str:
    """CPU model and core count."""
    model = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    return f"{model}, {os.cpu_count()} cores"


def done(path: str) -> set[tuple[str, str, int]]:
    """``(peer, split, seed)`` of the lines already in ``path``."""
    if not os.path.exists(path):
        return set()
    with open(path) as lines:
        return {(r["peer"], r["split"], r["seed"]) for r in map(json.loads, filter(str.strip, lines))}


def mean_std(values: list[float | None]) -> str:
    """``mean ± sample std`` over the non-None values (``-`` for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.4f}{std}"


def summary(path: str) -> str:
    """Markdown tables of every (peer, split) in ``path``: mean ± sample std over its seeds."""
    with open(path) as lines:
        runs = [json.loads(line) for line in lines if line.strip()]
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["peer"], run["split"]), []).append(run)
    out = ["| peer | split | seeds | valid MSE | test MSE | test MAE | fit s | load (1 min) |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (peer, split), group in groups.items():
        fits = [r["fit_seconds"] for r in group]
        loads = [load for r in group for load in (r["load_before"][0], r["load_after"][0])]
        out.append(f"| {peer} | {split} | {' '.join(str(r['seed']) for r in group)} "
                   f"| {mean_std([r['valid']['mse'] for r in group])} | {mean_std([r['test']['mse'] for r in group])} "
                   f"| {mean_std([r['test']['mae'] for r in group])} | {statistics.fmean(fits):.0f} "
                   f"({min(fits):.0f}-{max(fits):.0f}) | {min(loads):.1f}-{max(loads):.1f} |")  # fmt: skip
    cells = [f"{entity}_{name}" for entity in SLICE_ENTITIES for name in SLICE_NAMES]
    for split in dict.fromkeys(s for _, s in groups):
        members = [(peer, g) for (peer, s), g in groups.items() if s == split]
        counts = members[0][1][0]["test"]
        out += ["", f"Test MSE per slice, {split} split (rows per slice, seed {members[0][1][0]['seed']}: "
                + ", ".join(f"{c.replace('_', ' ')} {counts[f'n_{c}']:,}" for c in cells) + ")", "",
                "| peer | " + " | ".join(c.replace("_", " ") for c in cells) + " |",
                "|---|" + "---|" * len(cells)]  # fmt: skip
        for peer, group in members:
            out.append(f"| {peer} | " + " | ".join(mean_std([r["test"][f"mse_{c}"] for r in group]) for c in cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", nargs="+", choices=list(PEERS), default=list(PEERS))
    parser.add_argument("--splits", nargs="+", choices=["random", "temporal"], default=["random", "temporal"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="the random split's seed and the peer's; the temporal split ignores it")  # fmt: skip
    parser.add_argument("--out", required=True, help="the JSON lines file to append to")
    args = parser.parse_args()

    finished = done(args.out)
    torch.set_num_threads(1)
    for split, seed in itertools.product(args.splits, args.seeds):
        todo = [peer for peer in args.peers if (peer, split, seed) not in finished]
        if not todo:
            continue
        prepared = prepare(DataConfig(seed=seed, split=split))
        sizes = {s: len(prepared.data.splits[s]) for s in ("train", "valid", "test")}
        for peer in todo:
            print(f"{peer}, {split} split, seed {seed} {sizes}", flush=True)
            load_before = os.getloadavg()
            result = PEERS[peer](prepared, seed)
            line = {"peer": peer, "split": split, "seed": seed, "sizes": sizes, **result,
                    "load_before": [round(x, 2) for x in load_before],
                    "load_after": [round(x, 2) for x in os.getloadavg()], "machine": machine(),
                    "version": metadata.version(PEER_PACKAGES[peer])}  # fmt: skip
            with open(args.out, "a") as out:
                out.write(json.dumps(line) + "\n")
            print(f"  valid MSE {result['valid']['mse']:.4f}, test MSE {result['test']['mse']:.4f}, "
                  f"fit {result['fit_seconds']:.0f} s", flush=True)  # fmt: skip
    print(summary(args.out))


if __name__ == "__main__":
    main()
