"""DiverseDistill against the student alone, the teachers and LD; gating savings; step cost.

Subcommands (every run appends one JSON line to ``--out``, so partial progress survives, and a
run already in ``--out`` with the same name, teachers, split and seed is skipped):

- ``teacher``: train a teacher (``--model``) once and save a checkpoint for the others.
- ``table``: for each seed, each ``--run NAME=JSON``: ``alone`` (the student trained without a
  teacher) or a ``distill:`` section as JSON (method, kd_weight, residual_questions, gating...),
  e.g. ``--run 'ld=\{"method": "ld", "kd_weight": 3\}'``. Choices (lambda, variants) are made
  afterwards on the VALIDATION split, by ``summarize``; the test split only reports.
- ``cost``: seconds of one distillation step against the sum of its parts, each timed alone.
- ``summarize``: markdown tables from the JSON lines: mean ± std over seeds of valid and test
  MSE, per-slice test MSE, gap closed against the best teacher, passes saved.

Usage::

    B=".venv/bin/python benchmarks/bench_distill.py"
    $B teacher --model mlp_l --out runs/bench_distill/mlp_l.pt
    $B table --teacher-ckpt runs/bench_distill/mlp_l.pt --seeds 0 1 2 --epochs 30 --patience 4 \\
        --run alone --run 'ld3={"method": "ld", "kd_weight": 3}' --out runs/bench_distill/t.jsonl
    $B summarize runs/bench_distill/t.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from features.batches import prepare  # noqa: E402
from features.config import DataConfig  # noqa: E402
from recdistill.distill import DistillConfig, build_method  # noqa: E402
from recdistill.distill.trainer import distill, module_optimizer  # noqa: E402
from recdistill.models import build_model, load_checkpoint  # noqa: E402
from recdistill.training import (  # noqa: E402
    TrainConfig,
    build_optimizer,
    read_checkpoint,
    save_checkpoint,
    seed_everything,
    train_supervised,
)


def load_committee(prepared, paths: list[str]):
    committee = []
    for path in paths:
        name = read_checkpoint(path)["model_name"]
        teacher = load_checkpoint(path, prepared)
        freeze = getattr(teacher, "freeze", None)  # language teachers switch their cache on
        committee.append((name, freeze() if callable(freeze) else teacher.requires_grad_(False)))
    return committee


def emit(out: str, record: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def load_avg() -> float:
    return os.getloadavg()[0]


def cmd_teacher(args) -> None:
    torch.set_num_threads(args.threads)
    prepared = prepare(DataConfig(split=args.split))
    train = TrainConfig(**{"progress": False, **(args.train or {})})
    seed_everything(train.seed)
    model = build_model(args.model, prepared, args.options)
    start = time.perf_counter()
    result = train_supervised(model, prepared, train)
    save_checkpoint(args.out, model, args.model, model.config,
                    {"vocab_sizes": prepared.vocabs.sizes, "test": result.test, "valid": result.valid,
                     "history": result.history, "seconds": time.perf_counter() - start})  # fmt: skip
    print(json.dumps({"model": args.model, "best_epoch": result.best_epoch, "valid": result.valid,
                      "test": result.test, "seconds": time.perf_counter() - start}))  # fmt: skip


def _metrics(result) -> dict:
    return {"valid": result.valid, "test": result.test, "best_epoch": result.best_epoch,
            "epochs_run": len(result.history), "stopped_early": result.stopped_early}  # fmt: skip


def student_alone(prepared, train: TrainConfig, student: str) -> dict:
    seed_everything(train.seed)
    model = build_model(student, prepared)
    start = time.perf_counter()
    result = train_supervised(model, prepared, train)
    return {**_metrics(result), "seconds": time.perf_counter() - start}


def distilled(prepared, committee, train: TrainConfig, config: DistillConfig, student: str) -> dict:
    seed_everything(train.seed)
    model = build_model(student, prepared)
    start = time.perf_counter()
    result = distill(model, committee, prepared, config, train)
    importance = None
    if result.importance:
        tau = config.gating.threshold
        importance = {k: {"mean": float(v.mean()), f"share_above_{tau}": float((v > tau).float().mean())}
                      for k, v in result.importance.items()}  # fmt: skip
    return {**_metrics(result), "passes": result.teacher_passes, "importance": importance,
            "seconds": time.perf_counter() - start}  # fmt: skip


def parse_run(text: str) -> tuple[str, dict | None]:
    """``alone`` or ``NAME=JSON`` (a ``distill:`` section)."""
    if text == "alone":
        return "alone", None
    name, _, spec = text.partition("=")
    if not spec:
        raise SystemExit(f"--run {text!r}: expected 'alone' or NAME=JSON")
    return name, json.loads(spec)


def done_runs(out: str) -> set[tuple]:
    if not Path(out).is_file():
        return set()
    records = [json.loads(line) for line in open(out) if line.strip()]
    return {(r["run"], r["teachers"], r["split"], r["seed"]) for r in records if "run" in r}


def cmd_table(args) -> None:
    torch.set_num_threads(args.threads)
    prepared = prepare(DataConfig(split=args.split))
    committee = load_committee(prepared, args.teacher_ckpt)
    teachers = "+".join(n for n, _ in committee)
    names = [n for n, _ in committee]
    runs = [parse_run(r) for r in args.run]
    done = done_runs(args.out)
    for seed in args.seeds:
        train = TrainConfig(epochs=args.epochs, patience=args.patience, seed=seed, progress=False)
        for name, spec in runs:
            if (name, teachers, args.split, seed) in done:
                print(f"skip {name} seed {seed}: already in {args.out}", flush=True)
                continue
            base = {"run": name, "seed": seed, "teachers": teachers, "split": args.split,
                    "epochs": args.epochs, "patience": args.patience, "load": load_avg(),
                    "threads": args.threads, "spec": spec}  # fmt: skip
            if spec is None:
                emit(args.out, {**base, **student_alone(prepared, train, args.student)})
                continue
            cfg = DistillConfig(**{"teachers": names, **spec})
            emit(args.out, {**base, **distilled(prepared, committee, train, cfg, args.student)})


def _timed(fn, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per call. On a shared machine the CPU time
    of a single-threaded run measures the work itself; wall time also counts waiting for a core."""
    fn()  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def cmd_cost(args) -> None:
    """One distillation step against the sum of its parts, timed back to back on one batch."""
    torch.set_num_threads(args.threads)
    prepared = prepare()
    committee = load_committee(prepared, args.teacher_ckpt)
    batch = prepared.data.batch(prepared.data.splits["train"][: args.batch_size])
    train = TrainConfig(progress=False)
    seed_everything(0)
    student = build_model("mlp_s", prepared)
    cfg = DistillConfig(teachers=[n for n, _ in committee], residual_questions=args.residual)
    method = build_method("diverse_distill", student, committee, cfg).train()
    student_opt, module_opt = build_optimizer(student, train), module_optimizer(method, cfg)

    def full_step():
        _, losses = method.training_step(batch)
        student_opt.zero_grad()
        module_opt.zero_grad()
        method.backward(losses)
        student_opt.step()
        module_opt.step()

    def student_step():
        loss = torch.nn.functional.mse_loss(student(batch), batch.labels)
        student_opt.zero_grad()
        loss.backward()
        student_opt.step()

    with torch.no_grad():
        h = student.early(batch)
        questions, _ = method.module.question(h)
    questions = [q.detach().requires_grad_(True) for q in questions]

    def teacher_parts():  # each teacher's middle (+ early for residual) forward and backward
        for k, (_, teacher) in enumerate(committee):
            method.ask(k, questions[k], batch).sum().backward()

    with torch.no_grad():
        replies = [method.ask(k, q, batch) for k, q in enumerate(questions)]

    def module_part():  # question + answer augmenters and the heads of R, teachers excluded
        module_opt.zero_grad()
        qs, s = method.module.question(h)
        total = s.sum() + sum(q.sum() for q in qs)
        for k, (_, teacher) in enumerate(committee):
            answer = method.module.answer(k, replies[k])
            total = total + student.head(answer).sum() + teacher.head(replies[k]).sum()
        total.backward(inputs=method.learnable_parameters())
        module_opt.step()

    rounds = []
    for _ in range(args.rounds):  # interleaved, so load changes hit every part alike
        rounds.append({name: _timed(fn, args.steps) for name, fn in
                       (("step", full_step), ("student", student_step),
                        ("teachers", teacher_parts), ("module", module_part))})  # fmt: skip
    record = {"kind": "cost", "teachers": "+".join(n for n, _ in committee),
              "batch_size": args.batch_size, "threads": args.threads,
              "residual": args.residual, "load": load_avg()}  # fmt: skip
    for i, clock in enumerate(("wall", "cpu")):
        med = {k: statistics.median(r[k][i] for r in rounds) for k in rounds[0]}
        parts = med["student"] + med["teachers"] + med["module"]
        record.update({f"{clock}_{k}_ms": 1e3 * v for k, v in med.items()})
        record[f"{clock}_ratio"] = med["step"] / parts
    emit(args.out, record)


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


