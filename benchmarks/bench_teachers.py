"""Accuracy of the recommender teachers and the student, next to the reference predictors.

Two modes:

- ``--sweep``: choose hyper-parameters on the VALIDATION split (seed 0 only): the learning
  rates shared by all models, then each model's dropout at the best learning rates.
- default: train every model with the given settings under several seeds and report valid and
  test MSE / RMSE (mean and sample standard deviation) beside global mean and user+item bias.

Usage::

    .venv/bin/python benchmarks/bench_teachers.py --sweep --out /tmp/sweep.json
    .venv/bin/python benchmarks/bench_teachers.py --seeds 0 1 2 --out /tmp/teachers.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from features.batches import prepare  # noqa: E402
from recdistill.baselines import reference_metrics  # noqa: E402
from recdistill.models import build_model, count_parameters  # noqa: E402
from recdistill.training import TrainConfig, seed_everything, train_supervised  # noqa: E402

log = logging.getLogger("bench_teachers")


def run(prepared, name: str, train: TrainConfig, overrides: dict) -> dict:
    seed_everything(train.seed)
    model = build_model(name, prepared, overrides)
    start = time.perf_counter()
    result = train_supervised(model, prepared, train)
    return {
        "model": name,
        "params": count_parameters(model),
        "overrides": overrides,
        "train": {k: v for k, v in dataclasses.asdict(train).items() if k not in ("progress",)},
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "valid": result.valid,
        "test": result.test,
        "seconds": time.perf_counter() - start,
    }


def sweep(prepared, models: list[str], base: TrainConfig) -> dict:
    """Shared learning rates first (dropout 0), then each model's dropout; all on valid MSE."""
    runs = []
    lr_grid = list(itertools.product([1e-3, 3e-3], [0.02, 0.05, 0.1]))
    for dense_lr, emb_lr in lr_grid:
        cfg = dataclasses.replace(base, dense_lr=dense_lr, embedding_lr=emb_lr)
        for name in models:
            runs.append(run(prepared, name, cfg, {"dropout": 0.0}))
            log.warning("%s", json.dumps({k: runs[-1][k] for k in ("model", "best_epoch")}
                                         | {"dense_lr": dense_lr, "emb_lr": emb_lr, "valid_mse": runs[-1]["valid"]["mse"]}))  # fmt: skip

    def total_valid(dense_lr, emb_lr):  # sum over models of the valid MSE at these rates
        return sum(r["valid"]["mse"] for r in runs
                   if r["train"]["dense_lr"] == dense_lr and r["train"]["embedding_lr"] == emb_lr)  # fmt: skip

    dense_lr, emb_lr = min(lr_grid, key=lambda lrs: total_valid(*lrs))
    best_cfg = dataclasses.replace(base, dense_lr=dense_lr, embedding_lr=emb_lr)
    dropouts = {}
    for name in models:
        scores = {0.0: next(r["valid"]["mse"] for r in runs if r["model"] == name
                            and r["train"]["dense_lr"] == dense_lr and r["train"]["embedding_lr"] == emb_lr)}  # fmt: skip
        for dropout in (0.1, 0.3):
            runs.append(run(prepared, name, best_cfg, {"dropout": dropout}))
            scores[dropout] = runs[-1]["valid"]["mse"]
            log.warning("%s dropout %s valid_mse %.4f", name, dropout, scores[dropout])
        dropouts[name] = min(scores, key=scores.get)
    return {"chosen": {"dense_lr": dense_lr, "embedding_lr": emb_lr, "dropout": dropouts}, "runs": runs}


def seeds_table(prepared, models: list[str], base: TrainConfig, seeds: list[int], dropouts: dict,
                out_path: str | None = None) -> dict:
    out = {"references": reference_metrics(prepared.data), "models": {}}
    for name in models:
        runs = []
        for s in seeds:
            runs.append(run(prepared, name, dataclasses.replace(base, seed=s), {"dropout": dropouts.get(name, 0.0)}))
            log.warning("%s", json.dumps({k: runs[-1][k] for k in ("model", "best_epoch", "epochs_run", "seconds")}
                                         | {"seed": s, "valid": runs[-1]["valid"], "test": runs[-1]["test"]}))  # fmt: skip
        summary = {"params": runs[0]["params"], "runs": runs}
        for split, metric in itertools.product(("valid", "test"), ("mse", "rmse", "mae")):
            values = [r[split][metric] for r in runs]
            summary[f"{split}_{metric}_mean"] = statistics.mean(values)
            summary[f"{split}_{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out["models"][name] = summary
        if out_path:  # after every model, so a long run leaves what it finished
            with open(out_path, "w") as f:
                json.dump(out, f, indent=2)
        log.warning("%s test rmse %.4f +- %.4f", name, summary["test_rmse_mean"], summary["test_rmse_std"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp_s", "mlp_m", "mlp_l"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sweep", action="store_true", help="choose hyper-parameters on valid")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--dense-lr", type=float, default=TrainConfig.dense_lr)
    parser.add_argument("--embedding-lr", type=float, default=TrainConfig.embedding_lr)
    parser.add_argument("--dropout", nargs="*", default=[], metavar="MODEL=P",
                        help="per-model dropout, e.g. mlp_l=0.3")  # fmt: skip
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args()

    prepared = prepare()
    base = TrainConfig(epochs=args.epochs, dense_lr=args.dense_lr, embedding_lr=args.embedding_lr,
                       progress=False)  # fmt: skip
    if args.sweep:
        report = sweep(prepared, args.models, base)
    else:
        dropouts = {k: float(v) for k, v in (item.split("=") for item in args.dropout)}
        report = seeds_table(prepared, args.models, base, args.seeds, dropouts, args.out)
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(json.dumps(report.get("chosen") or {k: {m: v for m, v in s.items() if m != "runs"}
                                              for k, s in report["models"].items()}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
