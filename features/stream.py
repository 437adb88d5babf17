"""Interactions streamed from parquet (or CSV) shards into KeyedJaggedTensor batches, never all
in memory.

The interactions are cut into *chunks* (``chunk_rows`` rows of one shard file; a CSV file is one
chunk). A chunk is read (only the columns the spec needs), joined with the user and item tables
(held in memory: they are small next to the log), encoded by the vocabularies, and its rows of
the wanted split go to a *shuffle buffer*; when the buffer holds ``shuffle_buffer`` rows it is
permuted and cut into batches. Chunks are visited in a seeded order per epoch, so a shuffled
epoch mixes rows across the whole buffer and across shards, while memory stays that of one
buffer, whatever the number of rows.

Splits are assigned per row from a hash of its global row number and the split seed
(``splitmix64``), so every reader, rank and epoch agrees on them without reading anything, and
split sizes are known up front. (The in-memory :class:`features.encoded.RatingsData` keeps its
seeded permutation, so the ML-100K figures do not move; the two are different random splits of
the same kind.)

Under a process group, training chunks are dealt to the ranks (each in turn to the rank with
the fewest training rows so far): each rank reads its own shards. Every rank takes the same number of steps (the
smallest rank's), as collective sharded lookups need. Evaluation reads every chunk of its split
on every rank and scores this rank's slice of each global batch, as the in-memory path does.

Example::

    stream = prepare(DataConfig(interactions="logs/*.parquet", ..., stream=True)).data
    for batch in stream.batches("train", 8192, shuffle=True, seed=0):
        ...                      # a features.encoded.Batch; batch.rows are global row numbers
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import torch

from features.encoded import LABEL_TASKS, Batch, MultiHot, RatingsData
from features.config import DataConfig
from features.sources import DataError
from features.splits import SPLITS
from features.tables import Tables
from features.vocab import FeatureVocabs

#: Rows read at a time from one shard (a chunk), and rows shuffled together (the buffer).
CHUNK_ROWS = 262_144
SHUFFLE_BUFFER = 1_048_576


def split_codes(rows: np.ndarray, fractions: list[float], seed: int) -> np.ndarray:
    """``0`` (train), ``1`` (valid) or ``2`` (test) for each global row number, from
    ``splitmix64(row + seed * golden)``: uniform, fixed per row and seed, no state."""
    with np.errstate(over="ignore"):
        z = rows.astype(np.uint64) + np.uint64(seed + 1) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
    train, valid = fractions[0], fractions[0] + fractions[1]
    return (u >= train).astype(np.int8) + (u >= valid).astype(np.int8)


@dataclass(frozen=True)
class Chunk:
    """Rows ``start .. start + rows`` of one shard file; ``first`` is the global number of its
    first row."""

    file: Path
    start: int
    rows: int
    first: int


class SplitSize:
    """The size of a streamed split (its rows are never listed)."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


