"""Latency of the served student, every artifact against the eager TorchRec student, raw values in.

Variants, all on the same rows of the embedded ML-100K, in one process:

- ``eager_kjt``: the eager student on a precomputed ``KeyedJaggedTensor`` (encoding not
  counted): the issue's yardstick;
- ``eager_encode``: the same, counting the Python-side encoding from raw rows (polars
  vocabulary lookups + building the KJT); not for a history spec (rows outside training
  have no bags there);
- ``script``: the exported TorchScript file (frozen) on raw values (encoding inside);
- ``script_score``: the file's ``score`` on pre-encoded indices;
- ``pt2_raw``: the AOTInductor package on raw values (``Pt2Student``: the encoding table's
  Python reader, then the compiled program), what a Python caller of the pt2 artifact pays;
- ``pt2_score``: the package on pre-encoded indices;
- ``baseline``: with ``--baseline FILE``, an earlier TorchScript file of the same student (e.g.
  written by the commit before a change) on raw values, for a before / after in one run.

Variants are timed in interleaved rounds so that a load change on a shared machine hits all of
them alike; the load average is recorded with the figures. Each call is timed twice: wall clock
(``perf_counter``, what a caller waits) and the calling thread's CPU time (``thread_time``, what
the model costs; with one intra-op thread all the work runs on that thread, and time spent
waiting for a core on a busy machine is not counted). Each artifact's file size and load time
(median of 3 fresh loads) are reported too.

Usage::

    .venv/bin/python benchmarks/bench_serving.py --threads 1 --iters 2000 --out /tmp/serving.json
    .venv/bin/python benchmarks/bench_serving.py --model dlrm_s --features ml100k_history  # the default job's student
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from features.batches import DataConfig, RatingsData, prepare
from recdistill.export import ParityRows, Pt2Student, encoding_path, export_pt2, export_torchscript
from recdistill.models import build_model


def encode_eager(prepared, joined_rows) -> KeyedJaggedTensor:
    """Python-side encoding of raw rows into a KJT (what the eager student needs per request)."""
    data = RatingsData.encode(joined_rows, prepared.vocabs)
    return data.batch(torch.arange(len(data))).sparse


def percentiles(wall_s: list[float], cpu_s: list[float]) -> dict[str, float]:
    wall, cpu = np.asarray(wall_s) * 1e3, np.asarray(cpu_s) * 1e3
    return {"p50_ms": float(np.percentile(wall, 50)), "p99_ms": float(np.percentile(wall, 99)),
            "mean_ms": float(wall.mean()), "cpu_p50_ms": float(np.percentile(cpu, 50)),
            "cpu_p99_ms": float(np.percentile(cpu, 99)), "n": int(wall.size)}  # fmt: skip


def load_seconds(load, times: int = 3) -> float:
    """Median wall time of ``times`` fresh loads."""
    seconds = []
    for _ in range(times):
        start = time.perf_counter()
        load()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--iters", type=int, default=2000, help="timed calls per variant and batch size")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--requests", type=int, default=64, help="distinct request batches cycled through")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--model", default="mlp_s", help="the student (untrained: latency only)")
    parser.add_argument("--features", default="ml100k", help="the feature spec")
    parser.add_argument("--baseline", type=Path, help="an earlier TorchScript file of the same student to time beside")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prepared = prepare(DataConfig(features=args.features))
    student = build_model(args.model, prepared).eval()
    joined = prepared.movielens.joined()
    folder = Path(tempfile.mkdtemp())
    check = ParityRows.sample(prepared, 512)
    script_report = export_torchscript(student, prepared.vocabs, folder / "student.pt", check)
    pt2_report = export_pt2(student, prepared.vocabs, folder / "student.pt2", check)
    scripted = torch.jit.load(str(folder / "student.pt"))
    pt2 = Pt2Student.load(folder / "student.pt2")
    artifacts = {
        "script": {"size_bytes": script_report.size_bytes,
                   "load_s": load_seconds(lambda: torch.jit.load(str(folder / "student.pt")))},
        "pt2": {"size_bytes": pt2_report.size_bytes, "package_bytes": (folder / "student.pt2").stat().st_size,
                "encoding_bytes": encoding_path(folder / "student.pt2").stat().st_size,
                "compile_s": round(pt2_report.seconds, 1),
                "load_s": load_seconds(lambda: Pt2Student.load(folder / "student.pt2"))},
    }  # fmt: skip
    baseline = None
    if args.baseline:
        baseline = torch.jit.load(str(args.baseline))
        artifacts["baseline"] = {"path": str(args.baseline), "size_bytes": args.baseline.stat().st_size,
                                 "load_s": load_seconds(lambda: torch.jit.load(str(args.baseline)))}  # fmt: skip

    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    for batch_size in args.batch_sizes:
        requests = []
        for r in range(args.requests):
            rows = ParityRows.sample(prepared, batch_size, split="test", seed=r)
            raw = joined[rows.batch.rows.tolist()]
            requests.append((rows, raw, pt2.encoder(*rows.inputs.args)))  # the same indices as the file's encoder
        variants = {
            "eager_kjt": lambda q: student(q[0].batch),
            "eager_encode": lambda q: student.head(student.middle(student.sparse_arch(encode_eager(prepared, q[1])))),
            "script": lambda q: scripted(*q[0].inputs.args),
            "script_score": lambda q: scripted.score(*q[2]),
            "pt2_raw": lambda q: pt2(*q[0].inputs.args),
            "pt2_score": lambda q: pt2.score(*q[2]),
        }
        if baseline is not None:
            variants["baseline"] = lambda q: baseline(*q[0].inputs.args)
        if prepared.vocabs.histories:  # RatingsData.encode has no bags for rows outside training
            del variants["eager_encode"]
        with torch.no_grad():
            reference = student(requests[0][0].batch)
            for name, fn in variants.items():  # same numbers from every variant
                got = fn(requests[0])
                assert torch.allclose(got, reference, atol=1e-5), name
                for q in requests[:20]:  # warm-up (TorchScript profiles its first calls)
                    fn(q)
            wall: dict[str, list[float]] = {name: [] for name in variants}
            cpu: dict[str, list[float]] = {name: [] for name in variants}
            per_round = max(args.iters // args.rounds, 1)
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    for i in range(per_round):
                        q = requests[i % len(requests)]
                        start, start_cpu = time.perf_counter(), time.thread_time()
                        fn(q)
                        wall[name].append(time.perf_counter() - start)
                        cpu[name].append(time.thread_time() - start_cpu)
        results[str(batch_size)] = {name: percentiles(wall[name], cpu[name]) for name in variants}

    report = {
        "threads": args.threads,
        "model": args.model,
        "features": args.features,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "artifacts": artifacts,
        "results": results,
    }
    print(f"{args.model} on {args.features}, threads={args.threads} torch={torch.__version__} "
          f"load before {load_before} after {report['loadavg_after']}")  # fmt: skip
    print(json.dumps(artifacts))
    print("| batch | variant | wall p50 ms | wall p99 ms | CPU p50 ms | CPU p99 ms |")
    print("|---|---|---|---|---|---|")
    for batch_size, rows in results.items():
        for name, r in rows.items():
            print(f"| {batch_size} | {name} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                  f"{r['cpu_p50_ms']:.3f} | {r['cpu_p99_ms']:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
