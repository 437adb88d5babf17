"""The ``recdistill`` command line; each command group lives in ``pipelines/commands/``."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

import pipelines.commands
from features.sources import DataError
from pipelines.schema import ConfigError

#: Errors that mean "bad input": printed as one clear line, exit status 2, no stack trace.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError)


def with_config(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options every job command shares."""
    parser.add_argument("--config", default="default", help="job YAML, or a shipped config name")
    parser.add_argument("--source", help="override data.source (embedded, or a MovieLens folder)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recdistill",
        description="Distil a committee of teachers into a small TorchRec recommender.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for info in sorted(pkgutil.iter_modules(pipelines.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"pipelines.commands.{info.name}")
        module.add_commands(sub, with_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"recdistill: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # constructor checks name the bad argument
        print(f"recdistill: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
