"""``recdistill train``: one model trained on the job's data, by the job's own stages (prepare,
then the training of one model), in one or several processes.

    recdistill train --model mlp_l [--config X] [--epochs N] [--seed S] [--out DIR]
    recdistill train --model mlp_s --nproc 2 [--sharding-type row_wise] [--backend gloo]

The model is built with ``models.<name>`` and trained with the ``train:`` section into
``OUT/MODEL/`` (``best.pt``, ``last.pt``, ``resume.pt``, ``vocabs.json``). With ``--nproc N > 1``
the command relaunches itself under torchrun (``torch.distributed.run --standalone``): every rank
joins a gloo (CPU) or nccl (GPU) group, the embedding tables are sharded by TorchRec DMP as
``--sharding-type`` says, and rank 0 prints and saves. This is the one sharded command: a whole
job (``recdistill run``) trains in one process (docs/results/scale.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_OUT = "runs/train"


def job_config(args: argparse.Namespace, **train_changes):
    """The job config with ``--set``, ``--source`` and the command's ``train:`` options applied."""
    from pipelines.config import load_config

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "source", None):
        cfg.data.source = args.source
    changes = {k: v for k, v in train_changes.items() if v is not None}
    cfg.train = dataclasses.replace(cfg.train, **changes)
    return cfg


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
    return "  ".join(f"{k.upper()} {v:.4f}" for k, v in metrics.items() if not k.startswith("n_"))


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc > 1 and "RANK" not in os.environ:
        return _relaunch(args)

    from pipelines.domains import domain_for
    from pipelines.engine import JobContext
    from pipelines.engine.stages import load_data
    from pipelines.engine.teachers import train_model
    from recdistill.sharding import ShardingConfig, init_distributed, shard_model

    cfg = job_config(args, epochs=args.epochs, seed=args.seed, max_steps_per_epoch=args.max_steps)
    cfg.model_config(args.model)  # an unknown name lists the allowed ones, before any work
    sharding = ShardingConfig(sharding_type=args.sharding_type, backend=args.backend)
    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world, device = init_distributed(sharding) if distributed else (0, 1, None)
    say = print if rank == 0 else (lambda *a, **k: None)
    out = Path(args.out or cfg.train.checkpoint_dir or DEFAULT_OUT) / args.model

    ctx = JobContext(cfg, domain_for(cfg), out, say=say)
    load_data(ctx, write_files=rank == 0)  # serving needs the id mapping the model trained with

    def shard(model):
        say(f"sharded {sharding.sharding_type} over {world} ranks ({device.type})")
        return shard_model(model, sharding, cfg.train, device)

    _, result = train_model(ctx, args.model, cfg.train, "", ctx.run, cfg.train.seed,
                            shard=shard if distributed else None)  # fmt: skip
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
    train = with_config(sub.add_parser("train", help="train one model on the job's data (supervised)"))
    train.add_argument("--model", required=True,
                       help="registered model (mlp_s, mlp_l, t5, ...; a wrong name lists them all)")
    train.add_argument("--epochs", type=int, help="override train.epochs")
    train.add_argument("--seed", type=int, help="override train.seed (init, shuffling, dropout)")
    train.add_argument("--max-steps", type=int, help="override train.max_steps_per_epoch")
    train.add_argument("--out", help=f"checkpoint folder (default: train.checkpoint_dir, else "
                       f"{DEFAULT_OUT}); files go in OUT/MODEL")  # fmt: skip
    train.add_argument("--nproc", type=int, default=1, help="processes (sharded with TorchRec DMP)")
    train.add_argument("--sharding-type", default="table_wise",
                       help="how --nproc ranks share the tables: table_wise, row_wise, column_wise, "
                            "data_parallel")  # fmt: skip
    train.add_argument("--backend", default="auto", help="process group: auto (nccl on GPU, gloo on CPU), gloo, nccl")
    train.set_defaults(func=cmd_train)