SLICES = ("item_cold", "item_medium", "item_warm", "user_cold", "user_medium", "user_warm")


def cmd_summarize(args) -> None:
    records = [json.loads(line) for path in args.files for line in open(path) if line.strip()]
    table = [r for r in records if "run" in r]
    groups = defaultdict(list)
    for r in table:
        groups[(r["split"], r["teachers"], r["run"])].append(r)
    teacher_mse = args.teacher_mse or {}
    print("| split | teachers | run | seeds | epochs (best) | valid MSE | test MSE | gap closed | passes saved |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (split, teachers, run), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                             statistics.mean(r["valid"]["mse"] for r in kv[1]))):  # fmt: skip
        alone = {r["seed"]: r["test"]["mse"] for key, group in groups.items()
                 if key[0] == split and key[2] == "alone" for r in group}  # fmt: skip
        best = min((teacher_mse[t] for t in teachers.split("+") if t in teacher_mse), default=None)
        gap = ""
        if alone and best is not None and run != "alone":
            closed = [(alone[r["seed"]] - r["test"]["mse"]) / (alone[r["seed"]] - best)
                      for r in rs if r["seed"] in alone]  # fmt: skip
            gap = f"{100 * statistics.mean(closed):.0f}%" if closed else ""
        saved = [r["passes"]["all"]["saved"] for r in rs if r.get("passes")]
        epochs = "/".join(str(r["best_epoch"]) for r in rs)
        print(f"| {split} | {teachers if run != 'alone' else '-'} | {run} | {len(rs)} | {epochs} | "
              f"{_fmt([r['valid']['mse'] for r in rs])} | {_fmt([r['test']['mse'] for r in rs])} | "
              f"{gap} | {f'{100 * statistics.mean(saved):.1f}%' if saved and max(saved) > 0 else ''} |")
    print("\n| split | teachers | run | " + " | ".join(SLICES) + " |")
    print("|---|---|---|" + "---|" * len(SLICES))
    for (split, teachers, run), rs in sorted(groups.items()):
        cells = []
        for s in SLICES:
            values = [r["test"].get(f"mse_{s}") for r in rs]
            values = [v for v in values if v is not None and v == v]
            cells.append(f"{statistics.mean(values):.4f}" if values else "")
        print(f"| {split} | {teachers if run != 'alone' else '-'} | {run} | " + " | ".join(cells) + " |")
    if table:
        counts = table[0]["test"]
        print("\ntest rows per slice: " + ", ".join(f"{s} {counts.get(f'n_{s}', '?')}" for s in SLICES))
    for r in records:
        if r.get("kind") == "cost":
            for clock in ("cpu", "wall"):
                ms = {k: r[f"{clock}_{k}_ms"] for k in ("step", "student", "teachers", "module")}
                print(f"\ncost {clock} ({r['teachers']}, B={r['batch_size']}, threads={r['threads']}, "
                      f"load {r['load']:.1f}): step {ms['step']:.1f} ms; student {ms['student']:.1f} + "
                      f"teachers {ms['teachers']:.1f} + module {ms['module']:.1f} = "
                      f"{ms['student'] + ms['teachers'] + ms['module']:.1f} ms; "
                      f"ratio {r[f'{clock}_ratio']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("teacher")
    p.add_argument("--model", default="mlp_l")
    p.add_argument("--options", type=json.loads, default=None, help="model config overrides (JSON)")
    p.add_argument("--train", type=json.loads, default=None, help="train: overrides (JSON)")
    p.add_argument("--split", choices=["random", "temporal"], default="random")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_teacher)
    for name, func in (("table", cmd_table), ("cost", cmd_cost)):
        p = sub.add_parser(name)
        p.add_argument("--teacher-ckpt", action="append", required=True)
        p.add_argument("--threads", type=int, default=1)
        p.set_defaults(func=func)
        if name == "table":
            p.add_argument("--out", required=True)
            p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
            p.add_argument("--epochs", type=int, default=30)
            p.add_argument("--patience", type=int, default=4)
            p.add_argument("--split", choices=["random", "temporal"], default="random")
            p.add_argument("--student", default="mlp_s")
            p.add_argument("--run", action="append", required=True,
                           help="'alone' or NAME=JSON (a distill: section); repeatable")  # fmt: skip
        if name == "cost":
            p.add_argument("--out", required=True)
            p.add_argument("--batch-size", type=int, default=1024)
            p.add_argument("--steps", type=int, default=5)
            p.add_argument("--rounds", type=int, default=3)
            p.add_argument("--residual", action="store_true")
    p = sub.add_parser("summarize")
    p.add_argument("files", nargs="+")
    p.add_argument("--teacher-mse", type=json.loads, default=None,
                   help='test MSE of each teacher alone, e.g. \'{"mlp_l": 0.85}\'')  # fmt: skip
    p.set_defaults(func=cmd_summarize)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
