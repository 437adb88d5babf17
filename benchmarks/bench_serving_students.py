"""Latency of the served students: the shipped DLRM-S (history spec, frozen implicit-feedback
bags) against the MLP-S it replaced (ml100k spec), both TorchScript files as exported, raw
values in, one intra-op thread, timed in interleaved rounds on the same test rows: wall
clock (what a caller waits) and the calling thread's CPU time (``thread_time``: what the model
costs, not counting waits for a core on a busy machine).

The weights do not change the cost, so each student is built and exported untrained (a
trained file may be given instead with ``--file NAME=PATH``).

Usage::

    .venv/bin/python benchmarks/bench_serving_students.py --out docs/results/serving_students.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from features.batches import prepare
from features.config import DataConfig
from recdistill.export import ParityRows, export_torchscript, serving_inputs
from recdistill.models import build_model, count_parameters

STUDENTS = {"mlp_s": "ml100k", "dlrm_s": "ml100k_history"}


def requests(prepared, batch: int, count: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    rows = prepared.data.splits["test"].numpy()
    joined = prepared.joined()
    return [serving_inputs(joined[rng.choice(rows, batch).tolist()], prepared.vocabs) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--iters", type=int, default=300, help="timed calls per student, size and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    served, prepared_of, params = {}, {}, {}
    folder = Path(tempfile.mkdtemp())
    for name, spec in STUDENTS.items():
        prepared = prepare(DataConfig(features=spec))
        torch.manual_seed(0)
        student = build_model(name, prepared).eval()
        params[name] = count_parameters(student)
        path = folder / f"{name}.pt"
        export_torchscript(student, prepared.vocabs, path, ParityRows.sample(prepared, 256))
        served[name] = torch.jit.load(str(path))
        prepared_of[name] = prepared
    result = {"threads": 1, "load_before": [round(x, 2) for x in os.getloadavg()], "params": params, "ms": {}}
    for batch in args.batch_sizes:
        reqs = {name: requests(prepared_of[name], batch, 32) for name in STUDENTS}
        times: dict[str, list[float]] = {name: [] for name in STUDENTS}
        cpu: dict[str, list[float]] = {name: [] for name in STUDENTS}
        for name in STUDENTS:  # warm-up
            for r in reqs[name][:8]:
                served[name](*r)
        for _ in range(args.rounds):
            for name in STUDENTS:
                for i in range(args.iters):
                    r = reqs[name][i % len(reqs[name])]
                    start, start_cpu = time.perf_counter(), time.thread_time()
                    served[name](*r)
                    times[name].append(time.perf_counter() - start)
                    cpu[name].append(time.thread_time() - start_cpu)
        for name, values in times.items():
            ms, cpu_ms = np.asarray(values) * 1e3, np.asarray(cpu[name]) * 1e3
            result["ms"][f"{name}_b{batch}"] = {"p50": round(float(np.percentile(ms, 50)), 4),
                                                "p99": round(float(np.percentile(ms, 99)), 4),
                                                "cpu_p50": round(float(np.percentile(cpu_ms, 50)), 4),
                                                "cpu_p99": round(float(np.percentile(cpu_ms, 99)), 4)}  # fmt: skip
        dlrm, mlp = result["ms"][f"dlrm_s_b{batch}"], result["ms"][f"mlp_s_b{batch}"]
        result["ms"][f"ratio_b{batch}"] = {"p50": round(dlrm["p50"] / mlp["p50"], 3),
                                           "cpu_p50": round(dlrm["cpu_p50"] / mlp["cpu_p50"], 3)}  # fmt: skip
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
