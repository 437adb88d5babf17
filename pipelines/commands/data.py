"""``recdistill data summary`` and ``recdistill data prompts``."""

from __future__ import annotations

import argparse
import json
import sys
import time


def data_config(args: argparse.Namespace):
    """The ``data:`` section of the job config, with ``--set`` and ``--source`` applied."""
    from pipelines.config import load_config

    cfg = load_config(args.config, args.overrides).data
    if getattr(args, "source", None):
        cfg.source = args.source
    return cfg


def print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(
                f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in value.items()
            )
        elif isinstance(value, int):
            value = f"{value:,}"
        print(f"{key:<{width}}  {value}")


def cmd_summary(args: argparse.Namespace) -> int:
    from features.batches import prepare

    summary = prepare(data_config(args)).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    return 0


def cmd_prompts(args: argparse.Namespace) -> int:
    from features.sources import load_movielens
    from features.verbalizer import verbalize

    cfg = data_config(args)
    joined = load_movielens(cfg).joined()
    start = time.perf_counter()
    prompts = verbalize(joined, cfg)
    elapsed = time.perf_counter() - start
    for prompt in prompts.head(args.limit).to_list():
        print(prompt)
    print(f"# verbalized {len(prompts):,} ratings in {elapsed:.3f} s", file=sys.stderr)
    return 0


def add_commands(sub, with_config) -> None:
    data = sub.add_parser("data", help="inspect the configured data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    summary = with_config(data_sub.add_parser("summary", help="counts of ratings, users, items, splits"))
    summary.add_argument("--json", action="store_true", help="print JSON")
    summary.set_defaults(func=cmd_summary)
    prompts = with_config(data_sub.add_parser("prompts", help="print verbalized prompts"))
    prompts.add_argument("--limit", type=int, default=10, help="how many prompts")
    prompts.set_defaults(func=cmd_prompts)
