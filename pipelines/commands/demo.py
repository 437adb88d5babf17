"""``recdistill demo``: the main job on the embedded data (what ``make demo`` runs)."""

from __future__ import annotations

import argparse

from pipelines.commands.run import cmd_run


def cmd_demo(args: argparse.Namespace) -> int:
    print(f"== recdistill demo: `recdistill run {args.config}` on the embedded MovieLens-100K ==")
    args.config_file = args.config
    args.output, args.resume, args.run_folder = None, False, None
    return cmd_run(args)


def add_commands(sub, with_config) -> None:
    demo = with_config(sub.add_parser("demo", help="run the main job on the embedded data"))
    demo.add_argument("--tracking-uri", help="MLflow tracking URI (default: a local store in runs/)")
    demo.set_defaults(func=cmd_demo)
