"""Two torchrun "nodes" on this machine (over loopback) train the streamed synthetic set sharded,
and match one process.

Two separate launchers run this file, ``python -m torch.distributed.run --nnodes 2
--nproc_per_node 1 --node_rank {0,1} --master_addr 127.0.0.1 --master_port PORT`` (static
rendezvous, gloo): each "node" is one rank that reads its own chunks of the parquet shards
(features/stream.py deals the training chunks to the ranks) and the tables are sharded
``table_wise`` over the two. One process then takes the same global batches (rank 0's local
batch and rank 1's, in each step) unsharded, and the losses must agree within 1e-4.

This is not a test of separate machines, NCCL or a real network: both "nodes" are processes of
one host, talking over 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH, SEED = 12, 512, 0
SHARDING = "table_wise"
#: 20k ratings in shards of 8000, 8000, 4000 rows, read in 3000-row chunks: 8 chunks, so the
#: reader keeps its chunk size under 2 ranks (it needs 4 a rank) and each rank owns 4.
ROWS, SHARD_ROWS, CHUNK, BUFFER = 20_000, 8_000, 3_000, 5_000
TIMEOUT = 150  # seconds for each launcher


def _data_config(folder: Path):
    from features.config import DataConfig

    return DataConfig(interactions=str(folder / "ratings"), users=str(folder / "users.parquet"),
                      items=str(folder / "items.parquet"), features="ml100k", stream=True,
                      chunk_rows=CHUNK, shuffle_buffer=BUFFER)  # fmt: skip


def _optimizer(model):
    from recdistill.training import TrainConfig, build_optimizer

    return build_optimizer(model, TrainConfig(batch_size=BATCH, embedding_lr=0.05, dense_lr=3e-3))


def _step(model, optimizer, batches) -> torch.Tensor:
    """One step on the mean of the local mean losses of ``batches`` (equal sizes: the mean
    over their rows)."""
    loss = sum(torch.nn.functional.mse_loss(model(b), b.labels) for b in batches) / len(batches)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach().clone()


def _worker() -> None:
    """One rank ("node") of the two-node run (under torchrun)."""
    import faulthandler

    import torch.distributed as dist

    faulthandler.enable()

    from features.batches import prepare
    from recdistill.sharding import ShardingConfig, init_distributed, shard_model
    from recdistill.training import TrainConfig
    from tests.test_sharding import small_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    cfg = ShardingConfig(sharding_type=SHARDING)
    rank, world, device = init_distributed(cfg)
    prepared = prepare(_data_config(Path(args.data)))
    data = prepared.data
    train = TrainConfig(batch_size=BATCH, embedding_lr=0.05, dense_lr=3e-3)
    model = shard_model(small_model(prepared), cfg, train, device)
    tables = model.plan.get_plan_for_module("sparse_arch.ebc")
    plan = {name: [p.sharding_type, p.ranks] for name, p in sorted(tables.items())}
    optimizer = _optimizer(model)
    losses, local_rows = [], []
    batches = data.local_batches("train", BATCH, shuffle=True, seed=SEED, train=True)
    for _, (_, batch) in zip(range(STEPS), batches):
        value = _step(model, optimizer, [batch])
        dist.all_reduce(value)
        losses.append((value / world).item())
        local_rows.append(len(batch))
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK",
                                          "ROLE_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}  # fmt: skip
    record = {"env": env, "rank": rank, "world": world, "pid": os.getpid(), "ppid": os.getppid(),
              "backend": dist.get_backend(), "local_rows": local_rows, "plan": plan,
              "owned_chunks": [i for i, r in enumerate(data.owner(world)) if r == rank]}  # fmt: skip
    if rank == 0:
        record["losses"] = losses
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()  # neither rank tears gloo down while the other still uses it
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip the interpreter teardown that can abort on gloo's threads (test_sharding)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_nodes(folder: Path, out: Path) -> float:
    """Both launchers at once (static rendezvous waits for both); the seconds they took."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    port = _free_port()
    started = time.perf_counter()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
         str(Path(__file__)), "--data", str(folder), "--out", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) for node in (0, 1)]  # fmt: skip
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for node, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"node {node}:\n{log[-3000:]}"
    return time.perf_counter() - started


def _single_process_losses(folder: Path, world: int = 2) -> tuple[list[float], list[list[int]]]:
    """One process, the model unsharded, stepping on each global batch the ranks take: rank 0's
    and rank 1's local batches, read from the chunks each owns, in the order each reads them."""
    from features.batches import prepare
    from tests.test_sharding import small_model

    prepared = prepare(_data_config(folder))
    data = prepared.data
    owners = data.owner(world)
    local = BATCH // world
    streams = []
    for rank in range(world):  # as StreamingRatings._chunks_of and local_batches deal them
        chunks = [c for c, r in zip(data.chunks, owners) if r == rank]
        order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(SEED))
        chunks = [chunks[i] for i in order.tolist()]
        streams.append(data.batches("train", local, shuffle=True, seed=SEED, drop_last=True,
                                    chunks=chunks))  # fmt: skip
    model = small_model(prepared)
    optimizer = _optimizer(model)
    losses, sizes = [], []
    for _, batches in zip(range(STEPS), zip(*streams)):
        losses.append(_step(model, optimizer, list(batches)).item())
        sizes.append([len(b) for b in batches])
    return losses, sizes


@pytest.mark.slow
def test_two_torchrun_nodes_over_loopback_match_one_process(tmp_path):
    from features.synth import SynthSpec, write_synthetic

    folder = tmp_path / "synth"
    write_synthetic(folder, SynthSpec(rows=ROWS, users=300, items=200, seed=3, shard_rows=SHARD_ROWS))
    out = tmp_path / "out"
    out.mkdir()
    seconds = _launch_two_nodes(folder, out)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    print(f"two-node launch took {seconds:.1f} s")
    # two launchers, one rank each: different node (group) ranks, each rank 0 on its node
    assert [r["env"]["GROUP_RANK"] for r in ranks] == ["0", "1"]
    assert [r["env"]["RANK"] for r in ranks] == ["0", "1"]
    assert [r["env"]["LOCAL_RANK"] for r in ranks] == ["0", "0"]
    assert all(r["world"] == 2 and r["backend"] == "gloo" for r in ranks)
    assert ranks[0]["ppid"] != ranks[1]["ppid"]  # started by two separate agents
    # the tables really are split between the two nodes, each whole on one of them
    plan = ranks[0]["plan"]
    assert plan == ranks[1]["plan"] and {t for t, _ in plan.values()} == {SHARDING}
    assert {r for _, ranks_of in plan.values() for r in ranks_of} == {0, 1}
    # each rank read its own chunks, half of every global batch
    assert set(ranks[0]["owned_chunks"]).isdisjoint(ranks[1]["owned_chunks"])
    assert all(r["local_rows"] == [BATCH // 2] * STEPS for r in ranks)

    single, sizes = _single_process_losses(folder)
    assert sizes == [[BATCH // 2, BATCH // 2]] * STEPS
    assert single[-1] < single[0]  # it trains
    two_nodes = ranks[0]["losses"]
    assert len(two_nodes) == STEPS
    assert max(abs(a - b) for a, b in zip(two_nodes, single)) < 1e-4


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker()
