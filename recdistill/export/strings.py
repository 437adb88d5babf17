"""String normalization and hashing for the served encoders, written so TorchScript compiles
them (and plain Python runs them the same way on ASCII).

A value is looked up as given first; only a miss is normalized: categories and multi-hot values
case-folded and stripped (:func:`fold_case`), ids and prefix columns stripped
(:func:`strip_space`); a prefix is cut by characters (:func:`char_prefix`); an open
vocabulary hashes the value (:func:`hash_index`).
"""

# No `from __future__ import annotations` here: TorchScript reads these annotations at runtime.

from typing import Callable, Dict

import torch

from features.spec import stable_hash, stable_hash_scriptable
from features.vocab import Vocabulary


def strip_space(value: str) -> str:
    """``value`` without surrounding whitespace (spaces, tabs, line breaks): how ids and
    prefix columns are matched when the value as given is unknown."""
    # A loop, not str.strip: TorchScript's default strip leaves "\r", and a "\r" constant
    # cannot be saved (torch.jit.load fails on it).
    start = len(value)
    for i in range(len(value)):
        if not value[i].isspace():
            start = i
            break
    end = start
    for i in range(len(value) - 1, start - 1, -1):
        if not value[i].isspace():
            end = i + 1
            break
    return value[start:end]


def fold_case(value: str) -> str:
    """``value`` stripped and lower-cased (ASCII, as TorchScript lower-cases): how categories
    and multi-hot values (gender, occupation, genre names) are matched."""
    return strip_space(value).lower()


def char_prefix(value: str, length: int) -> str:
    """The first ``length`` characters of ``value``, as polars' ``str.slice`` cuts them in
    training. TorchScript strings are UTF-8 bytes, so there the cut is placed after whole
    characters (a continuation byte is ``0b10xxxxxx``), not after ``length`` bytes."""
    if not torch.jit.is_scripting():
        return value[:length]
    count = 0
    end = 0
    for i in range(len(value)):
        if (ord(value[i]) & 0xC0) != 0x80:  # the first byte of a character
            if count == length:
                break
            count += 1
        end = i + 1
    return value[:end]


def hash_index(value: str, buckets: int) -> int:
    """``1 + stable_hash(value) % buckets``, as training hashes an open vocabulary."""
    if not torch.jit.is_scripting():
        return 1 + stable_hash(value) % buckets
    return 1 + stable_hash_scriptable(value) % buckets


def normalized_index(
    vocab: Vocabulary, normalize: Callable[[str], str], feature: str
) -> Dict[str, int]:
    """``vocab``'s value -> index map keyed by each value as it is and as normalized (by the
    scripted ``normalize``, so the keys are exactly what the scripted forward computes). The
    served module looks a value up as given first, normalizing only when that misses: a
    value spelled as in training costs no normalization, and both keys give the same index.

    Raises:
        ValueError: two values of the vocabulary are one after normalization (named).
    """
    scripted = torch.jit.script(normalize)
    index: Dict[str, int] = {}
    first: Dict[str, str] = {}
    for value, i in vocab.index.items():
        key = scripted(value)
        if key in index:
            raise ValueError(
                f"vocabulary {feature!r} has {first[key]!r} and {value!r}, one value after "
                f"{normalize.__name__} ({key!r}): the served module could not tell them apart"
            )
        index[key] = i
        first[key] = value
    # A value that is another's normalized form would have collided above: no key clashes.
    index.update(vocab.index)
    return index


__all__ = ["char_prefix", "fold_case", "hash_index", "normalized_index", "strip_space"]
