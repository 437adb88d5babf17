"""``recdistill data summary``, ``recdistill data prompts``, ``recdistill data synth`` and
``recdistill data synth-clicks``."""

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
    from features.batches import load_source
    from features.tables import scan_tables
    from features.verbalizer import verbalize

    cfg = data_config(args)
    if cfg.stream:  # the first rows of the log only: it is never read whole
        tables = scan_tables(cfg.interactions, cfg.users, cfg.items)
        spec = cfg.spec_for(tables.name)
        joined = tables.joined(spec.user_key, spec.item_key).head(args.limit).collect()
    else:
        ml = load_source(cfg)
        spec = cfg.spec_for(ml.name)
        joined = ml.joined(spec.user_key, spec.item_key)
    start = time.perf_counter()
    prompts = verbalize(joined, cfg)
    elapsed = time.perf_counter() - start
    for prompt in prompts.head(args.limit).to_list():
        print(prompt)
    print(f"# verbalized {len(prompts):,} ratings in {elapsed:.3f} s", file=sys.stderr)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Write the synthetic set; a size below 1 is named before anything is imported or written."""
    for option in ("rows", "users", "items", "shard_rows"):
        if getattr(args, option) < 1:
            flag = "--" + option.replace("_", "-")
            raise ValueError(f"{flag} must be at least 1 (got {getattr(args, option)})")
    from features.synth import SynthSpec, write_synthetic

    spec = SynthSpec(
        rows=args.rows, users=args.users, items=args.items, seed=args.seed,
        shard_rows=args.shard_rows,
    )  # fmt: skip
    start = time.perf_counter()
    meta = write_synthetic(args.out, spec, force=args.force)
    elapsed = time.perf_counter() - start
    print(
        f"wrote {spec.rows:,} ratings in {meta['shards']} shard(s), {spec.users:,} users, "
        f"{spec.items:,} items to {args.out} in {elapsed:.1f} s"
    )
    return 0


def cmd_synth_clicks(args: argparse.Namespace) -> int:
    """Write the synthetic click log; a size below 1 is named before anything is imported."""
    for option in ("rows", "users", "ads", "shard_rows"):
        if getattr(args, option) < 1:
            flag = "--" + option.replace("_", "-")
            raise ValueError(f"{flag} must be at least 1 (got {getattr(args, option)})")
    from features.click_synth import ClickSynthSpec, write_click_log

    spec = ClickSynthSpec(rows=args.rows, users=args.users, ads=args.ads, seed=args.seed,
                          shard_rows=args.shard_rows)  # fmt: skip
    start = time.perf_counter()
    meta = write_click_log(args.out, spec, force=args.force)
    elapsed = time.perf_counter() - start
    print(
        f"wrote {spec.rows:,} impressions ({meta['click_rate']:.2%} clicked) in {meta['shards']} "
        f"shard(s), {spec.users:,} users, {spec.ads:,} ads to {args.out} in {elapsed:.1f} s; "
        f"feature spec: {args.out}/spec.yaml"
    )
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
    synth = data_sub.add_parser(
        "synth", help="write a synthetic rating log in the MovieLens shape as parquet shards"
    )
    synth.add_argument("--rows", type=int, required=True, help="ratings to write")
    synth.add_argument("--users", type=int, required=True, help="users, ids 1..U")
    synth.add_argument("--items", type=int, required=True, help="items, ids 1..I")
    synth.add_argument("--out", required=True, help="folder to write (must be empty or new)")
    synth.add_argument("--seed", type=int, default=0, help="the same seed gives the same files")
    synth.add_argument("--shard-rows", type=int, default=1_000_000,
                       help="most ratings per parquet shard (default 1,000,000)")  # fmt: skip
    synth.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    synth.set_defaults(func=cmd_synth)
    clicks = data_sub.add_parser(
        "synth-clicks",
        help="write a synthetic ad click log from a known model (its ceiling is known), with "
             "users and ads tables and its feature spec",
    )  # fmt: skip
    clicks.add_argument("--rows", type=int, default=300_000, help="impressions (default 300,000)")
    clicks.add_argument("--users", type=int, default=10_000, help="users (default 10,000)")
    clicks.add_argument("--ads", type=int, default=2_000, help="ads (default 2,000)")
    clicks.add_argument("--out", required=True, help="folder to write (must be empty or new)")
    clicks.add_argument("--seed", type=int, default=0, help="the same seed gives the same files")
    clicks.add_argument("--shard-rows", type=int, default=1_000_000,
                        help="most impressions per parquet shard (default 1,000,000)")  # fmt: skip
    clicks.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    clicks.set_defaults(func=cmd_synth_clicks)
