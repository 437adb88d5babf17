"""``recdistill promote``: give a registered student the champion alias if it earns it.

Exit status 0 when the version is (or already was) the champion, 1 when it was not promoted
(the reason is printed and written to the version's tags), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json


def tracking_config(args: argparse.Namespace):
    """The ``tracking:`` section of the job config (defaults when the config has none)."""
    from pipelines.config import load_config
    from recdistill.tracking import TrackingConfig

    cfg = getattr(load_config(args.config, args.overrides), "tracking", None) or TrackingConfig()
    if getattr(args, "model_name", None):
        cfg.registered_model = args.model_name
    return cfg


def cmd_promote(args: argparse.Namespace) -> int:
    from recdistill.tracking import connect, promote, version_of_run

    cfg = tracking_config(args)
    client = connect(cfg, args.tracking_uri)
    version = args.version or version_of_run(cfg, args.run_id, client)
    decision = promote(cfg, version, client)
    if args.json:
        print(json.dumps({**decision.__dict__, "champion": decision.champion}, indent=2))
    else:
        print(decision.message)
    return 0 if decision.promoted else 1


def add_commands(sub, with_config) -> None:
    promote = with_config(
        sub.add_parser("promote", help="promote a registered student to champion if it beats it")
    )
    which = promote.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="the run that logged the student (registered if needed)")
    which.add_argument("--version", help="a version of the registered model")
    promote.add_argument("--tracking-uri", help="MLflow tracking URI (overrides the config and "
                                                "MLFLOW_TRACKING_URI)")  # fmt: skip
    promote.add_argument("--model-name", help="override tracking.registered_model")
    promote.add_argument("--json", action="store_true", help="print the decision as JSON")
    promote.set_defaults(func=cmd_promote)
