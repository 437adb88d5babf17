"""Teacher caches: what precedes a frozen teacher's question is computed once per example.

A teacher in the committee is frozen (eval mode, no gradients, weights never change), so the
part of its computation that the question does not touch is a fixed function of the example:
the T5 encoder states of the prompt, or an encoder LM's layer-1 token states. A distillation
step calls only ``teacher.middle(question, batch)``; with the cache on, ``middle`` fetches that
context by ``batch.rows`` instead of running the encoder again.

- :class:`ContextCache`: variable-length per-row context ``[len_i, W]`` stored flat in fp16
  within a byte budget; rows that do not fit are recomputed on demand. Counts hits and misses.
- :class:`CachedContextTeacher`: the base of the language teachers; ``freeze()`` sets eval mode,
  turns gradients off and the cache on; ``unfreeze()`` turns the cache off for training (the
  weights then change, and a cache would serve stale states).

Every context served while the cache is on goes through fp16, stored or not, so a teacher's
answers do not depend on whether a row was a hit, a miss, or over the budget.

Example::

    teacher = build_model("t5", prepared).freeze(cache_budget_bytes=256 * 2**20)
    z = teacher.middle(question, batch)   # first time: encoder runs, states cached
    z = teacher.middle(question, batch)   # again: no encoder
    teacher.cache_stats()                 # {"hits": ..., "misses": ..., "bytes_used": ...}
"""

from __future__ import annotations

from typing import Callable

import torch

from recdistill.models.text import TokenTable
from recdistill.stages import StagedModule


