"""``recdistill distill``: distil trained teachers into a fresh student.

    recdistill distill --teachers mlp_l[,t5] [--teacher-ckpt PATH ...] [--method diverse_distill]
                       [--config X] [--epochs N] [--seed S] [--max-steps N] [--out DIR]

Teachers load from checkpoints written by ``recdistill train`` (default:
``runs/train/NAME/best.pt``; ``--teacher-ckpt`` gives one path per teacher, in order). The
``distill:`` section of the config sets the method and its options, the ``train:`` section the
loop (the student gets the same budget as supervised training). Prints the metrics and the
teacher passes gating saved, and writes ``OUT/student/best.pt``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from pipelines.commands.train import DEFAULT_OUT as TRAIN_OUT
from pipelines.schema import ConfigError

DEFAULT_OUT = "runs/distill"


def _sections(args: argparse.Namespace):
    """``data:``, ``train:``, ``distill:`` with the command line applied; student name/overrides."""
    from pipelines.config import load_config
    from recdistill.distill.config import DistillConfig
    from recdistill.training import TrainConfig

    cfg = load_config(args.config, args.overrides)
    data = cfg.data
    if args.source:
        data.source = args.source
    train = getattr(cfg, "train", None) or TrainConfig()
    changes = {"epochs": args.epochs, "seed": args.seed, "max_steps_per_epoch": args.max_steps}
    train = dataclasses.replace(train, **{k: v for k, v in changes.items() if v is not None})
    distill = getattr(cfg, "distill", None) or DistillConfig()
    options = {
        "method": args.method,
        "kd_weight": args.kd_weight,
        "teachers": args.teachers.split(",") if args.teachers else None,
        "residual_questions": True if args.residual_questions else None,
    }
    distill = dataclasses.replace(distill, **{k: v for k, v in options.items() if v is not None})
    if args.gating_threshold is not None:
        gating = dataclasses.replace(distill.gating, enabled=True, threshold=args.gating_threshold)
        distill = dataclasses.replace(distill, gating=gating)
    student = getattr(cfg, "student", "mlp_s")
    overrides = (getattr(cfg, "models", None) or {}).get(student)
    return data, train, distill, student, overrides


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
    from features.batches import prepare
    from recdistill.distill.trainer import distill
    from recdistill.models import build_model, count_parameters, model_config
    from recdistill.training import load_checkpoint, save_checkpoint, seed_everything

    data_cfg, train, config, student_name, overrides = _sections(args)
    paths = _checkpoints(config.teachers, args.teacher_ckpt)
    prepared = prepare(data_cfg)
    committee = []
    for name, path in zip(config.teachers, paths):
        teacher = load_checkpoint(path, prepared)
        freeze = getattr(teacher, "freeze", None)  # teachers that cache their context do so
        teacher = freeze() if callable(freeze) else teacher.eval().requires_grad_(False)
        print(f"teacher {name}: {path} ({sum(p.numel() for p in teacher.parameters()):,} parameters)")
        committee.append((name, teacher))

    student_cfg = model_config(student_name, overrides)
    seed_everything(train.seed)
    student = build_model(student_name, prepared, student_cfg)
    print(f"student {student_name}: {count_parameters(student):,} parameters; method {config.method}")

    def report(epoch: int, m: dict) -> None:
        losses = "  ".join(f"{k[5:]} {v:.4f}" for k, v in m.items() if k.startswith("loss_"))
        print(f"epoch {epoch:>2}  {losses}  valid MSE {m['valid_mse']:.4f}"
              f"  passes saved {m['teacher_passes_saved']:.1%}")  # fmt: skip

    result = distill(student, committee, prepared, config, train, on_epoch=report)
    fmt = lambda m: "  ".join(f"{k.upper()} {v:.4f}" for k, v in m.items())  # noqa: E731
    print(f"best epoch {result.best_epoch}{' (stopped early)' if result.stopped_early else ''}")
    print(f"valid  {fmt(result.valid)}")
    print(f"test   {fmt(result.test)}")
    for name, p in result.teacher_passes.items():
        print(f"teacher passes {name}: {p['done']:,} of {p['full']:,} ({p['saved']:.1%} saved)")
    out = Path(args.out or DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    prepared.vocabs.save(out / "vocabs.json")
    path = save_checkpoint(
        out / "student" / "best.pt", result.student, student_name, student_cfg,
        {"test": result.test, "valid": result.valid, "vocab_sizes": prepared.vocabs.sizes,
         "distill": dataclasses.asdict(config), "teacher_passes": result.teacher_passes},
    )  # fmt: skip
    print(f"checkpoint {path}")
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
