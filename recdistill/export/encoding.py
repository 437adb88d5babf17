"""The encoding table that travels beside the AOTInductor package: how raw values become the
indices the compiled program takes, in a plain text form that Python and C++ both read.

The package holds the numeric path only (``torch.export`` takes tensors), so the caller encodes.
:func:`write_encoding` writes, from the same :class:`recdistill.export.FeatureEncoder` the
TorchScript file carries, one block per input feature::

    recdistill-encoding 1
    single 7 bags 1                       # columns of the [B, F1] index matrix; bag inputs
    feature user_id numbers integer 0 0 0 0 0 943
    1\t1                                  # raw value, tab, index (one line per known value)
    ...
    feature age numbers bounds 2 0 0 0 0 7
    -inf\t1                               # bucket: lowest value it takes, index
    feature gender strings string 3 1 0 0 0 4
    M\t2                                  # keys: each value as trained, and as normalized
    feature genres strings multi 0 1 0 0 0 36

The header of a block: name, input dictionary, rule (``integer``: exact integer keys;
``bounds``: the bucket of the largest lower bound at or below the value; ``floor``: the value
floored to a multiple of ``width``, then exact float keys; ``string``; ``multi``: a multi-hot
bag's values), its column in the index matrix (its bag for ``multi``), fold (1: case-fold on
a miss), prefix length (0: none), hash buckets (0: a stored vocabulary), width, entry count.
Strings are percent-escaped (``%``, tab, line feed, carriage return: ``%25 %09 %0A %0D``);
floats as Python's ``repr`` writes them (read back exactly by ``strtod``). A row's encoding, per feature:

- ``integer``: the key's index, else 0; with hash buckets ``1 + fnv1a32(decimal) % buckets``;
- ``bounds`` / ``floor``: NaN is 0;
- ``string`` / ``multi``: the value cut to ``length`` characters, looked up; on a miss, the
  value without surrounding ASCII whitespace (and ASCII lower-cased when ``fold``), cut, looked
  up again, else 0; with hash buckets ``1 + fnv1a32(cut value) % buckets``;
- a multi-hot feature's flat values become its bag's values, and ``lengths`` its bag starts.

:class:`TableEncoder` is that reader in Python (dictionaries and numpy, no TorchScript);
``serving_encoder.h`` beside this module is the same reader in C++ (header only, libtorch).

Example::

    write_encoding(FeatureEncoder(prepared.vocabs), "runs/student.encoding.txt")
    encoder = TableEncoder.load("runs/student.encoding.txt")
    single, bag_values, bag_offsets = encoder(*serving_inputs(joined, prepared.vocabs).args)
"""

from __future__ import annotations

import bisect
import math
from pathlib import Path

import numpy as np
import torch

from features.spec import stable_hash
from recdistill.export.encoders import (
    BucketEncoder, FeatureEncoder, IntegerEncoder, MultiHotEncoder, StringEncoder, check_integer,
    check_names, check_rank, lengths_error,
)  # fmt: skip

MAGIC = "recdistill-encoding 1"
#: What TorchScript's (and C's) ``isspace`` strips: ASCII whitespace only.
ASCII_SPACE = " \t\n\v\f\r"
_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_ESCAPES = (("%", "%25"), ("\t", "%09"), ("\n", "%0A"), ("\r", "%0D"))
#: The C++ reader, shipped beside this module.
CPP_HEADER = Path(__file__).with_name("serving_encoder.h")


def escape(value: str) -> str:
    for raw, code in _ESCAPES:
        value = value.replace(raw, code)
    return value


def unescape(value: str) -> str:
    for raw, code in reversed(_ESCAPES):
        value = value.replace(code, raw)
    return value


def _number(x: float) -> str:
    return repr(float(x)) if math.isfinite(x) else ("-inf" if x < 0 else "inf")


def _block(encoder: torch.nn.Module, column: int) -> list[str]:
    """The header and entry lines of one feature's encoder."""
    if isinstance(encoder, MultiHotEncoder):
        inner: StringEncoder = encoder.values
        head = ["strings", "multi", column, int(inner.fold), inner.length, inner.buckets, 0]
        entries = [f"{escape(k)}\t{i}" for k, i in inner.index.items()]
    elif isinstance(encoder, StringEncoder):
        head = ["strings", "string", column, int(encoder.fold), encoder.length, encoder.buckets, 0]
        entries = [f"{escape(k)}\t{i}" for k, i in encoder.index.items()]
    elif isinstance(encoder, IntegerEncoder):
        head = ["numbers", "integer", column, 0, 0, encoder.buckets, 0]
        entries = [f"{k}\t{v}" for k, v in zip(encoder.keys.tolist(), encoder.values.tolist())]
    elif isinstance(encoder, BucketEncoder) and encoder.width > 0:
        head = ["numbers", "floor", column, 0, 0, 0, _number(encoder.width)]
        entries = [f"{_number(k)}\t{v}" for k, v in zip(encoder.keys.tolist(), encoder.values.tolist())]
    elif isinstance(encoder, BucketEncoder):
        lower = [-math.inf] + encoder.bounds.tolist()
        head = ["numbers", "bounds", column, 0, 0, 0, 0]
        entries = [f"{_number(b)}\t{i}" for b, i in zip(lower, encoder.bucket_index.tolist())]
    else:
        raise ValueError(f"no encoding rule for {type(encoder).__name__}")
    return [" ".join(map(str, ["feature", encoder.name, *head, len(entries)]))] + entries


