"""``recdistill promote``: give a registered student the champion alias if it earns it.

Exit status 0 when the version is (or already was) the champion, 1 when it was not promoted
(the reason is printed and written to the version's tags), 2 on bad input. A version promoted
here has its run's TorchScript file copied to its job's ``champion.pt`` when that file is still
on this machine (the registry keeps its own copy either way).
"""

from __future__ import annotations

import argparse
import json


def tracking_config(args: argparse.Namespace):
    """The ``tracking:`` section of the job config (a ratings, clicks or image job's)."""
    from pipelines.vision_config import load_job_config

    cfg = load_job_config(args.config, args.overrides).tracking
    if getattr(args, "model_name", None):
        cfg.registered_model = args.model_name
    return cfg


def cmd_promote(args: argparse.Namespace) -> int:
    from recdistill.tracking import connect, promote, version_of_run

    cfg = tracking_config(args)
    client = connect(cfg, args.tracking_uri)
    version = args.version or version_of_run(cfg, args.run_id, client)
    decision = promote(cfg, version, client)
    champion_file = publish_file_of(decision, client) if decision.promoted else None
    if args.json:
        print(json.dumps({**decision.__dict__, "champion": decision.champion,
                          "champion_file": None if champion_file is None else str(champion_file)}, indent=2))  # fmt: skip
    else:
        print(decision.message)
        if champion_file is not None:
            print(f"champion file: {champion_file}")
    return 0 if decision.promoted else 1


def publish_file_of(decision, client):
    """Copy the promoted version's exported file (its run's ``export.file`` tag) to its job's
    ``champion.pt``; ``None`` when the run names no file here in a finished job's run folder."""
    from pathlib import Path

    from pipelines.engine import FINISHED, publish_champion
    from recdistill.tracking import TAG_EXPORT_FILE

    run_id = client.get_model_version(decision.name, decision.version).run_id
    exported = client.get_run(run_id).data.tags.get(TAG_EXPORT_FILE) if run_id else None
    if not exported or not (Path(exported).is_file() and (Path(exported).parent / FINISHED).is_file()):
        return None
    return publish_champion(Path(exported))


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
