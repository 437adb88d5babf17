"""``recdistill demo``: the main job on the embedded data (what `make demo` runs)."""

from __future__ import annotations

import argparse

from pipelines.commands import data


def cmd_demo(args: argparse.Namespace) -> int:
    print("== recdistill demo: prepare the embedded MovieLens-100K ==")
    args.json = False
    data.cmd_summary(args)
    print("\n== a few prompts for the language teachers ==")
    args.limit = 5
    return data.cmd_prompts(args)


def add_commands(sub, with_config) -> None:
    demo = with_config(sub.add_parser("demo", help="run the main job on the embedded data"))
    demo.set_defaults(func=cmd_demo)
