"""``recdistill bench paper``: the paper's recommendation experiments (Tables 3-5, gating, Figure 4).

    recdistill bench paper [--quick] [--config default] [--out runs/bench_paper] [--seeds 0 1 2]
                           [--tables t3 t4 t5 gating] [--workers 2] [--rerun] [--report-only]
                           [--tracking-uri URI]

Teachers are trained once into ``OUT/teachers/``; each cell's result lands in
``OUT/cells/`` as soon as it finishes, so a killed bench resumes with the same command. The
report is ``OUT/paper_tables.md`` with ``paper_cells.csv`` and the PNGs beside it
(:mod:`pipelines.bench_paper`).
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

DEFAULT_OUT = "runs/bench_paper"
#: The paper bench's own setting (MLP-S taught by MiniLM, MLP-L, MLP-M; no issue-18 additions),
#: not the default job's, which moved on (pipelines/configs/paper.yaml says what differs).
PAPER_CONFIG = "paper"


def cmd_bench_paper(args: argparse.Namespace) -> int:
    from pipelines.bench_paper import mlflow_logger, paper_plan, run_bench, write_report
    from pipelines.stopping import stop_on_sigterm
    from pipelines.config import load_config

    config = load_config(args.config, args.overrides)
    if args.source:
        config.data.source = args.source
    plan = paper_plan(quick=args.quick, seeds=args.seeds, tables=args.tables)
    out = Path(args.out or (DEFAULT_OUT + ("_quick" if args.quick else "")))
    command = _command(args)
    if not args.report_only:
        stop_on_sigterm()
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        on_cell = mlflow_logger(uri) if uri else None
        print(f"bench paper: {len(plan.rows)} rows x seeds {plan.seeds} -> {out} "
              f"({args.workers} worker(s){'; MLflow ' + uri if uri else ''})", flush=True)  # fmt: skip
        run_bench(config, plan, out, workers=args.workers, rerun=args.rerun,
                  say=lambda line: print(line, flush=True), on_cell=on_cell)  # fmt: skip
    report = write_report(out, plan, command)
    print(f"report {report}")
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this bench, for the report."""
    parts = ["recdistill", "bench", "paper"]
    if args.quick:
        parts.append("--quick")
    if args.config != PAPER_CONFIG:
        parts += ["--config", args.config]
    if args.source:
        parts += ["--source", args.source]
    for override in args.overrides:
        parts += ["--set", override]
    if args.seeds:
        parts += ["--seeds", *map(str, args.seeds)]
    if args.tables:
        parts += ["--tables", *args.tables]
    if args.out:
        parts += ["--out", args.out]
    parts += ["--workers", str(args.workers)]
    return " ".join(shlex.quote(p) for p in parts)


def cmd_bench_vision(args: argparse.Namespace) -> int:
    from pipelines.stopping import stop_on_sigterm
    from pipelines.bench_vision import run_vision_bench, write_vision_report
    from pipelines.vision_config import load_vision_config

    cfg = load_vision_config(args.config, args.overrides)
    out = Path(args.out or "runs/bench_vision")
    parts = ["recdistill", "bench", "vision", "--config", args.config,
             *[p for o in args.overrides for p in ("--set", o)], "--seeds", *map(str, args.seeds),
             "--workers", str(args.workers)]  # fmt: skip
    if args.out:
        parts += ["--out", args.out]
    if args.methods:
        parts += ["--methods", *args.methods]
    if not args.report_only:
        stop_on_sigterm()
        print(f"bench vision: seeds {args.seeds} -> {out} ({args.workers} worker(s))", flush=True)
        run_vision_bench(cfg, out, args.seeds, args.workers, say=lambda line: print(line, flush=True),
                         methods=args.methods)  # fmt: skip
    print(f"report {write_vision_report(out, ' '.join(shlex.quote(p) for p in parts), cfg, args.seeds)}")
    return 0


def add_commands(sub, with_config) -> None:
    bench = sub.add_parser("bench", help="benchmarks: the paper's experiments (paper, vision)")
    kinds = bench.add_subparsers(dest="bench", required=True)
    cmd = with_config(kinds.add_parser("paper", help="the paper's recommendation tables, resumable"))
    cmd.set_defaults(config=PAPER_CONFIG)
    cmd.add_argument("--quick", action="store_true",
                     help="one seed, 25%% of the training split, short budgets (~15 min)")  # fmt: skip
    cmd.add_argument("--out", help=f"output folder (default {DEFAULT_OUT}, or {DEFAULT_OUT}_quick)")
    cmd.add_argument("--seeds", type=int, nargs="+", help="student seeds (default 0 1 2; quick: 0)")
    cmd.add_argument("--tables", nargs="+", choices=["t3", "t4", "t5", "gating"],
                     help="run only these tables (the student alone always runs)")  # fmt: skip
    cmd.add_argument("--workers", type=int, default=2, help="processes, one torch thread each")
    cmd.add_argument("--rerun", action="store_true", help="rerun finished cells too")
    cmd.add_argument("--report-only", action="store_true", help="rebuild the report, run nothing")
    cmd.add_argument("--tracking-uri", help="log one MLflow run per cell (default $MLFLOW_TRACKING_URI)")
    cmd.set_defaults(func=cmd_bench_paper)
    vision = kinds.add_parser("vision", help="the paper's vision experiment on Fashion-MNIST, resumable")
    vision.add_argument("--config", default="vision_default", help="vision job YAML, or a shipped name")
    vision.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one config value (--set train.epochs=3); repeatable")
    vision.add_argument("--out", help="output folder (default runs/bench_vision)")
    vision.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds")
    vision.add_argument("--workers", type=int, default=2, help="processes, one torch thread each")
    vision.add_argument("--methods", nargs="+", metavar="METHOD",
                        help="run only the student alone and these rows: ld, fd, diverse_distill, or a "
                             "committee variant (diverse_distill:ungated, diverse_distill:tied, and the "
                             "transfer set's ld:mixup, fd:mixup, diverse_distill:tied_mixup); "
                             "METHOD@T1+T2 names one row (fd@vit_l)")  # fmt: skip
    vision.add_argument("--report-only", action="store_true", help="rebuild the report, run nothing")
    vision.set_defaults(func=cmd_bench_vision)
