"""``recdistill train``: supervised training of one registered model, in one or several processes.

    recdistill train --model mlp_l [--config X] [--epochs N] [--seed S] [--out DIR]
    recdistill train --model mlp_s --nproc 2 [--sharding-type row_wise]

With ``--nproc N > 1`` the command relaunches itself under torchrun (``torch.distributed.run
--standalone``): every rank joins a gloo (CPU) or nccl (GPU) group, the embedding tables are
sharded by TorchRec DMP according to the ``sharding:`` section, and rank 0 prints and saves.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_OUT = "runs/train"


def _sections(args: argparse.Namespace):
    """The ``data:``, ``train:``, ``sharding:`` sections and this model's overrides."""
    from pipelines.config import load_config
    from recdistill.sharding import ShardingConfig
    from recdistill.training import TrainConfig

    cfg = load_config(args.config, args.overrides)
    data = cfg.data
    if getattr(args, "source", None):
        data.source = args.source
    train = getattr(cfg, "train", None) or TrainConfig()
    sharding = getattr(cfg, "sharding", None) or ShardingConfig()
    overrides = (getattr(cfg, "models", None) or {}).get(args.model)
    changes = {k: v for k, v in {"epochs": args.epochs, "seed": args.seed}.items() if v is not None}
    if args.max_steps is not None:
        changes["max_steps_per_epoch"] = args.max_steps
    train = dataclasses.replace(train, **changes)
    if args.sharding_type:
        sharding = dataclasses.replace(sharding, sharding_type=args.sharding_type)
    return data, train, sharding, overrides


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _relaunch(args: argparse.Namespace) -> int:
    """Run this same command under torchrun with ``args.nproc`` processes."""
    argv = _without_nproc(sys.argv[1:])  # torchrun would take --nproc as its own option
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.nproc}", "-m", "pipelines.cli", *argv]  # fmt: skip
    env = {**os.environ, "RECDISTILL_UNDER_TORCHRUN": "1"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    print(f"launching {args.nproc} processes: {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, env=env).returncode


def _fmt(metrics: dict) -> str:
    return "  ".join(f"{k.upper()} {v:.4f}" for k, v in metrics.items())


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc > 1 and "RANK" not in os.environ:
        return _relaunch(args)

    from features.batches import prepare
    from recdistill.models import build_model, count_parameters, model_config
    from recdistill.sharding import init_distributed, shard_model
    from recdistill.training import seed_everything, train_supervised

    data_cfg, train, sharding, overrides = _sections(args)
    config = model_config(args.model, overrides)  # an unknown name lists the allowed ones
    out = Path(args.out or train.checkpoint_dir or DEFAULT_OUT) / args.model
    train = dataclasses.replace(train, checkpoint_dir=str(out))
    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world, device = init_distributed(sharding) if distributed else (0, 1, None)
    say = print if rank == 0 else (lambda *a, **k: None)

    prepared = prepare(data_cfg)
    seed_everything(train.seed)
    model = build_model(args.model, prepared, config)
    say(f"model {args.model}: {count_parameters(model):,} trainable parameters")
    if distributed:
        model = shard_model(model, sharding, train, device)
        say(f"sharded {sharding.sharding_type} over {world} ranks ({device.type})")
    if rank == 0:  # serving needs the exact id mapping the model was trained with
        out.mkdir(parents=True, exist_ok=True)
        prepared.vocabs.save(out / "vocabs.json")

    def report(epoch: int, m: dict) -> None:
        valid = "  ".join(f"valid {k[6:].upper()} {m[k]:.4f}" for k in
                          ("valid_mse", "valid_auc", "valid_log_loss", "valid_accuracy") if k in m)  # fmt: skip
        say(f"epoch {epoch:>2}  train loss {m['train_loss']:.4f}  {valid}"
            f"  ({m['examples_per_s']:,.0f} examples/s)")  # fmt: skip

    result = train_supervised(model, prepared, train, on_epoch=report,
                              model_name=args.model, model_config=config)  # fmt: skip
    say(f"best epoch {result.best_epoch}{' (stopped early)' if result.stopped_early else ''}")
    say(f"valid  {_fmt(result.valid)}")
    say(f"test   {_fmt(result.test)}")
    say(f"checkpoint {result.checkpoint}")
    if distributed:
        import torch.distributed as dist

        dist.barrier()  # neither rank tears gloo down while the other still uses it
        dist.destroy_process_group()
    return 0


def add_commands(sub, with_config) -> None:
    # Names are checked when the command runs (a wrong one lists the allowed ones): the
    # registries live with the models, which import torch, and --help must not wait for it.
    train = with_config(sub.add_parser("train", help="train one model on the ratings (supervised)"))
    train.add_argument("--model", required=True,
                       help="registered model (mlp_s, mlp_l, t5, ...; a wrong name lists them all)")
    train.add_argument("--epochs", type=int, help="override train.epochs")
    train.add_argument("--seed", type=int, help="override train.seed (init, shuffling, dropout)")
    train.add_argument("--max-steps", type=int, help="override train.max_steps_per_epoch")
    train.add_argument("--out", help=f"checkpoint folder (default: train.checkpoint_dir, else "
                       f"{DEFAULT_OUT}); files go in OUT/MODEL")  # fmt: skip
    train.add_argument("--nproc", type=int, default=1, help="processes (sharded with TorchRec DMP)")
    train.add_argument("--sharding-type",
                       help="override sharding.sharding_type (table_wise, row_wise, ...)")  # fmt: skip
    train.set_defaults(func=cmd_train)