class ContextCache:
    """Per-row context tensors ``[len_i, W]`` stored flat in fp16 within ``budget_bytes``.

    Args:
        num_rows: number of row ids (rows are ``0..num_rows-1``).
        width: ``W``, the width of one token's state.
        budget_bytes: the most bytes the stored states may take. Rows are stored first come;
            once full, further rows are computed on every request.
        max_tokens: the most tokens that could ever be stored (sum of all rows' lengths), so
            that a generous budget does not allocate more than the data needs.

    Example::

        cache = ContextCache(num_rows=100_000, width=128, budget_bytes=2**28)
        states = cache.fetch(rows, lengths, compute)  # [B, L, W] float32
    """

    def __init__(self, num_rows: int, width: int, budget_bytes: int, max_tokens: int | None = None):
        if num_rows < 1 or width < 1:
            raise ValueError(f"num_rows and width must be positive, got {num_rows}, {width}")
        if budget_bytes < 0:
            raise ValueError(f"cache_budget_bytes must be >= 0, got {budget_bytes}")
        self.num_rows = num_rows
        self.width = width
        self.budget_bytes = int(budget_bytes)
        capacity = self.budget_bytes // (width * torch.finfo(torch.float16).bits // 8)
        self.capacity = capacity if max_tokens is None else min(capacity, int(max_tokens))
        self.store = torch.empty(0, width, dtype=torch.float16)  # grown on first put
        self.start = torch.full((num_rows,), -1, dtype=torch.long)  # -1: not stored
        self.length = torch.zeros(num_rows, dtype=torch.long)
        self.used = 0
        self.hits = 0
        self.misses = 0

    @property
    def bytes_used(self) -> int:
        return self.used * self.width * 2

    @property
    def rows_stored(self) -> int:
        return int((self.start >= 0).sum())

    def stats(self) -> dict:
        """Hits and misses (in rows), rows stored, bytes used and the budget."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "rows_stored": self.rows_stored,
            "bytes_used": self.bytes_used,
            "budget_bytes": self.budget_bytes,
        }

    def fetch(
        self,
        rows: torch.Tensor,
        lengths: torch.Tensor,
        compute: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The context of ``rows``, from the store where present, else from ``compute``.

        Args:
            rows: ``[B]`` row ids.
            lengths: ``[B]`` real tokens per row; the result has width ``L = lengths.max()``.
            compute: ``compute(index) -> [b, L, W]`` computes the context of ``rows[index]``.

        Returns:
            ``[B, L, W]`` float32, on the device ``compute`` returns; positions past a row's
            length hold zeros when served from the store (they are masked downstream).
        """
        rows = rows.to(torch.long).cpu()
        lengths = lengths.to(torch.long).cpu()
        width = int(lengths.max())
        hit = self.start[rows] >= 0  # [B]
        n_hit = int(hit.sum())
        self.hits += n_hit
        self.misses += len(rows) - n_hit
        out: torch.Tensor | None = None
        if n_hit < len(rows):
            miss = (~hit).nonzero().squeeze(1)
            computed = compute(miss).detach()  # [b, L, W]
            half = computed.to(torch.float16)
            out = torch.empty(len(rows), width, self.width, dtype=torch.float32, device=computed.device)
            out[miss] = half.float()
            self._put(rows[miss], lengths[miss], half.cpu())
        if n_hit:
            index = hit.nonzero().squeeze(1)
            stored = self._get(rows[index], width)
            if out is None:
                return stored
            out[index.to(out.device)] = stored.to(out.device)
        return out

    def _get(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """``[b, width, W]`` float32 of stored rows, zeros past each row's length."""
        positions = torch.arange(width)
        valid = positions < self.length[rows].unsqueeze(1)  # [b, width]
        index = (self.start[rows].unsqueeze(1) + positions).clamp(max=self.used - 1)
        return self.store[index].float() * valid.unsqueeze(-1)

    def _put(self, rows: torch.Tensor, lengths: torch.Tensor, states: torch.Tensor) -> None:
        """Store the first-seen rows of ``states [b, L, W]`` that still fit in the budget."""
        first = torch.ones(len(rows), dtype=torch.bool)
        if len(rows) > 1:  # a row twice in one batch is stored once
            order = torch.argsort(rows, stable=True)
            sorted_rows = rows[order]
            first[order[1:]] = sorted_rows[1:] != sorted_rows[:-1]
        fits = first & (torch.cumsum(lengths * first, 0) <= self.capacity - self.used)
        if not fits.any():
            return
        rows, lengths, states = rows[fits], lengths[fits], states[fits]
        flat = states[torch.arange(states.shape[1]) < lengths.unsqueeze(1)]  # [sum(len), W]
        if self.store.shape[0] < self.used + flat.shape[0]:
            self._grow(self.used + flat.shape[0])
        self.start[rows] = self.used + torch.cumsum(lengths, 0) - lengths
        self.length[rows] = lengths
        self.store[self.used : self.used + flat.shape[0]] = flat
        self.used += flat.shape[0]

    def _grow(self, needed: int) -> None:
        # Double up to the capacity: few copies, and memory only for what was stored.
        size = min(self.capacity, max(needed, 2 * self.store.shape[0], 4096))
        grown = torch.empty(size, self.width, dtype=torch.float16)
        grown[: self.used] = self.store[: self.used]
        self.store = grown


class CachedContextTeacher(StagedModule):
    """A language teacher whose per-example context can be cached once it is frozen.

    Subclasses set ``tokens`` (a :class:`TokenTable`), ``context_width`` and
    ``default_cache_budget_bytes``, and implement ``compute_context(ids, mask) -> [B, L, W]``.
    They read their context through :meth:`context`, which uses the cache when it is on.
    """

    tokens: TokenTable
    context_width: int
    default_cache_budget_bytes: int

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False
        self.context_cache: ContextCache | None = None

    def compute_context(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def freeze(self, cache_budget_bytes: int | None = None) -> "CachedContextTeacher":
        """Freeze as a committee teacher: eval mode, no gradients, context cache on.

        Args:
            cache_budget_bytes: memory for cached context (default: the config's); 0 keeps
                the teacher frozen with no cache.
        """
        budget = self.default_cache_budget_bytes if cache_budget_bytes is None else cache_budget_bytes
        self.frozen = True
        super().train(False)
        self.requires_grad_(False)
        self.context_cache = (
            ContextCache(len(self.tokens), self.context_width, budget, int(self.tokens.lengths.sum()))
            if budget > 0
            else None
        )
        return self

    def unfreeze(self) -> "CachedContextTeacher":
        """Back to trainable: gradients on, cache dropped (the weights will change)."""
        self.frozen = False
        self.context_cache = None
        self.requires_grad_(True)
        return self.train()

    def train(self, mode: bool = True) -> "CachedContextTeacher":
        # A frozen teacher stays in eval mode even when a module holding it is put in training.
        return super().train(mode and not self.frozen)

    def cache_stats(self) -> dict:
        """The cache's counters (all zero when no cache is on)."""
        if self.context_cache is None:
            return {"hits": 0, "misses": 0, "rows_stored": 0, "bytes_used": 0, "budget_bytes": 0}
        return self.context_cache.stats()

    def context(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The context of ``batch``: ``states [B, L, W]`` and its token ``mask [B, L]``."""
        ids, mask = self.tokens.lookup(batch.rows)
        device = self._device()
        ids, mask = ids.to(device), mask.to(device)
        if self.context_cache is None:
            return self.compute_context(ids, mask), mask
        with torch.no_grad():
            states = self.context_cache.fetch(
                batch.rows, mask.sum(1), lambda index: self.compute_context(ids[index], mask[index])
            )
        return states.to(device), mask

    def _device(self) -> torch.device:
        return next(self.parameters()).device
