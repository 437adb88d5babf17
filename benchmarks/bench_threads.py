"""MLP-S training rows/s under three thread settings, on an idle machine and a busy one.

Each setting trains MLP-S on real ML-100K rows (batch 1024, 40 steps after 4 warm-up steps) in a
fresh process, since OpenMP reads its wait policy when torch loads:

- ``spin``: torch's default threads (one per core), OpenMP's default wait (threads spin);
- ``passive``: the same threads, ``OMP_WAIT_POLICY=PASSIVE`` (what ``import recdistill`` sets);
- ``one``: ``OMP_NUM_THREADS=1``.

``--busy K`` runs K other processes beside each measurement, each a one-thread float32 matmul
loop that never stops (a stand-in for the other jobs of a shared machine). Settings alternate in
rounds; the median rows/s of each is reported with the load average.

Usage::

    .venv/bin/python benchmarks/bench_threads.py [--busy 0] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {
    "spin": {"OMP_WAIT_POLICY": "ACTIVE"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "one": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"},
}
# libgomp's default is neither ACTIVE nor PASSIVE: threads spin a while, then sleep. Measured as
# "default" too, since that is what torch does when nothing sets the policy.
SETTINGS["default"] = {}

TRAIN = r"""
import os, time, torch
from features.batches import prepare
from recdistill.models import build_model
from recdistill.training import TrainConfig, build_optimizer, seed_everything
p = prepare(); seed_everything(0); m = build_model("mlp_s", p); opt = build_optimizer(m, TrainConfig())
rows = p.data.splits["train"]
def step(r):
    b = p.data.batch(r); loss = torch.nn.functional.mse_loss(m(b), b.labels)
    opt.zero_grad(); loss.backward(); opt.step()
for r in rows[:4096].split(1024): step(r)
start, n = time.perf_counter(), 0
for r in rows[:40960].split(1024): step(r); n += len(r)
print(n / (time.perf_counter() - start), torch.get_num_threads())
"""

HOG = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a = (a @ a).tanh()\n"


def measure(setting: str) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(SETTINGS[setting])
    # "default" must not get recdistill's passive wait: import torch first, then recdistill
    code = ("import torch\n" if setting == "default" else "") + TRAIN
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    rows_per_s, threads = out.stdout.split()
    return float(rows_per_s), int(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=0, help="other processes, one busy thread each")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.busy)]
    try:
        time.sleep(2 if hogs else 0)
        results: dict[str, list[float]] = {s: [] for s in SETTINGS}
        threads: dict[str, int] = {}
        loads = []
        for _ in range(args.rounds):
            for setting in SETTINGS:
                rate, threads[setting] = measure(setting)
                results[setting].append(rate)
                loads.append(os.getloadavg()[0])
    finally:
        for hog in hogs:
            hog.kill()
    report = {"busy_processes": args.busy, "cores": os.cpu_count(), "median_load": statistics.median(loads),
              "rows_per_s": {s: round(statistics.median(v)) for s, v in results.items()},
              "threads": threads, "rounds": args.rounds}  # fmt: skip
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
