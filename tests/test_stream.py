"""The streaming reader (features/stream.py) on a synthetic MovieLens-shaped set written as
parquet shards: the same rows and encodings as the in-memory path, hashed splits, a shuffle
buffer that mixes chunks, training and evaluation through the same loop, and one shard set per
rank under a process group."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from features.batches import RatingsData, prepare
from features.config import DataConfig
from features.splits import SPLITS
from features.stream import StreamingRatings, split_codes
from features.synth import SynthSpec, write_synthetic
from recdistill.models import build_model
from recdistill.training import TrainConfig, evaluate, train_supervised

SPEC = SynthSpec(rows=20_000, users=300, items=200, seed=3, shard_rows=8_000)
CHUNK = 3_000  # shards of 8000, 8000, 4000 rows in 3000-row chunks: 8 chunks, ragged at shard ends


def synth_config(folder, **overrides) -> DataConfig:
    return DataConfig(interactions=str(folder / "ratings"), users=str(folder / "users.parquet"),
                      items=str(folder / "items.parquet"), features="ml100k", **overrides)  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "synth"
    write_synthetic(out, SPEC)
    return out


@pytest.fixture(scope="module")
def streamed(folder):
    return prepare(synth_config(folder, stream=True, chunk_rows=CHUNK, shuffle_buffer=5_000))


@pytest.fixture(scope="module")
def in_memory(folder, streamed):
    """The same tables read whole, with the stream's vocabularies and its hashed splits."""
    prepared = prepare(synth_config(folder), vocabs=streamed.vocabs)
    codes = split_codes(np.arange(len(prepared.data)), [0.8, 0.1, 0.1], 0)
    prepared.data.splits = {name: torch.from_numpy(np.flatnonzero(codes == i))
                            for i, name in enumerate(SPLITS)}  # fmt: skip
    return prepared


def _same_batch(a, b) -> None:
    assert torch.equal(a.rows, b.rows) and torch.equal(a.labels, b.labels)
    assert a.sparse.keys() == b.sparse.keys()
    assert torch.equal(a.sparse.values(), b.sparse.values())
    assert torch.equal(a.sparse.lengths(), b.sparse.lengths())


def test_the_stream_is_chunked_and_knows_its_split_sizes_without_reading(streamed):
    data = streamed.data
    assert isinstance(data, StreamingRatings) and streamed.movielens.ratings is None
    assert len(data.chunks) == 8 and len(data) == SPEC.rows
    sizes = [len(data.splits[s]) for s in SPLITS]
    assert sum(sizes) == SPEC.rows and abs(sizes[0] / SPEC.rows - 0.8) < 0.02


def test_vocabularies_from_streaming_scans_equal_the_in_memory_build(folder, streamed):
    memory = prepare(synth_config(folder))
    assert {n: v.values for n, v in memory.vocabs.vocabs.items()} == \
        {n: v.values for n, v in streamed.vocabs.vocabs.items()}  # fmt: skip


@pytest.mark.parametrize("split", SPLITS)
def test_the_stream_yields_the_in_memory_rows_in_order(streamed, in_memory, split):
    """Unshuffled, every batch equals the in-memory batch of the same rows: same features,
    same encodings, same labels, across chunk and shard edges."""
    seen = 0
    for batch in streamed.data.batches(split, 1024):
        rows = batch.rows
        _same_batch(batch, in_memory.data.batch(rows))
        seen += len(rows)
    assert seen == len(in_memory.data.splits[split])
    rows = torch.cat([b.rows for b in streamed.data.batches(split, 1024)])
    assert torch.equal(rows, in_memory.data.splits[split])


def test_a_shuffled_epoch_covers_the_split_once_and_mixes_chunks(streamed, in_memory):
    data = streamed.data
    batches = list(data.batches("train", 512, shuffle=True, seed=1))
    rows = torch.cat([b.rows for b in batches])
    assert torch.equal(rows.sort().values, in_memory.data.splits["train"])
    chunk_of = rows // CHUNK  # chunks start every 3000 rows within 8000-row shards: close enough
    assert len(torch.unique(chunk_of[:512])) >= 2  # the first batch draws on several chunks
    again = torch.cat([b.rows for b in data.batches("train", 512, shuffle=True, seed=2)])
    assert not torch.equal(rows, again)
    for batch in batches[:3]:
        _same_batch(batch, in_memory.data.batch(batch.rows))


def test_split_codes_are_fixed_per_row_and_seed():
    rows = np.arange(100_000)
    codes = split_codes(rows, [0.8, 0.1, 0.1], 0)
    assert np.array_equal(codes, split_codes(rows, [0.8, 0.1, 0.1], 0))
    assert not np.array_equal(codes, split_codes(rows, [0.8, 0.1, 0.1], 1))
    shares = np.bincount(codes, minlength=3) / len(rows)
    assert np.allclose(shares, [0.8, 0.1, 0.1], atol=0.005)


def test_training_and_evaluation_on_the_stream_match_the_in_memory_path(streamed, in_memory):
    torch.manual_seed(0)
    model = build_model("mlp_s", streamed, {"id_embedding_dim": 16, "side_embedding_dim": 4})
    result = train_supervised(model, streamed, TrainConfig(epochs=2, batch_size=512, progress=False))
    assert len(result.history) == 2 and result.test["mse"] < 1.5
    for split in ("valid", "test"):
        got, expected = evaluate(model, streamed.data, split), evaluate(model, in_memory.data, split)
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-9, nan_ok=True), key


