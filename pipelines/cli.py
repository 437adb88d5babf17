"""The ``recdistill`` command line; each command group lives in ``pipelines/commands/``.

Building the parser imports no torch, polars or MLflow (``--help`` answers at once): each
command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

import pipelines.commands
import recdistill  # noqa: F401  (sets OpenMP's passive wait before any command loads torch)


def with_config(
    parser: argparse.ArgumentParser, config_option: bool = True
) -> argparse.ArgumentParser:
    """Add the options every job command shares.

    Args:
        parser: the command's parser.
        config_option: add ``--config`` (``recdistill run`` takes the config as its argument).
    """
    if config_option:
        parser.add_argument("--config", default="default", help="job YAML, or a shipped config name")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY.PATH=VALUE",
                        help="override one config value, given as YAML (--set train.epochs=3); "
                             "repeatable")  # fmt: skip
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
    except (ValueError, ConnectionError, FileNotFoundError) as err:
        # Bad input: ConfigError and DataError (both ValueErrors, named here by their base so
        # that parsing imports neither layer), the constructor checks that name what is wrong,
        # a tracking server that does not answer (TrackingUnavailable, a ConnectionError), and a
        # data set that is not there (its message says how to get it).
        print(f"recdistill: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
