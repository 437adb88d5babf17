"""Single models on a click log with a known ceiling: how much of the log-loss gap between the
constant click rate and the generating model each closes.

Generates (or reuses) the ``recdistill data synth-clicks`` log, reads it through its own
``spec.yaml`` with ``features.batches.prepare``, trains each model of ``--models`` with
``recdistill.training.train_supervised`` (early stopping on valid log loss) and prints one JSON
line per model, after a first line with the ceiling of the test split (the generating model's
``true_p``, and the constant training click rate)::

    {"model": "ceiling", "split": "test", "log_loss": ..., "auc": ..., "constant_log_loss": ...}
    {"model": "mlp_s", "test_log_loss": ..., "test_auc": ..., "gap_closed": ..., "fit_seconds": ...}

The project's goal is a distilled student closing at least 95% of that gap.

Usage::

    nice -n 5 .venv/bin/python benchmarks/bench_clicks.py --out /tmp/clicks.jsonl
    .venv/bin/python benchmarks/bench_clicks.py --models mlp_s dlrm_s --set mlp_s.dropout=0.1
    .venv/bin/python benchmarks/bench_clicks.py --models dlrm_s --embedding-weight-decay 3e-4 --swa-start-epoch 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from features.batches import prepare  # noqa: E402
from features.click_synth import ClickSynthSpec, ceiling, gap_closed, write_click_log  # noqa: E402
from features.config import DataConfig  # noqa: E402
from recdistill.models import build_model, count_parameters  # noqa: E402
from recdistill.training import TrainConfig, seed_everything, train_supervised  # noqa: E402


def click_log(folder: Path, spec: ClickSynthSpec) -> Path:
    """``folder`` holding the log of ``spec``: reused when its meta.json records the same
    arguments, written otherwise."""
    meta = folder / "meta.json"
    if not (meta.is_file() and json.loads(meta.read_text())["spec"] == dataclasses.asdict(spec)):
        write_click_log(folder, spec, force=True)
    return folder


def data_config(folder: Path) -> DataConfig:
    """The log as a user points a job at it: its tables and its spec (which brings the label)."""
    return DataConfig(interactions=str(folder / "impressions"), users=str(folder / "users.parquet"),
                      items=str(folder / "ads.parquet"), features=str(folder / "spec.yaml"))  # fmt: skip


def split_ceiling(prepared, split: str) -> dict:
    """:func:`ceiling` of ``split``'s rows, the constant being the training click rate."""
    rows = prepared.data.splits[split].numpy()
    return ceiling(prepared.movielens.ratings[rows], rate=prepared.data.label_mean())


def model_overrides(items: list[str], models: list[str]) -> dict[str, dict]:
    """``["mlp_s.dropout=0.1", ...]`` as ``{"mlp_s": {"dropout": 0.1}}`` (values read as YAML).

    Raises:
        ValueError: an item not of the form ``MODEL.KEY=VALUE``, or a model not in ``models``.
    """
    overrides: dict[str, dict] = {name: {} for name in models}
    for item in items:
        path, sep, value = item.partition("=")
        name, dot, key = path.partition(".")
        if not (sep and dot and key):
            raise ValueError(f"--set {item!r}: expected MODEL.KEY=VALUE, e.g. mlp_s.dropout=0.1")
        if name not in overrides:
            raise ValueError(f"--set {item!r}: {name!r} is not one of --models ({', '.join(models)})")
        overrides[name][key] = yaml.safe_load(value)
    return overrides


def run(prepared, name: str, overrides: dict, train: TrainConfig, best: dict) -> dict:
    seed_everything(train.seed)
    model = build_model(name, prepared, overrides)
    start = time.perf_counter()
    result = train_supervised(model, prepared, train)
    seconds = time.perf_counter() - start
    return {
        "model": name,
        "overrides": overrides,
        "params": count_parameters(model),
        "test_log_loss": result.test["log_loss"],
        "test_auc": result.test["auc"],
        "gap_closed": gap_closed(result.test["log_loss"], best),
        "valid_log_loss": result.valid["log_loss"],
        "valid_auc": result.valid["auc"],
        "test_mean_prediction": result.test["mean_prediction"],
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "fit_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/tmp/recdistill_clicks", help="folder of the generated log")
    parser.add_argument("--rows", type=int, default=ClickSynthSpec.rows)
    parser.add_argument("--users", type=int, default=ClickSynthSpec.users)
    parser.add_argument("--ads", type=int, default=ClickSynthSpec.ads)
    parser.add_argument("--data-seed", type=int, default=0, help="the generator's seed")
    parser.add_argument("--models", nargs="+", default=["mlp_s", "mlp_m", "mlp_l"],
                        help="registered model names (any that predict clicks)")  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="MODEL.KEY=VALUE",
                        help="a model option, as YAML (mlp_s.dropout=0.1); repeatable")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--patience", type=int, default=TrainConfig.patience)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--seed", type=int, default=0, help="the training seed")
    parser.add_argument("--embedding-weight-decay", type=float, default=0.0, help="train.embedding_weight_decay")
    parser.add_argument("--swa-start-epoch", type=int, help="train.swa_start_epoch (weight averaging)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--out", help="also write the JSON lines here")
    args = parser.parse_args()

    overrides = model_overrides(args.overrides, args.models)
    spec = ClickSynthSpec(rows=args.rows, users=args.users, ads=args.ads, seed=args.data_seed)
    prepared = prepare(data_config(click_log(Path(args.data), spec)))
    train = TrainConfig(epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
                        seed=args.seed, threads=args.threads, progress=False,
                        embedding_weight_decay=args.embedding_weight_decay,
                        swa_start_epoch=args.swa_start_epoch)  # fmt: skip
    best = split_ceiling(prepared, "test")
    lines = [{"model": "ceiling", "split": "test", **best, "data": dataclasses.asdict(spec)}]
    print(json.dumps(lines[0]), flush=True)
    for name in args.models:
        lines.append(run(prepared, name, overrides[name], train, best))
        print(json.dumps(lines[-1]), flush=True)
        if args.out:  # after every model, so a long run leaves what it finished
            Path(args.out).write_text("".join(json.dumps(line) + "\n" for line in lines))


if __name__ == "__main__":
    main()
