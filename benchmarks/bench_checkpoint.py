"""What checkpointing costs an epoch: MLP-S on the full ML-100K training split, with and without.

"With" is a run with a checkpoint directory and ``train.checkpoint_every_steps`` (its default):
``best.pt`` / ``last.pt`` at each epoch end and ``resume.pt`` (weights, optimizer states, the
best weights, random states) every so many steps and at each epoch end, each written
atomically and flushed to the disk. "Without" has no directory. Both train from the same seed
(identical steps), so the difference is the writing. Runs alternate with / without in one
process, the first of each pair swapped every round; the ratio is taken within each pair and
its median reported, beside the time spent inside the writes themselves (a direct measure
that the load average moves less) and the load average, since on a shared machine the load
changes from round to round.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_checkpoint.py [--epochs 3] [--rounds 3] \
        [--checkpoint-every-steps N]   # default: TrainConfig's
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from features.batches import prepare  # noqa: E402
from recdistill.models import build_model  # noqa: E402
from recdistill.training import TrainConfig, seed_everything, train_supervised  # noqa: E402
from recdistill.training import checkpoints as checkpoints_module  # noqa: E402
from recdistill.training import loop as loop_module  # noqa: E402


class TimedWrites:
    """Wraps ``write_atomically`` where the loop and the checkpoints call it; sums its seconds."""

    def __init__(self) -> None:
        self.original = checkpoints_module.write_atomically
        self.seconds: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def __call__(self, payload, path):
        start = time.perf_counter()
        written = self.original(payload, path)
        name = Path(path).name
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        self.count[name] = self.count.get(name, 0) + 1
        self.bytes[name] = Path(path).stat().st_size
        return written

    def install(self) -> None:
        loop_module.write_atomically = self
        checkpoints_module.write_atomically = self


def one_run(prepared, cfg: TrainConfig) -> float:
    """Seconds of a whole ``train_supervised`` run (training, validation, checkpoints)."""
    seed_everything(cfg.seed)
    model = build_model("mlp_s", prepared)
    start = time.perf_counter()
    train_supervised(model, prepared, cfg)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkpoint-every-steps", type=int, default=TrainConfig.checkpoint_every_steps)
    args = parser.parse_args()

    prepared = prepare()
    base = TrainConfig(epochs=args.epochs, patience=args.epochs, progress=False,
                       checkpoint_every_steps=args.checkpoint_every_steps)  # fmt: skip
    writes = TimedWrites()
    writes.install()
    loads = [os.getloadavg()[0]]
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        with_dir = TrainConfig(**{**base.__dict__, "checkpoint_dir": tmp})
        for round_ in range(args.rounds):
            order = [("without", base), ("with", with_dir)]
            if round_ % 2:
                order.reverse()
            seconds = {name: one_run(prepared, cfg) / args.epochs for name, cfg in order}
            pairs.append(seconds)
            loads.append(os.getloadavg()[0])
            print(f"round {round_ + 1}: {seconds['without']:.2f} s/epoch without, "
                  f"{seconds['with']:.2f} s/epoch with checkpoints "
                  f"(+{seconds['with'] / seconds['without'] - 1:.1%}), load {loads[-1]:.2f}", flush=True)

    epochs_with = args.rounds * args.epochs
    write_s = sum(writes.seconds.values()) / epochs_with
    without = statistics.median(p["without"] for p in pairs)
    summary = {
        "steps_per_epoch": prepared.data.num_batches("train", base.batch_size),
        "checkpoint_every_steps": base.checkpoint_every_steps,
        "threads": torch.get_num_threads(),
        "epoch_s_without": round(without, 3),
        "epoch_s_with": round(statistics.median(p["with"] for p in pairs), 3),
        "overhead_paired_median": round(statistics.median(p["with"] / p["without"] - 1 for p in pairs), 4),
        "write_s_per_epoch": round(write_s, 4),
        "overhead_writes": round(write_s / without, 4),
        "writes_per_epoch": {k: round(v / epochs_with, 2) for k, v in writes.count.items()},
        "write_ms_each": {k: round(1000 * writes.seconds[k] / writes.count[k], 1) for k in writes.count},
        "file_mb": {k: round(v / 2**20, 1) for k, v in writes.bytes.items()},
        "load_avg_1min": [round(x, 2) for x in loads],
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
