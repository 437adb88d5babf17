"""``recdistill vision run CONFIG``: the job on images (ViT student, ViT and CLIP teachers),
through the same engine as ``recdistill run``: resume after a kill, MLflow parent and nested
runs, registration and promotion on validation accuracy."""

from __future__ import annotations

import argparse

from pipelines.commands.run import run_and_summarize, with_job_options


def cmd_vision_run(args: argparse.Namespace) -> int:
    from pipelines.vision_config import load_vision_config

    return run_and_summarize(load_vision_config(args.config_file, args.overrides), args)


def add_commands(sub, with_config) -> None:
    vision = sub.add_parser("vision", help="distil ViT / CLIP teachers into a ViT student on images")
    jobs = vision.add_subparsers(dest="vision_command", required=True)
    run = jobs.add_parser("run", help="run a whole vision job from a YAML config")
    run.add_argument("config_file", help="job YAML, or a shipped config name (vision_default, vision_quick)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override one config value, given as YAML (--set train.epochs=3); repeatable")
    with_job_options(run).set_defaults(func=cmd_vision_run)