def test_a_stream_needs_a_random_split_and_its_own_tables(folder):
    with pytest.raises(ValueError, match="data.split: the streaming reader splits at random"):
        synth_config(folder, stream=True, split="temporal")
    with pytest.raises(ValueError, match="data.stream: streams your own tables"):
        DataConfig(stream=True)


def _rank_rows(rank: int, world: int, folder, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = prepare(synth_config(folder, stream=True, chunk_rows=CHUNK, shuffle_buffer=5_000)).data
        steps = data.num_batches("train", 1024)
        batches = list(data.local_batches("train", 1024, shuffle=True, seed=0, train=True))
        torch.save({"steps": steps, "rows": torch.cat([b.rows for _, b in batches]),
                    "sizes": [len(b) for _, b in batches]}, out / f"rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_each_rank_reads_its_own_shards_and_takes_as_many_steps(folder, streamed, in_memory, tmp_path):
    port = 29_500 + os.getpid() % 1000
    mp.start_processes(_rank_rows, args=(2, folder, port, tmp_path), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0
    assert [len(r["sizes"]) for r in ranks] == [ranks[0]["steps"]] * 2
    assert all(size == 512 for r in ranks for size in r["sizes"])  # the global batch halved
    first, second = set(ranks[0]["rows"].tolist()), set(ranks[1]["rows"].tolist())
    assert not first & second  # no row read by both
    assert first | second <= set(in_memory.data.splits["train"].tolist())
    # the ranks stop together at the smaller share, which the deal keeps within a chunk
    assert len(first | second) > 0.85 * len(in_memory.data.splits["train"])
    starts = torch.tensor([c.first for c in streamed.data.chunks])
    owner = torch.tensor(streamed.data.owner(2))
    for rank, rows in enumerate((first, second)):  # every row from a chunk its rank owns
        chunk = torch.searchsorted(starts, torch.tensor(sorted(rows)), right=True) - 1
        assert bool((owner[chunk] == rank).all())
    assert set(owner.tolist()) == {0, 1}


@pytest.mark.slow
def test_the_shipped_synth_job_runs_streamed_end_to_end(folder, tmp_path):
    """`recdistill run synth` on the set written here (tiny budgets): teacher, student alone,
    LD, a TorchScript file whose parity check passed on streamed rows, a registered version."""
    from pipelines.config import load_config
    from pipelines.engine import run_job

    cfg = load_config("synth", [
        f"data.interactions={folder / 'ratings'}", f"data.users={folder / 'users.parquet'}",
        f"data.items={folder / 'items.parquet'}", f"output_dir={tmp_path / 'runs'}",
        f"tracking.local_dir={tmp_path / 'mlflow'}", "train.epochs=1",
        "train.max_steps_per_epoch=5", "train.batch_size=1024", "train.progress=false",
        "export.parity_rows=256",
        "models.mlp_l={id_embedding_dim: 32, side_embedding_dim: 8, hidden: [64, 32]}",
    ])  # fmt: skip
    assert cfg.data.stream and cfg.distill.teachers == ["mlp_l"]
    result = run_job(cfg, tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    roles = [row["role"] for row in result.rows]
    assert roles == ["teacher", "student alone", "distilled (ld)"]
    assert result.export.passed and result.export.rows_checked == 256
    assert result.version == "1"
    served = torch.jit.load(str(result.export.path))
    from recdistill.export import ParityRows

    rows = ParityRows.sample(prepare(cfg.data), 8, "test")
    assert served(*rows.inputs.args).shape == (8,)


def test_csv_shards_stream_the_same_rows_as_parquet_shards(folder, streamed, tmp_path):
    """A CSV shard is one chunk; the rows, encodings and splits are those of the parquet set."""
    import polars as pl

    (tmp_path / "csv").mkdir()
    for shard in sorted((folder / "ratings").glob("*.parquet")):
        pl.read_parquet(shard).write_csv(tmp_path / "csv" / f"{shard.stem}.csv")
    config = DataConfig(interactions=str(tmp_path / "csv"), users=str(folder / "users.parquet"),
                        items=str(folder / "items.parquet"), features="ml100k", stream=True)  # fmt: skip
    csv = prepare(config, vocabs=streamed.vocabs).data
    assert len(csv.chunks) == 3 and len(csv) == SPEC.rows
    for a, b in zip(csv.batches("valid", 4096), streamed.data.batches("valid", 4096)):
        _same_batch(a, b)


def test_per_kind_widths_in_the_job_yaml_reach_the_model(folder):
    features = [{"name": "user_id", "table": "users", "column": "user_id", "kind": "id"},
                {"name": "item_id", "table": "items", "column": "item_id", "kind": "id"},
                {"name": "genres", "table": "items", "column": "genres", "kind": "multi_hot"},
                {"name": "occupation", "table": "users", "column": "occupation",
                 "kind": "categorical", "embedding_dim": 3}]  # fmt: skip
    config = DataConfig(
        interactions=str(folder / "ratings"), users=str(folder / "users.parquet"),
        items=str(folder / "items.parquet"), features=features, stream=True,
        kind_embedding_dims={"id": 12, "multi_hot": 5},
    )  # fmt: skip
    model = build_model("mlp_s", prepare(config))
    dims = dict(zip(model.sparse_arch.features, model.sparse_arch.dims))
    assert dims == {"user_id": 12, "item_id": 12, "occupation": 3, "genres": 5}
