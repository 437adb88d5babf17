"""``recdistill vision run CONFIG``: the vision job (ViT student, ViT and CLIP teachers)."""

from __future__ import annotations

import argparse


def cmd_vision_run(args: argparse.Namespace) -> int:
    from pipelines.vision_config import load_vision_config
    from pipelines.vision_job import run_vision_job
    from recdistill.tracking import markdown_table

    cfg = load_vision_config(args.config_file, args.overrides)
    result = run_vision_job(cfg, tracking_uri=args.tracking_uri, output_dir=args.output)
    columns = [c for c in ("model", "role", "test_accuracy", "params", "teacher_passes_saved", "gap_closed")
               if any(r.get(c) is not None for r in result.rows)]  # fmt: skip
    print("\n== results (test split) ==")
    print(markdown_table(result.rows, columns))
    print(f"\n== where things are (job took {result.seconds / 60:.1f} min) ==")
    print(f"output folder      {result.output_dir}")
    print(f"TorchScript file   {result.student_file}  (torch.jit.load; images [B, C, H, W] -> logits)")
    print(f"results table      {result.output_dir / 'results.md'}  (with accuracy per class)")
    if result.run_id:
        print(f"MLflow run         {result.run_id}")
    return 0


def add_commands(sub, with_config) -> None:
    vision = sub.add_parser("vision", help="distil ViT / CLIP teachers into a ViT student on images")
    jobs = vision.add_subparsers(dest="vision_command", required=True)
    run = jobs.add_parser("run", help="run a whole vision job from a YAML config")
    run.add_argument("config_file", help="job YAML, or a shipped config name (vision_default, vision_quick)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override one config value, given as YAML (--set train.epochs=3); repeatable")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (else MLFLOW_TRACKING_URI, else config)")
    run.add_argument("--output", help="override output_dir")
    run.set_defaults(func=cmd_vision_run)
