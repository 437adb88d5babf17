"""The per-entity cache: what a language teacher's frozen lower layers make of each part.

A rating prompt is a user part and an item part (``features.verbalizer``). A language
teacher's lower layers are frozen and read each part on its own, so their output is a fixed
function of one entity: it is computed once per user and once per item — 943 + 1,682 parts
for ML-100K instead of 100,000 prompts — and every later step gathers it by the batch's
``user_id`` / ``item_id`` indices. This is the precomputed-representation idea of PreTTR
(MacAvaney et al., SIGIR 2020). The frozen cost grows with the number of entities, not with
the number of ratings.

:class:`EntityStates` holds ``[N, L, W]`` states in fp16 in a file, memory-mapped, so many jobs
(and ranks) share one copy through the page cache and memory does not grow with it. The file's
name is a hash of everything the states depend on — the frozen weights and every token of every
part (so the templates, the vocabularies, the tokenizer and ``max_length``) — so a changed input
builds a new file and an unchanged one is reused by every later job, with no staleness check.

Example::

    states = EntityStates.load_or_build(parts.items, encode, key, default_cache_dir(), "items")
    x, mask = states.gather(batch.ids("item_id"))  # [B, L_b, W] float32, [B, L_b]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from recdistill.models.text import EntityTokens

log = logging.getLogger(__name__)

#: Bumped when the layout of a cache file or the meaning of its key changes.
CACHE_FORMAT = 1
CACHE_ENV = "RECDISTILL_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$RECDISTILL_CACHE_DIR`` if set, else ``~/.cache/recdistill/entity_states``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path.home() / ".cache" / "recdistill" / "entity_states"


def weights_digest(modules: Iterable[nn.Module]) -> str:
    """A hash of every parameter and buffer of ``modules`` (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            value = tensor.detach().cpu().contiguous()
            h.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
            h.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return h.hexdigest()


def cache_key(*parts: str) -> str:
    """The file name of a cache: a short hash of its description and digests."""
    return hashlib.sha256("|".join([f"format={CACHE_FORMAT}", *parts]).encode()).hexdigest()[:32]


class EntityStates:
    """Per-entity token states ``[N, L, W]`` (fp16, memory-mapped), one part of every prompt.

    Args:
        states: ``[N, L, W]`` float16 (a memory map of the cache file).
        tokens: the part's tokens (their lengths say which positions are real).
        path: the file the states live in.
        built: True when this object computed the states, False when it found them on disk.
        seconds: how long building (or loading) took.
    """

    def __init__(self, states: torch.Tensor, tokens: EntityTokens, path: Path, built: bool, seconds: float):
        self.states = states
        self.tokens = tokens
        self.path = path
        self.built = built
        self.seconds = seconds

    @property
    def width(self) -> int:
        return int(self.states.shape[2])

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """States of entities ``index`` ``[B]``: ``[B, L_b, W]`` float32 and mask ``[B, L_b]`` int64.

        ``L_b`` is the longest part among them; positions past a part's length hold padding
        states and are masked.
        """
        index = self.tokens.check(index)
        lengths = self.tokens.lengths[index]
        width = int(lengths.max()) if len(index) else 1
        mask = (torch.arange(width) < lengths.unsqueeze(1)).to(torch.long)
        return self.states[index, :width].float(), mask

    @classmethod
    def load_or_build(
        cls,
        tokens: EntityTokens,
        encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        key: str,
        cache_dir: str | Path,
        desc: str,
        batch_size: int = 256,
        progress: bool = True,
    ) -> "EntityStates":
        """The states of every entity of ``tokens``: from ``cache_dir/<key>.f16`` if there, else built.

        Args:
            tokens: the part's tokens (one row per entity).
            encode: ``encode(ids [b, L], mask [b, L]) -> [b, L, W]``, the frozen layers.
            key: the file name (:func:`cache_key` of what the states depend on).
            cache_dir: where cache files live (created if missing).
            desc: what is being built, for the progress bar and the log.
            batch_size: entities per ``encode`` call while building.
            progress: show a progress bar while building.
        """
        start = time.perf_counter()
        cache_dir = Path(cache_dir)
        path, meta_path = cache_dir / f"{key}.f16", cache_dir / f"{key}.json"
        states = cls._load(path, meta_path, len(tokens), tokens.max_length)
        if states is not None:
            log.info("%s: reused %s", desc, path)
            return cls(states, tokens, path, False, time.perf_counter() - start)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        n, length = len(tokens), tokens.max_length
        out: np.memmap | None = None
        with torch.no_grad():
            bar = tqdm(total=n, desc=f"caching {desc}", unit="entity", leave=False, disable=not progress)
            for lo in range(0, n, batch_size):
                index = torch.arange(lo, min(lo + batch_size, n))
                ids, mask = tokens.lookup(index)
                encoded = encode(ids, mask).to(torch.float16).cpu()  # [b, L_b, W]
                if out is None:
                    out = np.memmap(tmp, dtype=np.float16, mode="w+", shape=(n, length, encoded.shape[2]))
                out[lo : lo + len(index), : encoded.shape[1]] = encoded.numpy()
                bar.update(len(index))
            bar.close()
        assert out is not None
        width = out.shape[2]
        out.flush()
        del out
        meta = {"format": CACHE_FORMAT, "shape": [n, length, width], "desc": desc,
                "built_seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
        meta_tmp = meta_path.with_name(f"{meta_path.name}.{os.getpid()}.tmp")
        meta_tmp.write_text(json.dumps(meta))
        tmp.replace(path)  # the data first: a meta file always describes a complete file
        meta_tmp.replace(meta_path)
        seconds = time.perf_counter() - start
        log.info("%s: built %d entities in %.1f s -> %s", desc, n, seconds, path)
        return cls(cls._load(path, meta_path, n, length), tokens, path, True, seconds)

    @staticmethod
    def _load(path: Path, meta_path: Path, n: int, length: int) -> torch.Tensor | None:
        if not (path.is_file() and meta_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            shape = tuple(meta["shape"])
        except (ValueError, KeyError, TypeError):
            return None
        numel = int(np.prod(shape))
        if shape[:2] != (n, length) or path.stat().st_size != 2 * numel:
            log.warning("cache file %s does not match its tokens; rebuilding it", path)
            return None
        return torch.from_file(str(path), shared=False, size=numel, dtype=torch.float16).view(shape)


def encode_unique(
    tokens: EntityTokens,
    index: torch.Tensor,
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode each distinct entity of ``index`` ``[B]`` once and gather: ``[B, L_b, W]``, ``[B, L_b]``.

    What a teacher whose part encoder is still training does instead of the cache: a batch of
    1,024 ratings holds a few hundred distinct users and items, each encoded once.
    """
    index = tokens.check(index)
    distinct, inverse = torch.unique(index, return_inverse=True)
    ids, mask = tokens.lookup(distinct)
    states = encode(ids.to(device), mask.to(device))  # [U, L_b, W]
    inverse = inverse.to(states.device)
    return states[inverse], mask.to(states.device)[inverse]


@dataclass
class ContextBatch:
    """A batch that carries the teacher's context (the joined states before the question).

    ``early`` and ``middle`` of the same teacher read ``states``/``mask`` instead of
    gathering and running the layers before the question again (``with_context``).
    """

    batch: Any
    states: torch.Tensor  # [B, L, W]
    mask: torch.Tensor  # [B, L]
    owner: int  # id() of the teacher that computed it

    def __len__(self) -> int:
        return len(self.batch)

    def __getattr__(self, name: str) -> Any:  # labels, rows, ids(), sparse ...
        return getattr(self.batch, name)
