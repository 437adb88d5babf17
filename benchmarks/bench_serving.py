"""Latency of the served student: TorchScript (raw values in) against the eager TorchRec student.

Variants, all on the same rows of the embedded ML-100K, in one process:

- ``eager_kjt``: the eager ``MLPRecommender`` on a precomputed ``KeyedJaggedTensor`` (encoding
  not counted);
- ``eager_encode``: the same, counting the Python-side encoding from raw rows (polars
  vocabulary lookups + building the KJT), i.e. what serving the eager model would take;
- ``script``: the scripted serving module on raw values (encoding inside, counted);
- ``script_frozen``: the same after ``torch.jit.freeze`` (what ``export_torchscript`` writes
  by default);
- ``script_ofi``: the same after ``torch.jit.optimize_for_inference``;
- ``script_score``: the scripted module's ``score`` on pre-encoded indices (the like-for-like
  counterpart of ``eager_kjt``);
- ``script_py_encode``: the frozen file's ``score``, raw values encoded in Python by the same
  ``FeatureEncoder`` run eagerly (dictionary lookups and ``searchsorted`` outside the
  TorchScript interpreter);
- ``pt2_raw``: the AOTInductor package on raw values (``recdistill.export_pt2.Pt2Student``:
  the eager encoder, then the compiled program), what a Python caller of the pt2 artifact pays;
- ``pt2_score``: the package on pre-encoded indices (padded as ``Pt2Student`` pads).

Variants are timed in interleaved rounds so that a load change on a shared machine hits all of
them alike; the load average is recorded with the figures. Each call is timed twice: wall clock
(``perf_counter``, what a caller waits) and the calling thread's CPU time (``thread_time``, what
the model costs; with one intra-op thread all the work runs on that thread, and time spent
waiting for a core on a busy machine is not counted).

Usage::

    .venv/bin/python benchmarks/bench_serving.py --threads 1 --iters 2000 --out docs/results/serving.json
    .venv/bin/python benchmarks/bench_serving.py --model dlrm_s --features ml100k_history  # the default job's student
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import tempfile

from features.batches import DataConfig, RatingsData, prepare
from recdistill.export import ParityRows, ServingStudent
from recdistill.export_pt2 import Pt2Student, compile_pt2, pad_rows
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--iters", type=int, default=2000, help="timed calls per variant and batch size")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 512])
    parser.add_argument("--requests", type=int, default=64, help="distinct request batches cycled through")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--model", default="mlp_s", help="the student (untrained: latency only)")
    parser.add_argument("--features", default="ml100k", help="the feature spec")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prepared = prepare(DataConfig(features=args.features))
    student = build_model(args.model, prepared).eval()
    joined = prepared.movielens.joined()
    served = ServingStudent.from_student(student, prepared.vocabs)
    encoder = served.encoder  # run eagerly by the Python-encoded variants
    with torch.no_grad():
        example = encoder(*ParityRows.sample(prepared, 64).inputs.args)
    package_file = Path(tempfile.mkdtemp()) / "student.pt2"
    pt2 = Pt2Student(torch._inductor.aoti_load_package(str(compile_pt2(served, example, package_file))),
                     prepared.vocabs)  # fmt: skip
    scripted = torch.jit.script(served)
    frozen = torch.jit.freeze(torch.jit.script(served), preserved_attrs=["score"])
    ofi = torch.jit.optimize_for_inference(torch.jit.script(served), other_methods=["score"])

    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    for batch_size in args.batch_sizes:
        requests = []
        for r in range(args.requests):
            rows = ParityRows.sample(prepared, batch_size, split="test", seed=r)
            raw = joined[rows.batch.rows.tolist()]
            enc = scripted.encoder(*rows.inputs.args)
            requests.append((rows, raw, enc, pad_rows(*enc)))
        variants = {
            "eager_kjt": lambda q: student(q[0].batch),
            "eager_encode": lambda q: student.head(student.middle(student.sparse_arch(encode_eager(prepared, q[1])))),
            "script": lambda q: scripted(*q[0].inputs.args),
            "script_frozen": lambda q: frozen(*q[0].inputs.args),
            "script_ofi": lambda q: ofi(*q[0].inputs.args),
            "script_score": lambda q: scripted.score(*q[2]),
            "script_py_encode": lambda q: frozen.score(*encoder(*q[0].inputs.args)),
            "pt2_raw": lambda q: pt2(*q[0].inputs.args),
            "pt2_score": lambda q: pt2.package(*q[3]),
        }
        if prepared.vocabs.histories:  # RatingsData.encode has no bags for rows outside training
            del variants["eager_encode"]
        with torch.no_grad():
            reference = student(requests[0][0].batch)
            for name, fn in variants.items():  # same numbers from every variant
                got = fn(requests[0])[:batch_size]
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
        "results": results,
    }
    print(f"threads={args.threads} torch={torch.__version__} load before {load_before} after {report['loadavg_after']}")
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
