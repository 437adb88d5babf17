"""The ``recdistill`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from features.sources import DataError
from pipelines.config import load_config
from pipelines.schema import ConfigError


def _data_config(args: argparse.Namespace):
    cfg = load_config(args.config).data
    if getattr(args, "source", None):
        cfg.source = args.source
    return cfg


def cmd_data_summary(args: argparse.Namespace) -> int:
    from features.batches import prepare

    summary = prepare(_data_config(args)).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in value.items())
        elif isinstance(value, int):
            value = f"{value:,}"
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_data_prompts(args: argparse.Namespace) -> int:
    from features.sources import load_movielens
    from features.verbalizer import verbalize

    cfg = _data_config(args)
    joined = load_movielens(cfg).joined()
    start = time.perf_counter()
    prompts = verbalize(joined, cfg)
    elapsed = time.perf_counter() - start
    for prompt in prompts.head(args.limit).to_list():
        print(prompt)
    print(f"# verbalized {len(prompts):,} ratings in {elapsed:.3f} s", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: for now, prepare the data, print its summary and a few prompts."""
    print("== recdistill demo: prepare the embedded MovieLens-100K ==")
    args.json = False
    cmd_data_summary(args)
    print("\n== a few prompts for the language teachers ==")
    args.limit = 5
    return cmd_data_prompts(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recdistill",
        description="Distil a committee of teachers into a small TorchRec recommender.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", default="default", help="job YAML, or a shipped config name")
        p.add_argument("--source", help="override data.source (embedded, or a MovieLens folder)")
        return p

    data = sub.add_parser("data", help="inspect the configured data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    summary = with_config(data_sub.add_parser("summary", help="counts of ratings, users, items, splits"))
    summary.add_argument("--json", action="store_true", help="print JSON")
    summary.set_defaults(func=cmd_data_summary)
    prompts = with_config(data_sub.add_parser("prompts", help="print verbalized prompts"))
    prompts.add_argument("--limit", type=int, default=10, help="how many prompts")
    prompts.set_defaults(func=cmd_data_prompts)

    demo = with_config(sub.add_parser("demo", help="run the main job on the embedded data"))
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ConfigError, DataError) as err:
        print(f"recdistill: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
