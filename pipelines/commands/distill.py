"""``recdistill distill``: distil trained teachers into a fresh student, by the job's own stages
(prepare, the committee reused from checkpoints, distil).

    recdistill distill --teachers mlp_l[,t5] [--teacher-ckpt PATH ...] [--method diverse_distill]
                       [--config X] [--epochs N] [--seed S] [--max-steps N] [--out DIR]

Teachers load from checkpoints written by ``recdistill train`` (default:
``runs/train/NAME/best.pt``; ``--teacher-ckpt`` gives one path per teacher, in order): each is
``teachers.<name>.checkpoint`` of the job. The ``distill:`` section of the config sets the
method and its options, the ``train:`` section the loop (the student gets the same budget as
supervised training), and the data's task what is reported (MSE for ratings, log loss for
clicks). Prints the metrics and the teacher passes gating saved, and writes ``OUT/vocabs.json``
and ``OUT/student/best.pt``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.commands.train import DEFAULT_OUT as TRAIN_OUT
from pipelines.schema import ConfigError

DEFAULT_OUT = "runs/distill"


def _overrides(args: argparse.Namespace) -> list[str]:
    """The command's options as ``--set`` overrides, so the job's config check sees them."""
    options = {
        "distill.method": args.method,
        "distill.kd_weight": args.kd_weight,
        "distill.teachers": args.teachers.split(",") if args.teachers else None,
        "distill.residual_questions": True if args.residual_questions else None,
        "distill.gating.enabled": True if args.gating_threshold is not None else None,
        "distill.gating.threshold": args.gating_threshold,
        "train.epochs": args.epochs,
        "train.seed": args.seed,
        "train.max_steps_per_epoch": args.max_steps,
    }
    return [f"{key}={json.dumps(value)}" for key, value in options.items() if value is not None]


def _checkpoints(teachers: list[str], given: list[str] | None) -> list[Path]:
    if given and len(given) != len(teachers):
        raise ConfigError(
            f"--teacher-ckpt given {len(given)} time(s) for {len(teachers)} teacher(s) "
            f"({', '.join(teachers)}); give one per teacher, in order"
        )
    paths = [Path(p) for p in given] if given else [Path(TRAIN_OUT) / n / "best.pt" for n in teachers]
    for name, path in zip(teachers, paths):
        if not path.is_file():
            raise ConfigError(
                f"teacher {name}: no checkpoint at {path}; train it first "
                f"(recdistill train --model {name}) or pass --teacher-ckpt"
            )
    return paths


def cmd_distill(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.domains import domain_for
    from pipelines.engine import JobContext
    from pipelines.engine.stages import load_data, stage_distill
    from pipelines.engine.teachers import stage_teachers

    # every teacher is reused from a checkpoint: the config's per-teacher training settings go
    overrides = ["teachers={}", *args.overrides, *_overrides(args)]
    teachers = load_config(args.config, overrides).distill.teachers
    paths = _checkpoints(teachers, args.teacher_ckpt)
    overrides += [f"teachers.{name}.checkpoint={json.dumps(str(path))}" for name, path in zip(teachers, paths)]
    cfg = load_config(args.config, overrides)
    if args.source:
        cfg.data.source = args.source
    out = Path(args.out or DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    ctx = JobContext(cfg, domain_for(cfg), out)
    print("[1/3] prepare")
    load_data(ctx)
    print(f"[2/3] teachers: {', '.join(teachers)}")
    stage_teachers(ctx)
    print(f"[3/3] distill ({cfg.distill.method})")
    result = stage_distill(ctx)
    fmt = lambda m: "  ".join(f"{k.upper()} {v:.4f}" for k, v in m.items() if not k.startswith("n_"))  # noqa: E731
    print(f"best epoch {result.best_epoch}{' (stopped early)' if result.stopped_early else ''}")
    print(f"valid  {fmt(result.valid)}")
    print(f"test   {fmt(result.test)}")
    for name, p in result.teacher_passes.items():
        print(f"teacher passes {name}: {p['done']:,} of {p['full']:,} ({p['saved']:.1%} saved)")
    print(f"checkpoint {result.checkpoint}")
    return 0


def add_commands(sub, with_config) -> None:
    cmd = with_config(sub.add_parser("distill", help="distil trained teachers into a fresh student"))
    cmd.add_argument("--teachers", help="comma-separated committee (overrides distill.teachers)")
    cmd.add_argument("--teacher-ckpt", action="append",
                     help=f"checkpoint of each teacher, in order (default {TRAIN_OUT}/NAME/best.pt)")  # fmt: skip
    # Checked when the command runs (a wrong name lists them): the method registry imports torch.
    cmd.add_argument("--method", help="override distill.method (diverse_distill, ld, fd, ...)")
    cmd.add_argument("--kd-weight", type=float, help="override distill.kd_weight (lambda)")
    cmd.add_argument("--residual-questions", action="store_true",
                     help="add questions to the teachers' own early output (distill.residual_questions)")  # fmt: skip
    cmd.add_argument("--gating-threshold", type=float,
                     help="turn importance gating on at this threshold (distill.gating)")  # fmt: skip
    cmd.add_argument("--epochs", type=int, help="override train.epochs")
    cmd.add_argument("--seed", type=int, help="override train.seed")
    cmd.add_argument("--max-steps", type=int, help="override train.max_steps_per_epoch")
    cmd.add_argument("--out", help=f"output folder (default {DEFAULT_OUT})")
    cmd.set_defaults(func=cmd_distill)
