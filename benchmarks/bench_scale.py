"""Scale: 1M, 10M and 25M synthetic ratings through the streaming reader.

For each size, in a fresh process (so its peak memory is its own): write the synthetic set
(``recdistill data synth``; users = rows / 160, items = rows / 400, about ML-25M's shape) unless
it is there, then measure

- ``vocab_s``: vocabularies of the shipped ML-100K spec from streaming scans (ids and
  attributes come from the user and item tables) and ``vocab_counted_s``: the same with
  ``min_count: 2`` on item ids, which counts every interaction (one pass over the log);
- ``open_s``: opening the stream (shard footers, split sizes from row hashes);
- ``reader_rows_s``: a shuffled pass over the training split into 8192-row KJT batches alone;
- ``train_rows_s``: MLP-S training steps (batch 1024, Adagrad tables + Adam dense, as the
  loop) reading from the stream in the same thread, and ``trainer_rows_s`` the same steps on
  batches already read (the reader's cost left out);
- ``distill_rows_s``: LD steps from an MLP-L teacher (teacher forward + student step);
- ``peak_rss_reader_mb``: the process's peak resident memory after the reader's pass (the
  vocabularies, the user and item tables, a shuffle buffer; no model yet), and
  ``peak_rss_mb`` at the end (with MLP-S, its optimizer state, and the MLP-L teacher, whose
  tables grow with the users and items);
- ``matmul_gflops``: the machine's float32 matmul rate (2048^3, same threads), and the share of
  it MLP-S training reaches (its dense FLOPs per row: 6 x the tower's multiply-adds);
- a profile of 20 training steps on batches already read (torch.profiler, top operators by
  self CPU time).

Then ``--nproc 2`` runs ``recdistill train --nproc 2`` (TorchRec DMP over gloo, each rank
reading its own chunks) for ``--dmp-steps`` steps per size and records its examples/s.

Usage::

    .venv/bin/python benchmarks/bench_scale.py --sizes 1000000 10000000 25000000 \\
        --data /tmp/recdistill-scale --out docs/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(folder: Path, threads: int, steps: int) -> dict:
    """Everything but DMP, for the set in ``folder`` (run in a fresh process)."""
    import torch

    torch.set_num_threads(threads)
    from features.batches import prepare
    from features.config import DataConfig
    from features.spec import load_spec
    from features.stream import StreamingRatings
    from features.tables import scan_tables
    from features.vocab import FeatureVocabs
    from recdistill.models import build_model
    from recdistill.training import TrainConfig, build_optimizer, seed_everything

    out: dict = {"threads": threads, "loadavg_before": os.getloadavg()}
    config = DataConfig(interactions=str(folder / "ratings"), users=str(folder / "users.parquet"),
                        items=str(folder / "items.parquet"), features="ml100k", stream=True)  # fmt: skip
    tables = scan_tables(config.interactions, config.users, config.items)
    spec = load_spec("ml100k")
    start = time.perf_counter()
    vocabs = FeatureVocabs.build(spec, tables.interactions, tables.users, tables.items)
    out["vocab_s"] = time.perf_counter() - start
    counted = load_spec("ml100k")
    counted["item_id"].min_count = 2
    start = time.perf_counter()
    FeatureVocabs.build(counted, tables.interactions, tables.users, tables.items)
    out["vocab_counted_s"] = time.perf_counter() - start
    start = time.perf_counter()
    stream = StreamingRatings(tables, vocabs, config)
    out["open_s"] = time.perf_counter() - start
    out["rows"], out["train_rows"] = len(stream), len(stream.splits["train"])
    out["vocab_sizes"] = vocabs.sizes

    start, rows = time.perf_counter(), 0
    for batch in stream.batches("train", 8192, shuffle=True, seed=0):
        rows += len(batch)
    out["reader_rows_s"] = rows / (time.perf_counter() - start)
    out["reader_pass_s"] = time.perf_counter() - start
    # the peak so far: vocabularies, the side tables, one shuffle buffer (no model yet)
    out["peak_rss_reader_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    prepared = prepare(config, vocabs=vocabs)
    seed_everything(0)
    model = build_model("mlp_s", prepared)
    optimizer = build_optimizer(model, TrainConfig())
    out["sparse_gradients"] = all(b.sparse for b in model.sparse_arch.ebc.embedding_bags.values())
    out["mlp_s_parameters"] = sum(p.numel() for p in model.parameters())

    def step(batch) -> None:
        loss = torch.nn.functional.mse_loss(model(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def timed_steps(batches, count: int) -> float:
        it = iter(batches)
        for _ in range(20):  # warm-up
            step(next(it))
        start, rows = time.perf_counter(), 0
        for _ in range(count):
            batch = next(it)
            step(batch)
            rows += len(batch)
        return rows / (time.perf_counter() - start)

    out["train_rows_s"] = timed_steps(prepared.data.batches("train", 1024, shuffle=True, seed=1), steps)
    held = []
    for batch in prepared.data.batches("train", 1024, shuffle=True, seed=2):
        held.append(batch)
        if len(held) == steps + 20:
            break
    out["trainer_rows_s"] = timed_steps(held, steps)

    teacher = build_model("mlp_l", prepared).eval()
    student = build_model("mlp_s", prepared)
    opt = build_optimizer(student, TrainConfig())

    def distill_step(batch) -> None:
        with torch.no_grad():
            target = teacher(batch)
        prediction = student(batch)
        loss = torch.nn.functional.mse_loss(prediction, batch.labels) + \
            torch.nn.functional.mse_loss(prediction, target)  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()

    it = iter(held)
    for _ in range(10):
        distill_step(next(it))
    start, rows = time.perf_counter(), 0
    for batch in held[10 : 10 + steps // 2]:
        distill_step(batch)
        rows += len(batch)
    out["distill_rows_s"] = rows / (time.perf_counter() - start)

    # the machine's matmul rate, and MLP-S's dense FLOPs per training row
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    out["matmul_gflops"] = 10 * 2 * 2048**3 / (time.perf_counter() - start) / 1e9
    macs = sum(m.in_features * m.out_features for m in model.modules()
               if isinstance(m, torch.nn.Linear))  # fmt: skip
    out["mlp_s_dense_flops_per_row"] = 6 * macs  # forward 2, backward 4 per multiply-add
    out["train_share_of_matmul"] = out["trainer_rows_s"] * 6 * macs / (out["matmul_gflops"] * 1e9)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:  # training steps alone
        for batch in held[:20]:
            step(batch)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    out["profile"] = table
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["loadavg_after"] = os.getloadavg()
    return out


def dmp_rows_s(folder: Path, steps: int) -> dict:
    """``recdistill train --nproc 2`` on the set: examples/s of its one epoch of ``steps``."""
    sets = [f"data.interactions={folder / 'ratings'}", f"data.users={folder / 'users.parquet'}",
            f"data.items={folder / 'items.parquet'}", "data.features=ml100k", "data.stream=true",
            "train.progress=false", "train.eval_batch_size=65536"]  # fmt: skip
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "--model", "mlp_s", "--nproc", "2",
           "--epochs", "1", "--max-steps", str(steps), "--out", str(folder / "dmp")]  # fmt: skip
    for item in sets:
        cmd += ["--set", item]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    seconds = time.perf_counter() - start
    found = re.search(r"\(([\d,]+) examples/s\)", done.stdout)
    if done.returncode or not found:
        return {"error": (done.stdout + done.stderr)[-1500:]}
    return {"dmp2_rows_s": float(found.group(1).replace(",", "")), "dmp2_wall_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 25_000_000])
    parser.add_argument("--data", type=Path, default=Path("/tmp/recdistill-scale"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300, help="timed training steps")
    parser.add_argument("--dmp-steps", type=int, default=300, help="DMP steps (0: skip DMP)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child's folder
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.threads, args.steps)))
        return
    report = {"sizes": {}}
    for rows in args.sizes:
        folder = args.data / f"synth-{rows}"
        entry: dict = {}
        if not (folder / "meta.json").is_file():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "synth", "--rows",
                            str(rows), "--users", str(rows // 160), "--items", str(rows // 400),
                            "--out", str(folder)], check=True, cwd=ROOT)  # fmt: skip
            entry["synth_s"] = time.perf_counter() - start
        child = subprocess.run([sys.executable, __file__, "--measure", str(folder), "--threads",
                                str(args.threads), "--steps", str(args.steps)],
                               capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        if child.returncode:
            entry["error"] = child.stderr[-2000:]
        else:
            entry.update(json.loads(child.stdout.strip().splitlines()[-1]))
        if args.dmp_steps:
            entry.update(dmp_rows_s(folder, args.dmp_steps))
        report["sizes"][str(rows)] = entry
        summary = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in entry.items()
                   if k not in ("profile", "vocab_sizes", "error")}  # fmt: skip
        print(rows, json.dumps(summary), flush=True)
        if "error" in entry:
            print(entry["error"], file=sys.stderr)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
