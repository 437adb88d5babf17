"""DiverseDistill against the student alone, the teacher and LD; gating savings; step cost.

Subcommands (every run appends one JSON line to ``--out``, so partial progress survives):

- ``teacher``: train MLP-L (or ``--model``) once and save a checkpoint for the others.
- ``table``: for each seed: student alone, LD, DiverseDistill faithful and with residual
  questions, each DiverseDistill variant at every ``--kd-weights`` value (lambda is chosen
  afterwards on the VALIDATION split, by ``summarize``).
- ``gating``: DiverseDistill with importance gating at each ``--thresholds`` value.
- ``cost``: seconds of one distillation step against the sum of its parts, each timed alone.
- ``summarize``: the markdown tables of docs/results/diverse_distill.md from the JSON lines.

Usage::

    .venv/bin/python benchmarks/bench_distill.py teacher --out runs/bench_distill/mlp_l.pt
    .venv/bin/python benchmarks/bench_distill.py table --teacher-ckpt runs/bench_distill/mlp_l.pt \\
        --seeds 0 --epochs 3 --kd-weights 1 10 --out runs/bench_distill/table.jsonl
    .venv/bin/python benchmarks/bench_distill.py summarize runs/bench_distill/*.jsonl
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
from recdistill.distill import DistillConfig, GatingConfig, build_method  # noqa: E402
from recdistill.distill.trainer import distill, module_optimizer  # noqa: E402
from recdistill.models import build_model, model_config  # noqa: E402
from recdistill.training import (  # noqa: E402
    TrainConfig,
    build_optimizer,
    load_checkpoint,
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
    prepared = prepare()
    train = TrainConfig(epochs=args.epochs, seed=args.seed, progress=False)
    seed_everything(train.seed)
    model = build_model(args.model, prepared)
    result = train_supervised(model, prepared, train)
    save_checkpoint(args.out, model, args.model, model_config(args.model),
                    {"vocab_sizes": prepared.vocabs.sizes, "test": result.test,
                     "valid": result.valid})  # fmt: skip
    print(json.dumps({"model": args.model, "valid": result.valid, "test": result.test}))


def student_alone(prepared, train: TrainConfig) -> dict:
    seed_everything(train.seed)
    student = build_model("mlp_s", prepared)
    start = time.perf_counter()
    result = train_supervised(student, prepared, train)
    return {"valid": result.valid, "test": result.test, "best_epoch": result.best_epoch,
            "seconds": time.perf_counter() - start}  # fmt: skip


def distilled(prepared, committee, train: TrainConfig, config: DistillConfig) -> dict:
    seed_everything(train.seed)
    student = build_model("mlp_s", prepared)
    start = time.perf_counter()
    result = distill(student, committee, prepared, config, train)
    importance = None
    if result.importance:
        importance = {k: {"mean": float(v.mean()), "share_above_0.6": float((v > 0.6).float().mean())}
                      for k, v in result.importance.items()}  # fmt: skip
    return {"valid": result.valid, "test": result.test, "best_epoch": result.best_epoch,
            "passes": result.teacher_passes["all"], "importance": importance,
            "seconds": time.perf_counter() - start}  # fmt: skip


def cmd_table(args) -> None:
    prepared = prepare()
    committee = load_committee(prepared, args.teacher_ckpt)
    teachers = "+".join(n for n, _ in committee)
    for seed in args.seeds:
        train = TrainConfig(epochs=args.epochs, patience=args.patience, seed=seed, progress=False)
        base = {"seed": seed, "teachers": teachers, "epochs": args.epochs, "load": load_avg()}
        if "alone" in args.variants:
            emit(args.out, {**base, "variant": "student alone", **student_alone(prepared, train)})
        if "ld" in args.variants:
            cfg = DistillConfig(method="ld", teachers=[n for n, _ in committee], kd_weight=args.ld_weight)
            emit(args.out, {**base, "variant": "LD", "kd_weight": args.ld_weight,
                            **distilled(prepared, committee, train, cfg)})  # fmt: skip
        for variant, residual in (("faithful", False), ("residual", True)):
            if variant not in args.variants:
                continue
            for weight in args.kd_weights:
                cfg = DistillConfig(teachers=[n for n, _ in committee], kd_weight=weight,
                                    residual_questions=residual)  # fmt: skip
                emit(args.out, {**base, "variant": f"DiverseDistill {variant}", "kd_weight": weight,
                                **distilled(prepared, committee, train, cfg)})  # fmt: skip


def cmd_gating(args) -> None:
    prepared = prepare()
    committee = load_committee(prepared, args.teacher_ckpt)
    train = TrainConfig(epochs=args.epochs, patience=args.patience, seed=args.seed, progress=False)
    for tau in args.thresholds:
        cfg = DistillConfig(teachers=[n for n, _ in committee], kd_weight=args.kd_weight,
                            residual_questions=args.residual,
                            gating=GatingConfig(enabled=True, threshold=tau,
                                                warmup_steps=args.warmup))  # fmt: skip
        emit(args.out, {"seed": args.seed, "threshold": tau, "kd_weight": args.kd_weight,
                        "residual": args.residual, "warmup": args.warmup, "load": load_avg(),
                        **distilled(prepared, committee, train, cfg)})  # fmt: skip


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
        _, losses = method.forward_train(batch)
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


def cmd_summarize(args) -> None:
    records = [json.loads(line) for path in args.files for line in open(path) if line.strip()]
    table = [r for r in records if "variant" in r]
    groups = defaultdict(list)
    for r in table:
        groups[(r["teachers"], r["variant"], r.get("kd_weight"))].append(r)
    # lambda per (teachers, variant): the best mean VALID MSE over seeds
    chosen = {}
    for (teachers, variant, weight), rs in groups.items():
        key = (teachers, variant)
        mean_valid = statistics.mean(r["valid"]["mse"] for r in rs)
        if key not in chosen or mean_valid < chosen[key][1]:
            chosen[key] = (weight, mean_valid)
    print("| teachers | variant | lambda (chosen on valid) | seeds | valid MSE | test MSE | gap closed |")
    print("|---|---|---|---|---|---|---|")
    for (teachers, variant), (weight, _) in sorted(chosen.items()):
        rs = groups[(teachers, variant, weight)]
        alone = {r["seed"]: r["test"]["mse"] for r in groups.get((teachers, "student alone", None), [])}
        teacher_mse = args.teacher_mse.get(teachers) if args.teacher_mse else None
        gap = ""
        if alone and teacher_mse is not None:
            closed = [(alone[r["seed"]] - r["test"]["mse"]) / (alone[r["seed"]] - teacher_mse)
                      for r in rs if r["seed"] in alone]  # fmt: skip
            gap = f"{100 * statistics.mean(closed):.0f}%" if closed else ""
        print(f"| {teachers} | {variant} | {weight if weight is not None else '-'} | "
              f"{len(rs)} | {_fmt([r['valid']['mse'] for r in rs])} | "
              f"{_fmt([r['test']['mse'] for r in rs])} | {gap} |")
    print("\n| all runs | lambda | seed | valid MSE | test MSE | best epoch | load |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['teachers']} {r['variant']} | {r.get('kd_weight', '-')} | {r['seed']} | "
              f"{r['valid']['mse']:.4f} | {r['test']['mse']:.4f} | {r['best_epoch']} | {r['load']:.1f} |")
    gating = [r for r in records if "threshold" in r]
    if gating:
        print("\n| threshold | passes done / full | saved | valid MSE | test MSE |")
        print("|---|---|---|---|---|")
        for r in gating:
            p = r["passes"]
            print(f"| {r['threshold']} | {p['done']:,} / {p['full']:,} | {100 * p['saved']:.1f}% | "
                  f"{r['valid']['mse']:.4f} | {r['test']['mse']:.4f} |")
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
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_teacher)
    for name, func in (("table", cmd_table), ("gating", cmd_gating), ("cost", cmd_cost)):
        p = sub.add_parser(name)
        p.add_argument("--teacher-ckpt", action="append", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--epochs", type=int, default=3)
        p.add_argument("--patience", type=int, default=1)
        p.set_defaults(func=func)
        if name == "table":
            p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
            p.add_argument("--kd-weights", type=float, nargs="+", default=[1.0, 10.0])
            p.add_argument("--ld-weight", type=float, default=1.0)
            p.add_argument("--variants", nargs="+",
                           default=["alone", "ld", "faithful", "residual"])  # fmt: skip
        if name == "gating":
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7])
            p.add_argument("--kd-weight", type=float, default=10.0)
            p.add_argument("--residual", action="store_true")
            p.add_argument("--warmup", type=int, default=40)
        if name == "cost":
            p.add_argument("--batch-size", type=int, default=1024)
            p.add_argument("--steps", type=int, default=5)
            p.add_argument("--rounds", type=int, default=3)
            p.add_argument("--threads", type=int, default=1)
            p.add_argument("--residual", action="store_true")
    p = sub.add_parser("summarize")
    p.add_argument("files", nargs="+")
    p.add_argument("--teacher-mse", type=json.loads, default=None,
                   help='test MSE of each committee alone, e.g. \'{"mlp_l": 0.85}\'')  # fmt: skip
    p.set_defaults(func=cmd_summarize)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
