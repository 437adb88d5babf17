"""Training throughput with TorchRec's fused tables against Adagrad after backward, and the share
of the machine's float32 matmul rate each reaches (issue 21, item 3).

For each student (``--students name:spec``, seeded, on the embedded ML-100K), two copies with the
same weights step on the same batches (batch 1024, Adagrad tables + Adam dense, as the training
loop does, the batch built from the encoded tensors inside the timed step):

- ``after_backward``: the default path, Adagrad stepping the tables after backward (dense
  gradients on ML-100K's small tables: ``train.sparse_embedding_grads`` auto);
- ``fused``: ``train.fused_embedding_optimizer``: the tables swapped for TorchRec's
  ``FusedEmbeddingBagCollection``, whose FBGEMM kernels apply Adagrad inside backward.

Rounds alternate the two back to back and the ratio is taken within each pair (the load of a
shared machine changes between rounds, not within a pair). The matmul rate is a 2048^3 float32
``torch.mm`` on the same threads, measured before and after the rounds; a step's FLOPs are
counted by ``torch.utils.flop_counter`` (forward and backward of the tower, the interaction and
the head; lookups count none), so ``share = rows/s x FLOPs per row / matmul FLOP/s``. With
``--busy N``, N processes spinning in ``while True: pass`` share the cores (stopped at the end);
``--profile-steps`` writes the top operators of each path (``torch.profiler``, self CPU time).

Usage::

    .venv/bin/python benchmarks/bench_fused.py --rounds 5 --out /tmp/fused_idle.json
    .venv/bin/python benchmarks/bench_fused.py --rounds 5 --busy 2 --out /tmp/fused_busy.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from features.batches import DataConfig, prepare
from recdistill.models import build_model
from recdistill.training import TrainConfig, build_optimizer, seed_everything

from bench_throughput import time_torchrec  # noqa: E402  (the benchmarks folder is the script's path)


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The float32 matmul rate on torch's current threads: the best of ``repeats``."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def flops_per_row(model: nn.Module, data, rows: torch.Tensor) -> float:
    """Forward + backward FLOPs of one training step, per row (no optimizer step)."""
    batch = data.batch(rows)
    counter = FlopCounterMode(display=False)
    with counter:
        nn.functional.mse_loss(model(batch), batch.labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(rows)


def profile(model: nn.Module, optimizer, data, batches, top: int = 12) -> list[dict]:
    """The ``top`` operators of some training steps by self CPU time, with their share."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        time_torchrec(model, optimizer, data, batches)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_cpu_share": round(e.self_cpu_time_total / total, 4), "calls": e.count}
            for e in events[:top]]  # fmt: skip


def bench_student(name: str, features: str, args) -> dict:
    prepared = prepare(DataConfig(features=features))
    data = prepared.data
    cfg = TrainConfig(batch_size=args.batch_size)
    seed_everything(0)
    plain = build_model(name, prepared)
    fused = copy.deepcopy(plain)
    optimizers = {"after_backward": build_optimizer(plain, cfg), "fused": build_optimizer(fused, cfg, fuse_tables=True)}
    models = {"after_backward": plain, "fused": fused}
    rows = data.splits["train"]
    order = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
    batches = list(order.split(args.batch_size))[: args.steps]
    flops = flops_per_row(plain, data, batches[0])
    for variant in models:  # warm-up
        time_torchrec(models[variant], optimizers[variant], data, batches[:5])
    rates: dict[str, list[float]] = {variant: [] for variant in models}
    gflops = [matmul_gflops()]
    for _ in range(args.rounds):
        for variant in models:
            rates[variant].append(time_torchrec(models[variant], optimizers[variant], data, batches))
    gflops.append(matmul_gflops())
    machine = statistics.median(gflops)
    result = {
        "model": name, "features": features, "flops_per_row": flops, "matmul_gflops": gflops,
        "fused_over_after_backward_per_round": [round(f / a, 3) for f, a in zip(rates["fused"], rates["after_backward"])],
    }  # fmt: skip
    result["fused_over_after_backward"] = statistics.median(result["fused_over_after_backward_per_round"])
    for variant, values in rates.items():
        rows_s = statistics.median(values)
        result[variant] = {"rows_s": round(rows_s), "rounds": [round(v) for v in values],
                           "matmul_share": round(rows_s * flops / (machine * 1e9), 4)}  # fmt: skip
        if args.profile_steps:
            result[variant]["profile"] = profile(models[variant], optimizers[variant], data, batches[: args.profile_steps])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--students", nargs="+", default=["mlp_s:ml100k", "dlrm_s:ml100k_history"],
                        help="model:spec pairs")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=40, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--busy", type=int, default=0, help="spinning processes sharing the cores")
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        report = {"threads": torch.get_num_threads(), "busy": args.busy, "batch_size": args.batch_size,
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "loadavg_before": os.getloadavg(),
                  "torch": torch.__version__}  # fmt: skip
        report["students"] = [bench_student(*pair.split(":"), args) for pair in args.students]
        report["loadavg_after"] = os.getloadavg()
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
