"""``recdistill run CONFIG``: the whole batch job, ending with a summary of where things went."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the job imports torch and MLflow: only when it runs
    from pipelines.engine import JobResult

#: Summary columns besides the task's own (``test_<column>`` of ``result.task.columns``).
SUMMARY_AROUND = (("model", "role"), ("params", "teacher_passes_saved", "gap_closed"))


def _champion_file(result: JobResult) -> str:
    """Which file serves as champion: the job's stable copy, its version, and the run file it
    copies."""
    decision = result.decision
    if result.champion_file is None:
        return "none: no version is champion yet"
    whose = "this run's" if decision.promoted else "that version's run's"
    copied = f", a copy of {whose} {result.champion_source}" if result.champion_source else ""
    return f"{result.champion_file}  (version {decision.champion}{copied})"


def print_summary(result: JobResult) -> None:
    """The results table and where things are; every printed command works when pasted into a
    fresh shell or Python, from any folder (absolute store path and executable)."""
    from pipelines.engine import LATEST
    from recdistill.tracking import markdown_table

    first, last = SUMMARY_AROUND
    every = (*first, *(f"test_{c}" for c in result.task.columns), *last)
    columns = [c for c in every if any(r.get(c) is not None for r in result.rows)]
    print("\n== results (test split) ==")
    print(markdown_table(result.rows, columns))
    if result.distillation_verdict is not None:
        print(result.distillation_verdict)
    print(f"\n== where things are (job took {result.seconds / 60:.1f} min) ==")
    print(f"output folder      {result.output_dir}  (also {result.output_dir.parent / LATEST})")
    if result.export is not None:
        print(f"TorchScript file   {result.export.path}  (load with torch.jit.load; torch alone)")
    print(f"results table      {result.output_dir / 'results.md'}")
    if result.decision is not None:
        print(f"champion file      {_champion_file(result)}")
    from recdistill.tracking import absolute_uri

    uri = absolute_uri(result.tracking_uri) if result.tracking_uri else None
    if result.run_id:
        print(f"MLflow run         {result.run_id}  at {uri}")
    if result.version is not None and result.decision is not None:
        print(f"registered         {result.decision.name} version {result.version}: "
              f"{'champion' if result.decision.promoted else 'not promoted'} ({result.decision.reason})")  # fmt: skip
        if uri:
            model_uri = f"models:/{result.decision.name}@champion"
            pt2 = result.export is not None and Path(result.export.path).suffix == ".pt2"
            loader = "pyfunc.load_model({!r}).predict  # a table of raw columns" if pt2 else "pytorch.load_model({!r})"
            print(f"load the champion  import mlflow; mlflow.set_tracking_uri({uri!r}); "
                  f"served = mlflow.{loader.format(model_uri)}")  # fmt: skip
    if uri and uri.startswith(("http://", "https://")):
        print(f"browse             open {uri}")
    elif uri:
        # The venv's own mlflow by absolute path: it need not be on PATH, nor the venv here.
        mlflow_cli = Path(sys.executable).absolute().with_name("mlflow")
        print(f"browse             {shlex.quote(str(mlflow_cli))} ui --backend-store-uri {shlex.quote(uri)}"
              " --port 5000   # then open http://127.0.0.1:5000")  # fmt: skip


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.vision_config import load_job_config

    cfg = load_job_config(args.config_file, args.overrides)  # ratings, clicks or images
    if args.source:
        if not hasattr(cfg.data, "source"):
            raise ValueError("--source names a MovieLens source; an image job reads data.path")
        cfg.data.source = args.source
    return run_and_summarize(cfg, args)


def run_and_summarize(cfg, args: argparse.Namespace) -> int:
    """Run the job of ``cfg`` (any domain) as the command line asks, and print its summary."""
    from pipelines.engine import run_job
    from pipelines.stopping import stop_on_sigterm

    if args.run_folder and not args.resume:
        raise ValueError("--run names a run folder to continue: use it with --resume")
    resume = (args.run_folder or True) if args.resume else False
    stop_on_sigterm()  # a killed job's MLflow runs end KILLED, its checkpoints kept for --resume
    result = run_job(cfg, tracking_uri=args.tracking_uri, resume=resume, output_dir=args.output)
    print_summary(result)
    return 0


def with_job_options(run: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of a whole job (``recdistill run``, ``recdistill vision run``)."""
    run.add_argument("--tracking-uri", help="MLflow tracking URI (else MLFLOW_TRACKING_URI, else config)")
    run.add_argument("--output", help="override output_dir")
    run.add_argument("--resume", action="store_true",
                     help="continue the latest unfinished run of this job in its output folder "
                          "(or the one --run names), reusing every model it finished")  # fmt: skip
    run.add_argument("--run", dest="run_folder", metavar="RUN",
                     help="with --resume: the run folder to continue (runs/NAME/RUN)")  # fmt: skip
    return run


def add_commands(sub, with_config) -> None:
    run = sub.add_parser("run", help="run a whole batch job from a YAML config (ratings, clicks or images)")
    run.add_argument("config_file", help="job YAML, or a shipped config name (default, quick, vision_quick)")
    with_config(run, config_option=False)
    with_job_options(run).set_defaults(func=cmd_run)
