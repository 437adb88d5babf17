"""``recdistill export``: write a trained student as a torch-only TorchScript file for serving."""

from __future__ import annotations

import argparse
import json

from pipelines.commands.data import data_config


def export_config(args: argparse.Namespace):
    """The ``export:`` section of the job config."""
    from pipelines.config import load_config

    return load_config(args.config, args.overrides).export


def cmd_export(args: argparse.Namespace) -> int:
    from features.batches import prepare
    from features.vocab import FeatureVocabs
    from recdistill.export import ParityRows, export_torchscript
    from recdistill.models import load_checkpoint

    cfg = export_config(args)
    vocabs = FeatureVocabs.load(args.vocab)
    prepared = prepare(data_config(args), vocabs=vocabs)
    student = load_checkpoint(args.checkpoint, prepared)
    rows = ParityRows.sample(prepared, args.parity_rows or cfg.parity_rows, cfg.parity_split)
    report = export_torchscript(
        student, vocabs, args.out, rows, tolerance=args.tolerance or cfg.tolerance, freeze=cfg.freeze
    )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(
            f"wrote {report.path} ({report.size_bytes / 1e6:.1f} MB); parity on "
            f"{report.rows_checked} {cfg.parity_split} rows: max |diff| {report.max_abs_diff:.3g} "
            f"<= {report.tolerance:g}"
        )
    return 0


def add_commands(sub, with_config) -> None:
    export = with_config(
        sub.add_parser("export", help="export a trained student to TorchScript (torch-only)")
    )
    export.add_argument("--checkpoint", required=True, help="a checkpoint from training (.pt)")
    export.add_argument("--vocab", required=True, help="the vocabularies file it was trained with")
    export.add_argument("--out", required=True, help="the TorchScript file to write")
    export.add_argument("--parity-rows", type=int, help="override export.parity_rows")
    export.add_argument("--tolerance", type=float, help="override export.tolerance")
    export.add_argument("--json", action="store_true", help="print the export report as JSON")
    export.set_defaults(func=cmd_export)