def write_encoding(encoder: FeatureEncoder, path: str | Path) -> Path:
    """Write the encoding table of ``encoder`` (every input feature, KJT order) to ``path``."""
    path = Path(path)
    lines = [MAGIC, f"single {len(encoder.single)} bags {len(encoder.multi)}"]
    for column, feature in enumerate(encoder.single):
        lines += _block(feature, column)
    for bag, feature in enumerate(encoder.multi):
        lines += _block(feature, bag)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


#: Up to this many rows a number is encoded value by value in Python (a dictionary lookup is
#: ~0.1 us, a numpy call on a tiny array ~1-3 us); above it, by numpy over the whole column.
SMALL_BATCH = 16


class _Rule:
    """One feature's encoding, read from its block: per-value dictionaries (small batches,
    strings) and sorted numpy keys (large batches of numbers)."""

    def __init__(self, header: list[str], entries: list[str]):
        _, self.name, self.dict, self.rule, column, fold, length, buckets, width, _ = header
        self.column, self.fold, self.length = int(column), fold == "1", int(length)
        self.buckets, self.width = int(buckets), float(width)
        pairs = [line.split("\t") for line in entries]
        if self.rule in ("string", "multi"):
            self.index = {unescape(k): int(i) for k, i in pairs}
            self.prefixes = {k: i for k, i in self.index.items() if len(k) == self.length and k.isascii()}
            return
        parse = int if self.rule == "integer" else float
        self.keys = np.array([parse(k) for k, _ in pairs], dtype=np.int64 if parse is int else np.float64)
        self.values = np.array([int(i) for _, i in pairs], dtype=np.int64)
        self.index = dict(zip(self.keys.tolist(), self.values.tolist()))  # integer, floor
        self.lower = self.keys.tolist()  # bounds: each bucket's lowest value, ascending

    def _miss(self, value: str) -> int:
        cut = value[: self.length] if self.length else value
        i = self.index.get(cut, -1)
        if i >= 0:
            return i
        value = value.strip(ASCII_SPACE)
        if self.fold:
            value = value.translate(_LOWER)
        return self.index.get(value[: self.length] if self.length else value, 0)

    def strings(self, raw: list[str]) -> list[int]:
        if self.buckets:
            cut = [v[: self.length] for v in raw] if self.length else raw
            return [1 + stable_hash(v) % self.buckets for v in cut]
        if self.length:
            found = [self.prefixes.get(v[: self.length], -1) for v in raw]
        else:
            found = [self.index.get(v, -1) for v in raw]
        if found and min(found) < 0:  # rare: spelled otherwise, unknown, or a non-ASCII prefix
            found = [i if i >= 0 else self._miss(v) for i, v in zip(found, raw)]
        return found

    def numbers(self, raw: torch.Tensor) -> list[int] | np.ndarray:
        label = f"numbers['{self.name}']"
        if self.rule == "integer":
            check_integer(label, raw)
            if self.buckets:
                return [1 + stable_hash(str(v)) % self.buckets for v in raw.tolist()]
            if raw.numel() <= SMALL_BATCH:
                return [self.index.get(v, 0) for v in raw.tolist()]
            return _sorted_lookup(self.keys, self.values, raw.numpy().astype(np.int64, copy=False))
        check_rank(label, raw)
        if raw.is_complex() or raw.dtype == torch.bool:
            raise ValueError(f"serving input {label} must be a real number tensor (integer or floating-point)")
        if raw.numel() <= SMALL_BATCH:
            return [self._number(float(v)) for v in raw.tolist()]
        x = raw.numpy().astype(np.float64, copy=False)
        if self.rule == "floor":
            found = _sorted_lookup(self.keys, self.values, np.floor(x / self.width) * self.width)
        else:
            found = self.values[np.searchsorted(self.keys, x, side="right") - 1]
        return np.where(np.isnan(x), 0, found)

    def _number(self, x: float) -> int:
        if math.isnan(x):
            return 0
        if self.rule == "floor":  # an infinite value floors to no known key
            return self.index.get(math.floor(x / self.width) * self.width, 0) if math.isfinite(x) else 0
        return int(self.values[bisect.bisect_right(self.lower, x) - 1])


