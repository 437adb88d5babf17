"""``recdistill run CONFIG``: the whole batch job, ending with a summary of where things went."""

from __future__ import annotations

import argparse
import shlex

from pipelines.config import load_config
from pipelines.jobs import JobResult, run_job
from recdistill.tracking import markdown_table

SUMMARY_COLUMNS = ("model", "role", "test_mse", "test_rmse", "test_mae", "params",
                   "teacher_passes_saved", "gap_closed")  # fmt: skip


def print_summary(result: JobResult) -> None:
    columns = [c for c in SUMMARY_COLUMNS if any(r.get(c) is not None for r in result.rows)]
    print("\n== results (test split) ==")
    print(markdown_table(result.rows, columns))
    if result.distillation_verdict is not None:
        print(result.distillation_verdict)
    print(f"\n== where things are (job took {result.seconds / 60:.1f} min) ==")
    print(f"output folder      {result.output_dir}")
    if result.export is not None:
        print(f"TorchScript file   {result.export.path}  (load with torch.jit.load; torch alone)")
    print(f"results table      {result.output_dir / 'results.md'}")
    if result.run_id:
        print(f"MLflow run         {result.run_id}  at {result.tracking_uri}")
    if result.version is not None and result.decision is not None:
        print(f"registered         {result.decision.name} version {result.version}: "
              f"{'champion' if result.decision.promoted else 'not promoted'} ({result.decision.reason})")  # fmt: skip
        print(f"load the champion  mlflow.pytorch.load_model('models:/{result.decision.name}@champion')")
    if result.tracking_uri:
        if result.tracking_uri.startswith(("http://", "https://")):
            print(f"browse             open {result.tracking_uri}")
        else:
            print(f"browse             .venv/bin/mlflow ui --backend-store-uri {shlex.quote(result.tracking_uri)}"
                  " --port 5000   # then open http://127.0.0.1:5000")  # fmt: skip


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config_file)
    if args.source:
        cfg.data.source = args.source
    result = run_job(cfg, tracking_uri=args.tracking_uri, resume=args.resume, output_dir=args.output)
    print_summary(result)
    return 0


def add_commands(sub, with_config) -> None:
    run = sub.add_parser("run", help="run a whole batch job from a YAML config")
    run.add_argument("config_file", help="job YAML, or a shipped config name (default, quick)")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (else MLFLOW_TRACKING_URI, else config)")
    run.add_argument("--output", help="override output_dir")
    run.add_argument("--resume", action="store_true",
                     help="reuse teachers an earlier run of this job finished in the output folder")  # fmt: skip
    run.add_argument("--source", help="override data.source (embedded, or a MovieLens folder)")
    run.set_defaults(func=cmd_run)
