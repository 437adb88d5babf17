"""SVD++ (scikit-surprise) on the library's own data and split: a classic matrix factorization peer.

The ratings and the train / valid / test rows are exactly those of ``features.batches.prepare``
(embedded ML-100K, random 80/10/10 split, seed 0 by default; ``--split temporal`` for the
per-user temporal split). SVD++ sees the TRAIN rows only (raw user and item ids, ratings).
Hyper-parameters (a small grid over ``n_factors``, ``lr_all``, ``reg_all``, ``n_epochs``) are
chosen on the VALID split with the first seed; then SVD++ is refitted on train with the chosen
values for every seed (surprise's ``random_state``: the factor initialisation; the split stays
the same) and scored on valid and test. Predictions are clipped to 1..5, as surprise does.
Test MSE is also reported per slice of items and of users, by their number of training ratings:
cold (< 5), medium (5-20), warm (> 20), as ``recdistill.training.evaluate`` slices them.

scikit-surprise is NOT a dependency of the library or its tests. Install it by hand into the
venv (it compiles; it needs no other package than those installed, and must not change numpy
or torch)::

    .venv/bin/pip install scikit-surprise

Usage::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_svdpp.py \\
        --seeds 0 1 2 --out /tmp/svdpp.jsonl

Writes one JSON line per grid point (``"kind": "grid"``), per seed (``"kind": "seed"``) and a
last one with the mean and sample standard deviation over the seeds (``"kind": "summary"``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from features.batches import Prepared, prepare  # noqa: E402
from features.config import DataConfig  # noqa: E402

#: Ratings are clipped to this scale (MovieLens stars).
RATING_SCALE = (1.0, 5.0)
#: ``(cold, warm)``: fewer than ``cold`` training ratings is cold, more than ``warm`` is warm.
SLICE_EDGES = (5, 20)
SLICE_NAMES = ("cold", "medium", "warm")


def surprise_trainset(prepared: Prepared):
    """The TRAIN rows as a surprise ``Trainset`` (raw MovieLens ids)."""
    from surprise import Dataset, Reader

    train = prepared.movielens.ratings[prepared.data.splits["train"].numpy()]
    frame = train.select("user_id", "item_id", "rating").to_pandas()
    return Dataset.load_from_df(frame, Reader(rating_scale=RATING_SCALE)).build_full_trainset()


def rows_of(prepared: Prepared, split: str) -> dict[str, np.ndarray]:
    """User ids, item ids and ratings of ``split`` (rows of ``prepared.movielens.ratings``)."""
    frame = prepared.movielens.ratings[prepared.data.splits[split].numpy()]
    return {c: frame[c].to_numpy() for c in ("user_id", "item_id", "rating")}


def slice_of(counts: dict[int, int], ids: np.ndarray) -> np.ndarray:
    """0 cold, 1 medium, 2 warm for each id, by its number of training ratings."""
    cold, warm = SLICE_EDGES
    n = np.array([counts.get(int(i), 0) for i in ids])
    return (n >= cold).astype(int) + (n > warm).astype(int)


def score(algo, rows: dict[str, np.ndarray], train_counts: dict[str, dict[int, int]] | None = None) -> dict:
    """MSE (and RMSE, MAE) of ``algo`` on ``rows``, clipped to the rating scale; with
    ``train_counts`` also the MSE and row count per cold / medium / warm item and user (the MSE
    of a slice without rows is ``None``)."""
    est = np.array([algo.predict(u, i, clip=True).est
                    for u, i in zip(rows["user_id"].tolist(), rows["item_id"].tolist())])  # fmt: skip
    err = est - rows["rating"]
    mse = float(np.mean(err**2))
    out = {"mse": mse, "rmse": math.sqrt(mse), "mae": float(np.mean(np.abs(err)))}
    if train_counts is None:
        return out
    for entity, column in (("item", "item_id"), ("user", "user_id")):
        slices = slice_of(train_counts[entity], rows[column])
        for index, name in enumerate(SLICE_NAMES):
            mask = slices == index
            out[f"mse_{entity}_{name}"] = float(np.mean(err[mask] ** 2)) if mask.any() else None
            out[f"n_{entity}_{name}"] = int(mask.sum())
    return out


def fit(trainset, params: dict, seed: int):
    from surprise import SVDpp

    return SVDpp(random_state=seed, cache_ratings=True, **params).fit(trainset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=["random", "temporal"], default="random")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the random split")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="SVD++ initialisation seeds; the grid is searched with the first")  # fmt: skip
    parser.add_argument("--n-factors", nargs="+", type=int, default=[10, 30])
    parser.add_argument("--lr-all", nargs="+", type=float, default=[0.005, 0.01])
    parser.add_argument("--reg-all", nargs="+", type=float, default=[0.02, 0.05, 0.1])
    parser.add_argument("--n-epochs", nargs="+", type=int, default=[20, 40])
    parser.add_argument("--out", required=True, help="the JSON lines file to write")
    args = parser.parse_args()

    prepared = prepare(DataConfig(split=args.split, seed=args.data_seed))
    trainset = surprise_trainset(prepared)
    valid, test = rows_of(prepared, "valid"), rows_of(prepared, "test")
    train = rows_of(prepared, "train")
    train_counts = {
        "item": dict(zip(*np.unique(train["item_id"], return_counts=True))),
        "user": dict(zip(*np.unique(train["user_id"], return_counts=True))),
    }
    setting = {"split": args.split, "data_seed": args.data_seed,
               "sizes": {s: len(prepared.data.splits[s]) for s in ("train", "valid", "test")}}  # fmt: skip
    print(f"{args.split} split {setting['sizes']}")

    with open(args.out, "w") as out:

        def write(line: dict) -> None:
            out.write(json.dumps({**setting, **line}) + "\n")
            out.flush()

        grid = [dict(zip(("n_factors", "lr_all", "reg_all", "n_epochs"), values))
                for values in itertools.product(args.n_factors, args.lr_all, args.reg_all, args.n_epochs)]  # fmt: skip
        best, best_mse = None, math.inf
        for params in grid:  # chosen on VALID only
            start = time.perf_counter()
            valid_mse = score(fit(trainset, params, args.seeds[0]), valid)["mse"]
            seconds = time.perf_counter() - start
            write({"kind": "grid", "seed": args.seeds[0], "params": params, "valid_mse": valid_mse,
                   "seconds": round(seconds, 1)})  # fmt: skip
            print(f"grid {params}: valid MSE {valid_mse:.4f} ({seconds:.0f} s)")
            if valid_mse < best_mse:
                best, best_mse = params, valid_mse
        print(f"chosen on valid: {best}")

        runs = []
        for seed in args.seeds:
            start = time.perf_counter()
            algo = fit(trainset, best, seed)
            run = {"seed": seed, "params": best, "valid": score(algo, valid),
                   "test": score(algo, test, train_counts), "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
            runs.append(run)
            write({"kind": "seed", **run})
            print(f"seed {seed}: valid MSE {run['valid']['mse']:.4f}, test MSE {run['test']['mse']:.4f}")

        keys = [k for k in runs[0]["test"] if k.startswith("mse")]
        summary = {"kind": "summary", "params": best, "seeds": args.seeds}
        for split in ("valid", "test"):
            for key in (k for k in runs[0][split] if not k.startswith("n_")):
                values = [r[split][key] for r in runs if r[split][key] is not None]
                summary[f"{split}_{key}"] = {
                    "mean": statistics.fmean(values) if values else None,
                    "std": statistics.stdev(values) if len(values) > 1 else None,
                }
        summary["test_slice_rows"] = {k: v for k, v in runs[0]["test"].items() if k.startswith("n_")}
        write(summary)
    rows = summary["test_slice_rows"]
    for key in ("valid_mse", *(f"test_{k}" for k in keys)):
        stat, count = summary[key], rows.get(key.replace("test_mse_", "n_"), "")
        if stat["mean"] is None:
            print(f"{key:>22}: no rows")
        else:
            std = "" if stat["std"] is None else f" +- {stat['std']:.4f}"
            print(f"{key:>22}: {stat['mean']:.4f}{std}  {count}")


if __name__ == "__main__":
    main()