def _bag_starts(name: str, counts: torch.Tensor, values: int) -> torch.Tensor:
    """``[B]`` where each row's bag starts, refused unless the counts are non-negative integers
    adding up to the ``values`` flat values (as :func:`recdistill.export.encoders.check_lengths`)."""
    check_integer(f"lengths['{name}']", counts)
    c = counts.numpy().astype(np.int64, copy=False)
    if c.size <= SMALL_BATCH:
        listed = c.tolist()
        bad = (len(listed) > 0 and min(listed) < 0) or sum(listed) != values
    else:
        bad = bool((c < 0).any()) or int(c.sum()) != values
    if bad:
        raise ValueError(lengths_error(name, values))
    return torch.from_numpy(np.cumsum(c) - c)


def _sorted_lookup(keys: np.ndarray, values: np.ndarray, raw: np.ndarray) -> np.ndarray:
    if keys.size == 0:
        return np.zeros(raw.shape, dtype=np.int64)
    pos = np.minimum(np.searchsorted(keys, raw), keys.size - 1)
    return np.where(keys[pos] == raw, values[pos], 0)


class TableEncoder:
    """Raw values -> the compiled program's inputs, from an encoding table (:func:`write_encoding`),
    in plain Python: the same answers as the TorchScript file's encoder, the same checks and
    error messages, without the TorchScript interpreter.

    Args:
        single: per column of the ``[B, F1]`` index matrix, its rule.
        bags: per multi-hot input feature, its rule.
    """

    def __init__(self, single: list[_Rule], bags: list[_Rule]):
        self.single, self.bags = single, bags
        self.number_names = [r.name for r in single if r.dict == "numbers"]
        self.string_names = [r.name for r in single if r.dict == "strings"] + [r.name for r in bags]
        self.length_names = [r.name for r in bags]
        self.labels = [f"{r.dict}['{r.name}']" for r in single + bags]

    @classmethod
    def load(cls, path: str | Path) -> "TableEncoder":
        """Read an encoding table.

        Raises:
            ValueError: not an encoding table (named).
        """
        path = Path(path)
        lines = path.read_text(encoding="utf-8").split("\n")
        if not lines or lines[0] != MAGIC:
            raise ValueError(f"{path}: not a recdistill encoding table (first line {lines[0][:40]!r})")
        _, n_single, _, n_bags = lines[1].split()
        rules, at = [], 2
        while at < len(lines) and lines[at].startswith("feature "):
            header = lines[at].split(" ")
            count = int(header[-1])
            rules.append(_Rule(header, lines[at + 1 : at + 1 + count]))
            at += 1 + count
        if len(rules) != int(n_single) + int(n_bags):
            raise ValueError(f"{path}: {len(rules)} feature blocks, the header says {int(n_single) + int(n_bags)}")
        return cls(rules[: int(n_single)], rules[int(n_single) :])

    def __call__(self, numbers: dict[str, torch.Tensor], strings: dict[str, list[str]],
                 lengths: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
        """``([B, F1] indices, per bag [V] values, per bag [B] starts)``, as ``FeatureEncoder``.

        Raises:
            ValueError: an input of the wrong name, rank, dtype, type or row count (named).
        """
        if sorted(numbers) != sorted(self.number_names) or sorted(strings) != sorted(self.string_names) \
                or sorted(lengths) != sorted(self.length_names):  # fmt: skip
            for label, given, names in (("numbers", numbers, self.number_names),
                                        ("strings", strings, self.string_names),
                                        ("lengths", lengths, self.length_names)):  # fmt: skip
                check_names(label, sorted(given), names, self.number_names, self.string_names)
        columns = [r.numbers(numbers[r.name]) if r.dict == "numbers" else r.strings(strings[r.name])
                   for r in self.single]  # fmt: skip
        bag_values, bag_offsets = [], []
        for r in self.bags:
            raw = strings[r.name]
            bag_values.append(torch.from_numpy(np.array(r.strings(raw), dtype=np.int64)))
            bag_offsets.append(_bag_starts(r.name, lengths[r.name], len(raw)))
        rows = [len(c) for c in columns] + [len(o) for o in bag_offsets]
        for i in range(1, len(rows)):
            if rows[i] != rows[0]:
                raise ValueError(f"serving input {self.labels[i]} has {rows[i]} rows, {self.labels[0]} has {rows[0]}")
        if not columns:
            return torch.zeros(rows[0], 0, dtype=torch.int64), bag_values, bag_offsets
        single = np.array(columns, dtype=np.int64).T.copy()  # [B, F1], row-major
        return torch.from_numpy(single), bag_values, bag_offsets

    def unknowns(self, numbers: dict[str, torch.Tensor], strings: dict[str, list[str]],
                 lengths: dict[str, torch.Tensor]) -> dict[str, int]:  # fmt: skip
        """Per input feature, how many values map to the unknown index 0 (as ``FeatureEncoder``)."""
        single, bag_values, _ = self(numbers, strings, lengths)
        unknown = (single == 0).sum(0).tolist()
        counts = {r.name: int(n) for r, n in zip(self.single, unknown)}
        counts.update({r.name: int((v == 0).sum()) for r, v in zip(self.bags, bag_values)})
        return counts


__all__ = ["CPP_HEADER", "TableEncoder", "write_encoding"]