class StreamingRatings:
    """A data set of the training protocol (``splits``, ``num_batches``, ``local_batches``,
    ``task``, ``sizes``) that reads its interactions chunk by chunk.

    Args:
        tables: the source tables (lazy scans; ``files["interactions"]`` are the shards).
        vocabs: the vocabularies (with the spec).
        config: the data config (split fractions and seed; the split must be ``random``).
        chunk_rows: rows read at a time from a shard.
        shuffle_buffer: rows shuffled together.

    Raises:
        DataError: a temporal split, or interactions without shard files.
    """

    deterministic = True

    def __init__(self, tables: Tables, vocabs: FeatureVocabs, config: DataConfig,
                 chunk_rows: int = CHUNK_ROWS, shuffle_buffer: int = SHUFFLE_BUFFER):  # fmt: skip
        if config.split != "random":
            raise DataError("data.split: the streaming reader splits at random per row; a "
                            f"{config.split!r} split needs the whole table in memory")  # fmt: skip
        files = tables.files.get("interactions") or []
        if not files:
            raise DataError("the streaming reader needs interaction files (parquet or CSV shards)")
        self.vocabs = vocabs
        self.spec = spec = vocabs.spec
        self.fractions = list(config.split_fractions)
        self.seed = config.seed
        self.chunk_rows = chunk_rows
        self.shuffle_buffer = shuffle_buffer
        self.sizes = vocabs.sizes
        self.single_names = spec.single_names
        self.keys = list(spec.kjt_names)
        self.task = LABEL_TASKS[spec.label.kind]
        self.columns = self._interaction_columns()
        self.users = self._side_table(tables.users, "users", spec.user_key)
        self.items = self._side_table(tables.items, "items", spec.item_key)
        self.chunks = self._chunks(files)
        _, world = _world()
        if world > 1 and len(self.chunks) < 4 * world:  # enough chunks for every rank to own some
            self.chunk_rows = max(1, -(-max(c.rows for c in self.chunks) // (4 * world)))
            self.chunks = self._chunks(files)
        self.n_rows = sum(c.rows for c in self.chunks)
        # [chunks, 3]: each chunk's train / valid / test rows, hashed once (no row is read)
        self.chunk_splits = np.stack([np.bincount(self._codes(c), minlength=3) for c in self.chunks])
        self.splits = {name: SplitSize(int(n)) for name, n in zip(SPLITS, self.chunk_splits.sum(0))}
        self._train_counts: dict[str, torch.Tensor] = {}
        self._owners: dict[int, list[int]] = {}
        self._label_range: tuple[float, float] | None = None

    # ------------------------------------------------------------------ setup
    def _interaction_columns(self) -> list[str]:
        spec = self.spec
        needed = [spec.label.column] + [f.column for f in spec.on_table("interactions")]
        needed += [spec.user_key] if spec.on_table("users") else []
        needed += [spec.item_key] if spec.on_table("items") else []
        return list(dict.fromkeys(needed))

    def _side_table(self, frame: pl.LazyFrame | None, table: str, key: str) -> pl.DataFrame | None:
        features = self.spec.on_table(table)
        if not features:
            return None
        columns = list(dict.fromkeys([key] + [f.column for f in features]))
        return frame.select(columns).collect()

    def _chunks(self, files: list[Path]) -> list[Chunk]:
        chunks, first = [], 0
        for file in files:
            if file.suffix in (".parquet", ".pq"):
                rows = pl.scan_parquet(file).select(pl.len()).collect().item()  # from the footer
                step = self.chunk_rows
            else:  # a CSV shard is read whole
                rows = pl.scan_csv(file).select(pl.len()).collect().item()
                step = max(rows, 1)
            for start in range(0, rows, step):
                n = min(step, rows - start)
                chunks.append(Chunk(file, start, n, first + start))
            first += rows
        return chunks

    def _codes(self, chunk: Chunk) -> np.ndarray:
        return split_codes(np.arange(chunk.first, chunk.first + chunk.rows), self.fractions, self.seed)

    # ------------------------------------------------------------------ reading
    def read_chunk(self, chunk: Chunk, split: str | None) -> RatingsData:
        """One chunk encoded (only the rows of ``split``; all with ``None``), as a small
        :class:`RatingsData` whose ``rows`` attribute holds the global row numbers."""
        return self._read(chunk, split)[1]

    def sample(self, split: str, count: int) -> tuple[pl.DataFrame, Batch]:
        """The first ``count`` rows of ``split`` (fewer if it is smaller): their joined raw
        values (for the served module's inputs) and their batch."""
        frames, parts, held = [], [], 0
        for chunk in self.chunks:
            frame, part = self._read(chunk, split)
            frames.append(frame)
            parts.append(part)
            held += len(part)
            if held >= count:
                break
        data = _concat(parts)
        positions = torch.arange(min(count, len(data)))
        return pl.concat(frames).head(count), _batch(data, positions)

    def _read(self, chunk: Chunk, split: str | None) -> tuple[pl.DataFrame, RatingsData]:
        if chunk.file.suffix in (".parquet", ".pq"):
            frame = pl.scan_parquet(chunk.file).select(self.columns).slice(chunk.start, chunk.rows)
        else:
            frame = pl.scan_csv(chunk.file).select(self.columns)
        frame = frame.collect()
        rows = np.arange(chunk.first, chunk.first + frame.height)
        if split is not None:
            keep = self._codes(chunk)[: frame.height] == SPLITS.index(split)
            frame, rows = frame.filter(pl.Series(keep)), rows[keep]
        spec = self.spec
        if self.users is not None:
            frame = frame.join(self.users, on=spec.user_key, how="left", maintain_order="left")
        if self.items is not None:
            frame = frame.join(self.items, on=spec.item_key, how="left", maintain_order="left")
        try:
            data = RatingsData.encode(frame, self.vocabs)
        except DataError as err:  # a bad value: say which shard it came from
            raise DataError(f"{chunk.file}: {err}") from err
        data.rows = torch.from_numpy(rows.astype(np.int64))
        return frame, data

    def owner(self, world: int) -> list[int]:
        """The rank that reads each training chunk under ``world`` ranks: each chunk in turn
        goes to the rank with the fewest training rows so far (ties to the lower rank), so the
        ranks' shares differ by less than a chunk and little is left over at an epoch's end."""
        if world not in self._owners:
            held = [0] * world
            owners = []
            for train_rows in self.chunk_splits[:, SPLITS.index("train")].tolist():
                rank = min(range(world), key=lambda r: (held[r], r))
                owners.append(rank)
                held[rank] += train_rows
            self._owners[world] = owners
        return self._owners[world]

    def _chunks_of(self, train: bool, shuffle: bool, seed: int) -> list[Chunk]:
        """The chunks this rank reads, in a seeded order when shuffled: under a process group
        training chunks are dealt by :meth:`owner`; evaluation reads them all."""
        rank, world = _world()
        chunks = list(self.chunks)
        if train and world > 1:
            chunks = [c for c, r in zip(chunks, self.owner(world)) if r == rank]
        if shuffle:
            order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed))
            chunks = [chunks[i] for i in order.tolist()]
        return chunks

    def batches(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False, chunks: list[Chunk] | None = None) -> Iterator[Batch]:  # fmt: skip
        """Batches of ``split`` (rows in file order without ``shuffle``; with it, chunks in a
        seeded order and rows permuted within each shuffle buffer)."""
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; expected one of {', '.join(self.splits)}")
        chunks = self.chunks if chunks is None else chunks
        gen = torch.Generator().manual_seed(seed)
        pending: list[RatingsData] = []
        held = 0
        for chunk in chunks:
            part = self.read_chunk(chunk, split)
            if len(part) == 0:
                continue
            pending.append(part)
            held += len(part)
            if held >= (self.shuffle_buffer if shuffle else batch_size):
                buffer = _concat(pending)
                order = torch.randperm(len(buffer), generator=gen) if shuffle else torch.arange(len(buffer))
                full = len(buffer) // batch_size * batch_size
                for start in range(0, full, batch_size):
                    yield _batch(buffer, order[start : start + batch_size])
                rest = order[full:]
                pending = [_select(buffer, rest.sort().values)] if len(rest) else []
                held = len(rest)
        if held:  # the last buffer: its full batches, then the rest unless dropped
            buffer = _concat(pending)
            order = torch.randperm(len(buffer), generator=gen) if shuffle else torch.arange(len(buffer))
            stop = len(buffer) // batch_size * batch_size if drop_last else len(buffer)
            for start in range(0, stop, batch_size):
                yield _batch(buffer, order[start : start + batch_size])

    def local_batches(self, split: str, batch_size: int, shuffle: bool, seed: int,
                      train: bool = False) -> Iterator[tuple[int, Batch]]:  # fmt: skip
        """``(rows of the global batch, this rank's batch)``: training batches of ``batch_size /
        world`` rows from this rank's own chunks, as many as the smallest rank has; evaluation
        batches of ``batch_size`` rows from every chunk, each rank scoring its slice."""
        rank, world = _world()
        chunks = self._chunks_of(train, shuffle, seed)
        if train and world > 1:
            local = max(batch_size // world, 1)
            steps = self.num_batches(split, batch_size)
            batches = self.batches(split, local, shuffle, seed, drop_last=True, chunks=chunks)
            for _, batch in zip(range(steps), batches):
                yield local * world, batch
            return
        for batch in self.batches(split, batch_size, shuffle, seed, chunks=chunks):
            positions = torch.arange(len(batch)).tensor_split(world)[rank]
            yield len(batch), batch if world == 1 else batch.select_rows(positions)

    def num_batches(self, split: str, batch_size: int) -> int:
        """Global steps of a pass over ``split``; under a process group, training takes the
        smallest rank's count of full local batches."""
        _, world = _world()
        if world == 1:
            return -(-len(self.splits[split]) // batch_size)
        local = max(batch_size // world, 1)
        per_rank = np.zeros(world, dtype=np.int64)  # dealt as _chunks_of deals them
        np.add.at(per_rank, self.owner(world), self.chunk_splits[:, SPLITS.index(split)])
        return int(per_rank.min()) // local

    # ------------------------------------------------------------------ what evaluation needs
    def __len__(self) -> int:
        return self.n_rows

    def _training_pass(self) -> None:
        spec = self.spec
        features = [n for n in (spec.entity_feature("user"), spec.entity_feature("item")) if n]
        counts = {name: torch.zeros(self.sizes[name], dtype=torch.int64) for name in features}
        low, high, total = float("inf"), float("-inf"), 0.0
        for chunk in self.chunks:
            part = self.read_chunk(chunk, "train")
            if len(part) == 0:
                continue
            for name in features:
                counts[name] += torch.bincount(part.entity_ids(name), minlength=self.sizes[name])
            low = min(low, float(part.labels.min()))
            high = max(high, float(part.labels.max()))
            total += float(part.labels.double().sum())
        if not len(self.splits["train"]):
            raise ValueError("the training split is empty")
        self._train_counts, self._label_range = counts, (low, high)
        self._label_mean = total / len(self.splits["train"])

    def train_counts(self, feature: str) -> torch.Tensor:
        """``[V]`` training rows of each id of ``feature`` (one pass, then cached)."""
        if not self._train_counts:
            self._training_pass()
        return self._train_counts[feature]

    def label_mean(self) -> float:
        """The mean training label (one pass, then cached)."""
        if self._label_range is None:
            self._training_pass()
        return self._label_mean

    def label_range(self) -> tuple[float, float]:
        """The lowest and highest training label (one pass, then cached)."""
        if self._label_range is None:
            self._training_pass()
        return self._label_range


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _concat(parts: list[RatingsData]) -> RatingsData:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    multi = {}
    for name in first.multi:
        width = max(p.multi[name].padded.shape[1] for p in parts)
        padded = [torch.nn.functional.pad(p.multi[name].padded, (0, width - p.multi[name].padded.shape[1]))
                  for p in parts]  # fmt: skip
        multi[name] = MultiHot(torch.cat(padded), torch.cat([p.multi[name].lengths for p in parts]))
    data = RatingsData(torch.cat([p.single for p in parts]), multi,
                       torch.cat([p.labels for p in parts]), {}, first.sizes, first.single_names,
                       first.task)  # fmt: skip
    data.rows = torch.cat([p.rows for p in parts])
    return data


def _select(data: RatingsData, positions: torch.Tensor) -> RatingsData:
    multi = {n: MultiHot(m.padded[positions], m.lengths[positions]) for n, m in data.multi.items()}
    out = RatingsData(data.single[positions], multi, data.labels[positions], {}, data.sizes,
                      data.single_names, data.task)  # fmt: skip
    out.rows = data.rows[positions]
    return out


def _batch(buffer: RatingsData, positions: torch.Tensor) -> Batch:
    batch = buffer.batch(positions)
    return Batch(batch.sparse, batch.labels, buffer.rows[positions])


__all__ = ["CHUNK_ROWS", "SHUFFLE_BUFFER", "Chunk", "StreamingRatings", "split_codes"]
