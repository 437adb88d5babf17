"""The feature spec: each feature declared once (table, column, kind, vocabulary policy).

A spec is the ``data.features`` part of a job YAML, or a shipped file under
``features/specs/`` (``ml100k``, ``ml1m``). Training batches, the verbalizer and the served
module all derive a feature from its one declaration here, so they cannot drift apart.

Kinds (the raw string value(s) a feature takes, before its vocabulary maps them to indices)::

    id           the column cast to a string (user and item ids)
    categorical  the column cast to a string (gender, occupation)
    multi_hot    a list column, or a string column split on ``separator`` (genres, tags)
    bucketized   a number bucketed by ``boundaries`` (optional ``labels``) or floored to a
                 multiple of ``width`` (age groups, release-year buckets, prices)
    prefix       the first ``length`` characters of the column (zip prefix)
    history      implicit feedback (SVD++): the values of an interactions ``column`` over the
                 TRAINING interactions of the row's ``key`` entity (``key`` names an id
                 feature): "the items this user rated" (column item_id, key user_id) or "the
                 users who rated this item"; capped at ``max_length`` per entity (the latest by
                 ``order_by`` when given), pooled by ``pooling`` (``sqrt``: sum / sqrt(n), the
                 default; ``mean``; ``sum``). No valid or test interaction ever reaches it.

Vocabulary policy: ``min_count`` (values seen fewer times are unknown), ``max_size`` (keep the
most frequent), or ``hash_buckets`` for open vocabularies (a value's index is
``1 + stable_hash(value) % hash_buckets``). Index 0 is "unknown" under every policy.

Every error names its key path (``data.features[3].kind: unknown kind 'bucket'; ...``) and is
raised while the spec is built, before any data is read.

Example::

    spec = load_spec("ml100k")
    raw = joined.select(feature_exprs(spec))  # one string (or list) column per feature
"""

from __future__ import annotations

import difflib
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import polars as pl
import yaml

SPECS_DIR = Path(__file__).resolve().parent / "specs"
TABLES: tuple[str, ...] = ("interactions", "users", "items")
KINDS: tuple[str, ...] = ("id", "categorical", "multi_hot", "bucketized", "prefix", "history")
#: How a history bag is pooled: ``sqrt`` (sum / sqrt(n), SVD++'s normalization), ``mean``, ``sum``.
HISTORY_POOLINGS: tuple[str, ...] = ("sqrt", "mean", "sum")
LABEL_KINDS: tuple[str, ...] = ("rating", "click")
#: The parameters each kind accepts; any other kind parameter on a feature is an error.
KIND_PARAMETERS: dict[str, tuple[str, ...]] = {
    "id": (),
    "categorical": (),
    "multi_hot": ("separator",),
    "bucketized": ("boundaries", "labels", "width"),
    "prefix": ("length",),
    "history": ("key", "max_length", "pooling", "order_by"),
}
_ALL_KIND_PARAMETERS = ("separator", "boundaries", "labels", "width", "length", "key", "max_length",
                        "pooling", "order_by")  # fmt: skip


class SpecError(ValueError):
    """A feature spec that cannot work; the message starts with the offending key path."""


def _fail(key: str, message: str) -> None:
    raise SpecError(f"{key}: {message}")


def _check_type(key: str, value: Any, kind: type | tuple[type, ...], what: str) -> None:
    # bool is an int in Python, never a valid count, width or boundary here.
    if isinstance(value, bool) or not isinstance(value, kind):
        _fail(key, f"expected {what}, got {value!r}")


def _check_positive_int(key: str, value: Any, minimum: int = 1) -> None:
    _check_type(key, value, int, "an integer")
    if value < minimum:
        _fail(key, f"must be at least {minimum}, got {value}")


def _one_of(key: str, value: Any, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        _fail(key, f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


@dataclass
class FeatureSpec:
    """One feature: where its raw value comes from and how it becomes vocabulary indices.

    Args:
        name: the feature's name (KeyedJaggedTensor key, served-module input key).
        table: ``interactions``, ``users`` or ``items``.
        column: the source column in that table.
        kind: ``id``, ``categorical``, ``multi_hot``, ``bucketized`` or ``prefix``.
        separator: multi_hot only: split a string column on it (without it the column is a list).
        boundaries: bucketized only: increasing upper bounds; value ``v`` falls in bucket ``i``
            when ``boundaries[i-1] <= v < boundaries[i]`` (``len(boundaries) + 1`` buckets).
        labels: bucketized only, with boundaries: one name per bucket (default ``"<b0"``,
            ``"[b0,b1)"``, ..., ``">=bk"``).
        width: bucketized only, instead of boundaries: floor to multiples of ``width``.
        length: prefix only: how many leading characters to keep.
        key: history only: the id feature whose entity the history belongs to (``user_id``:
            the row's user's training interactions).
        max_length: history only: keep at most this many values per entity (default: all).
        pooling: history only: ``sqrt`` (default), ``mean`` or ``sum``.
        order_by: history only: an interactions column; with ``max_length`` the entity's
            latest values by it are kept (default: the first in file order).
        min_count: values seen fewer times are unknown (default 1: every value seen).
        max_size: keep at most this many values, the most frequent.
        hash_buckets: an open vocabulary of this many hashed indices (no min_count/max_size).
        embedding_dim: this feature's embedding width (default: the spec's, then the model's).
    """

    name: str
    table: str
    column: str
    kind: str
    separator: str | None = None
    boundaries: list[float] | None = None
    labels: list[str] | None = None
    width: int | None = None
    length: int | None = None
    key: str | None = None
    max_length: int | None = None
    pooling: str | None = None
    order_by: str | None = None
    min_count: int | None = None
    max_size: int | None = None
    hash_buckets: int | None = None
    embedding_dim: int | None = None

    def __post_init__(self) -> None:
        for key in ("name", "table", "column", "kind"):
            _check_type(key, getattr(self, key), str, "a string")
        if not self.name:
            _fail("name", "must not be empty")
        _one_of("table", self.table, TABLES, "table")
        _one_of("kind", self.kind, KINDS, "kind")
        allowed = KIND_PARAMETERS[self.kind]
        for key in _ALL_KIND_PARAMETERS:
            if getattr(self, key) is not None and key not in allowed:
                takes = f"takes {', '.join(allowed)}" if allowed else "takes no parameters"
                _fail(key, f"not a parameter of kind {self.kind!r} ({self.kind} {takes})")
        getattr(self, f"_check_{self.kind}", lambda: None)()
        for key in ("min_count", "max_size", "hash_buckets", "embedding_dim"):
            if getattr(self, key) is not None:
                _check_positive_int(key, getattr(self, key))
        if self.hash_buckets is not None:
            together = [k for k in ("min_count", "max_size") if getattr(self, k) is not None]
            if together:
                _fail("hash_buckets", f"an open (hashed) vocabulary takes no {together[0]}; "
                      "give either hash_buckets or min_count/max_size")  # fmt: skip

    def _check_multi_hot(self) -> None:
        if self.separator is not None:
            _check_type("separator", self.separator, str, "a string")
            if not self.separator:
                _fail("separator", "must not be empty")

    def _check_bucketized(self) -> None:
        if (self.boundaries is None) == (self.width is None):
            _fail("kind", "bucketized takes either boundaries or width (exactly one)")
        if self.width is not None:
            _check_positive_int("width", self.width)
            if self.labels is not None:
                _fail("labels", "labels go with boundaries, not with width")
            return
        _check_type("boundaries", self.boundaries, list, "a list of numbers")
        if not self.boundaries:
            _fail("boundaries", "must hold at least one number")
        for i, bound in enumerate(self.boundaries):
            _check_type(f"boundaries[{i}]", bound, (int, float), "a number")
            if not math.isfinite(bound):
                _fail(f"boundaries[{i}]", f"must be finite, got {bound!r}")
            if i and bound <= self.boundaries[i - 1]:
                _fail(f"boundaries[{i}]", f"boundaries must increase, got {self.boundaries[i - 1]} "
                      f"then {bound}")  # fmt: skip
        if self.labels is not None:
            _check_type("labels", self.labels, list, "a list of strings")
            for i, label in enumerate(self.labels):
                _check_type(f"labels[{i}]", label, str, "a string")
            if len(self.labels) != len(self.boundaries) + 1:
                n = len(self.boundaries)
                got = len(self.labels)
                _fail("labels", f"{n} boundaries make {n + 1} buckets, got {got} labels")
            if len(set(self.labels)) != len(self.labels):
                _fail("labels", f"labels must be distinct, got {self.labels}")

    def _check_history(self) -> None:
        if self.table != "interactions":
            _fail("table", f"a history is built from the interactions (the training rows), not "
                  f"from table {self.table!r}")  # fmt: skip
        if self.key is None:
            _fail("key", "missing: kind 'history' needs the id feature whose entity it belongs to "
                  "(e.g. key: user_id for the items each user interacted with)")  # fmt: skip
        _check_type("key", self.key, str, "a feature name")
        if self.max_length is not None:
            _check_positive_int("max_length", self.max_length)
        if self.pooling is not None:
            _one_of("pooling", self.pooling, HISTORY_POOLINGS, "pooling")
        if self.order_by is not None:
            _check_type("order_by", self.order_by, str, "a column name")
        if self.hash_buckets is not None:
            _fail("hash_buckets", "a history's values need a stored vocabulary (no hash_buckets)")

    def _check_prefix(self) -> None:
        if self.length is None:
            _fail("length", "missing: kind 'prefix' needs the number of leading characters")
        _check_positive_int("length", self.length)

    @property
    def multi_valued(self) -> bool:
        """Several values per row (pooled by the embedding bag): a multi-hot list, or a history."""
        return self.kind in ("multi_hot", "history")

    @property
    def history_pooling(self) -> str:
        """How a history bag is pooled (``sqrt`` unless set)."""
        return self.pooling or "sqrt"

    @property
    def bucket_labels(self) -> list[str] | None:
        """The bucket names of a bucketized-by-boundaries feature, in bucket order."""
        if self.boundaries is None:
            return None
        if self.labels is not None:
            return list(self.labels)
        b = [_number(x) for x in self.boundaries]
        return [f"<{b[0]}"] + [f"[{lo},{hi})" for lo, hi in zip(b, b[1:])] + [f">={b[-1]}"]

    @property
    def vocab_min_count(self) -> int:
        return 1 if self.min_count is None else self.min_count


def _number(x: float) -> str:
    """``18`` for 18 and 18.0, ``2.5`` for 2.5: how a boundary reads in a default label."""
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass
class LabelSpec:
    """What a model predicts.

    Args:
        column: the interactions column holding the label.
        kind: ``rating`` (regression, MSE) or ``click`` (binary 0/1, log loss, AUC).
    """

    column: str
    kind: str = "rating"

    def __post_init__(self) -> None:
        _check_type("column", self.column, str, "a string")
        _one_of("kind", self.kind, LABEL_KINDS, "label kind")

    @property
    def loss(self) -> str:
        return {"rating": "mse", "click": "bce"}[self.kind]

    @property
    def metrics(self) -> tuple[str, ...]:
        return {"rating": ("rmse", "mae"), "click": ("auc", "log_loss")}[self.kind]


@dataclass
class LoggedScoreSpec:
    """A column of the interactions holding another model's prediction of the label (a
    production model's score, logged beside each impression): a prediction-only committee
    member, named in ``distill.teachers`` by ``name``.

    Args:
        name: the member's name in the committee (not a feature's or a registered model's).
        column: the interactions column: a rating prediction, or on a click label the
            predicted click probability (0..1).
    """

    name: str
    column: str

    def __post_init__(self) -> None:
        _check_type("name", self.name, str, "a string")
        _check_type("column", self.column, str, "a string")


@dataclass
class DataSpec:
    """The features of a data set, in order, and its label.

    Args:
        features: the features, in KeyedJaggedTensor key order.
        label: the label column and kind.
        user_key: the users table's key, also a column of the interactions.
        item_key: the items table's key, also a column of the interactions.
        embedding_dim: default width for features that name none.
        kind_embedding_dims: default width per kind (before ``embedding_dim``).
        logged_scores: columns of another model's predictions, each a prediction-only
            committee member (:class:`LoggedScoreSpec`); never features of any model.
    """

    features: list[FeatureSpec]
    label: LabelSpec
    user_key: str = "user_id"
    item_key: str = "item_id"
    embedding_dim: int | None = None
    kind_embedding_dims: dict[str, int] = field(default_factory=dict)
    logged_scores: list[LoggedScoreSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_type("features", self.features, list, "a list of features")
        if not self.features:
            _fail("features", "a spec needs at least one feature")
        first: dict[str, int] = {}
        for i, feature in enumerate(self.features):
            if feature.name in first:
                _fail(f"features[{i}].name", f"duplicate feature name {feature.name!r} (also "
                      f"features[{first[feature.name]}])")  # fmt: skip
            first[feature.name] = i
        for i, feature in enumerate(self.features):
            if feature.kind != "history":
                continue
            key = self.features[first[feature.key]] if feature.key in first else None
            if key is None or key.kind != "id" or key.hash_buckets is not None:
                ids = [f.name for f in self.features if f.kind == "id" and f.hash_buckets is None]
                _fail(f"features[{i}].key", f"history {feature.name!r} belongs to {feature.key!r}, "
                      f"which is not an id feature with a stored vocabulary (those: "
                      f"{', '.join(ids) or 'none'})")  # fmt: skip
        _check_type("logged_scores", self.logged_scores, list, "a list of {name, column}")
        seen: dict[str, int] = {}
        for i, logged in enumerate(self.logged_scores):
            if logged.name in seen or logged.name in first:
                other = f"logged_scores[{seen[logged.name]}]" if logged.name in seen else "a feature"
                _fail(f"logged_scores[{i}].name", f"{logged.name!r} is taken by {other}")
            seen[logged.name] = i
            if logged.column == self.label.column:
                _fail(f"logged_scores[{i}].column", f"{logged.column!r} is the label itself, not "
                      "another model's prediction of it")  # fmt: skip
            used = [f.name for f in self.features if f.table == "interactions" and f.column == logged.column]
            if used:
                _fail(f"logged_scores[{i}].column", f"{logged.column!r} is also read by feature "
                      f"{used[0]!r}: a logged score is a committee member, never an input")  # fmt: skip
        if self.embedding_dim is not None:
            _check_positive_int("embedding_dim", self.embedding_dim)
        _check_type("kind_embedding_dims", self.kind_embedding_dims, dict, "a mapping")
        for kind, dim in self.kind_embedding_dims.items():
            _one_of(f"kind_embedding_dims.{kind}", kind, KINDS, "kind")
            _check_positive_int(f"kind_embedding_dims.{kind}", dim)

    @property
    def names(self) -> tuple[str, ...]:
        """Feature names in spec order."""
        return tuple(f.name for f in self.features)

    @property
    def histories(self) -> tuple[FeatureSpec, ...]:
        """The history features, in spec order."""
        return tuple(f for f in self.features if f.kind == "history")

    @property
    def multi_hot(self) -> frozenset[str]:
        """Names of the multi-valued features."""
        return frozenset(f.name for f in self.features if f.multi_valued)

    @property
    def kjt_names(self) -> tuple[str, ...]:
        """Feature names in KeyedJaggedTensor key order: the single-valued features in spec
        order, then the multi-valued ones. Models concatenate pooled embeddings in this order."""
        return self.single_names + self.multi_names

    @property
    def single_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features if not f.multi_valued)

    @property
    def multi_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features if f.multi_valued)

    def entity_feature(self, part: str) -> str | None:
        """The id feature of the users (``part="user"``) or items table: the kind-``id`` feature
        reading that table's key (from either table), or None when the spec has none."""
        table, key = ("users", self.user_key) if part == "user" else ("items", self.item_key)
        for f in self.features:
            if f.kind == "id" and f.column == key and f.table in (table, "interactions"):
                return f.name
        return None

    def to_dict(self) -> dict[str, Any]:
        """The spec as a mapping :func:`spec_from_dict` reads back (unset keys left out)."""
        def clean(obj: Any) -> dict[str, Any]:
            return {k: v for k, v in asdict(obj).items() if v is not None}

        out: dict[str, Any] = {
            "label": clean(self.label), "user_key": self.user_key, "item_key": self.item_key,
            "features": [clean(f) for f in self.features],
        }  # fmt: skip
        if self.embedding_dim is not None:
            out["embedding_dim"] = self.embedding_dim
        if self.kind_embedding_dims:
            out["kind_embedding_dims"] = dict(self.kind_embedding_dims)
        return out

    def __getitem__(self, name: str) -> FeatureSpec:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(f"no feature {name!r} in the spec (has {', '.join(self.names)})")

    def on_table(self, table: str) -> list[FeatureSpec]:
        return [f for f in self.features if f.table == table]

    def embedding_dims(self, fallback: dict[str, int] | None = None) -> dict[str, int]:
        """Each feature's width: its own, else the spec's for its kind, else the spec's
        default, else ``fallback[kind]`` (a model's defaults, e.g. ``{"id": 640, ...}``).

        Raises:
            SpecError: a feature whose width nothing gives (named).
        """
        fallback = fallback or {}
        dims = {}
        for i, f in enumerate(self.features):
            dim = f.embedding_dim or self.kind_embedding_dims.get(f.kind) or self.embedding_dim
            dim = dim or fallback.get(f.kind)
            if dim is None:
                _fail(f"features[{i}].embedding_dim", f"no width for {f.name!r}: set it, "
                      "or the spec's embedding_dim or kind_embedding_dims")  # fmt: skip
            dims[f.name] = dim
        return dims


# ---------------------------------------------------------------------------------------------
# Building a spec from a mapping (YAML), with key paths


def _build(cls: type, data: Any, path: str, convert: dict[str, Any] | None = None) -> Any:
    """``cls(**data)``; an unknown key (with the nearest allowed one), a missing field, or an
    error of ``cls``'s own checks fails naming its key path under ``path``."""
    if not isinstance(data, dict):
        _fail(path, f"expected a mapping ({cls.__name__}), got {data!r}")
    allowed = [f.name for f in fields(cls)]
    for key in data:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            _fail(f"{path}.{key}", f"unknown key{hint}; allowed keys: {', '.join(allowed)}")
    required = [f.name for f in fields(cls) if f.default is f.default_factory is MISSING]
    for key in required:
        if key not in data:
            _fail(f"{path}.{key}", f"missing required key ({cls.__name__} needs "
                  f"{', '.join(required)})")  # fmt: skip
    kwargs = dict(data)
    for key, build in (convert or {}).items():
        if key in kwargs:
            kwargs[key] = build(kwargs[key], f"{path}.{key}")
    try:
        return cls(**kwargs)
    except SpecError as err:  # cls names the key relative to itself
        raise SpecError(f"{path}.{err}") from None



def _build_features(data: Any, path: str) -> list[FeatureSpec]:
    if not isinstance(data, list):
        _fail(path, f"expected a list of features, got {data!r}")
    return [_build(FeatureSpec, item, f"{path}[{i}]") for i, item in enumerate(data)]


def spec_from_dict(data: Any, path: str = "data") -> DataSpec:
    """A validated :class:`DataSpec` from a mapping (``features``, ``label``, ...).

    Args:
        data: the mapping, as loaded from YAML.
        path: its key path in the whole config, for error messages.

    Raises:
        SpecError: the first bad key or value, named by its key path.
    """
    return _build(DataSpec, data, path, {
        "features": _build_features,
        "label": lambda value, key: _build(LabelSpec, value, key),
        "logged_scores": _build_logged_scores,
    })  # fmt: skip


def _build_logged_scores(value: Any, key: str) -> list[LoggedScoreSpec]:
    if not isinstance(value, list):
        _fail(key, f"expected a list of {{name, column}}, got {value!r}")
    return [_build(LoggedScoreSpec, item, f"{key}[{i}]") for i, item in enumerate(value)]


def load_spec(name_or_path: str | Path) -> DataSpec:
    """A shipped spec by name (``"ml100k"``, ``"ml1m"``) or a spec YAML file by path.

    Raises:
        SpecError: no such spec (naming the shipped ones), or a bad key (with its key path).
    """
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = SPECS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))
        raise SpecError(f"no feature spec at {name_or_path!r}: give a path to a spec YAML or "
                        f"a shipped name ({', '.join(shipped)})")  # fmt: skip
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML ({err})") from err
    try:
        return spec_from_dict(data, "data")
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Checking the data against the spec, before any work


def check_columns(spec: DataSpec, schemas: dict[str, dict[str, Any]]) -> None:
    """Fail unless every feature's column (and the label and keys) exists with a usable dtype.

    Args:
        spec: the spec.
        schemas: ``{table: {column: polars dtype}}``, e.g. ``{"users": lf.collect_schema()}``
            for each lazy scan: no data is read.

    Raises:
        SpecError: names the feature (by key path), the missing column, and the columns that
            exist; or a column whose dtype the kind cannot use.
    """

    def need(key: str, what: str, table: str, column: str) -> Any:
        if table not in schemas:
            _fail(key, f"{what} reads table {table!r}, which the source lacks (has "
                  f"{', '.join(schemas) or 'no tables'})")  # fmt: skip
        if column not in schemas[table]:
            _fail(key, f"{what} reads column {column!r}, which table {table!r} lacks (its "
                  f"columns: {', '.join(schemas[table])})")  # fmt: skip
        return schemas[table][column]

    need("data.label.column", "the label", "interactions", spec.label.column)
    for i, logged in enumerate(spec.logged_scores):
        dtype = need(f"data.logged_scores[{i}].column", f"logged score {logged.name!r}", "interactions",
                     logged.column)  # fmt: skip
        if not dtype.is_numeric():
            _fail(f"data.logged_scores[{i}].column", f"logged score {logged.name!r} must be numeric; "
                  f"column {logged.column!r} is {dtype}")  # fmt: skip
    for key, table in (("user_key", "users"), ("item_key", "items")):
        if table in schemas:
            need(f"data.{key}", f"the {table} key", "interactions", getattr(spec, key))
            need(f"data.{key}", f"the {table} key", table, getattr(spec, key))
    for i, f in enumerate(spec.features):
        key = f"data.features[{i}].column"
        dtype = need(key, f"feature {f.name!r}", f.table, f.column)
        if f.kind == "multi_hot" and f.separator is None and not isinstance(dtype, pl.List):
            _fail(key, f"feature {f.name!r} is multi_hot without a separator, so column "
                  f"{f.column!r} must be a list; it is {dtype} (a separator splits strings)")
        if f.kind == "multi_hot" and f.separator is not None and dtype != pl.Utf8:
            _fail(key, f"feature {f.name!r} splits column {f.column!r} on {f.separator!r}, so it "
                  f"must be a string; it is {dtype}")  # fmt: skip
        if f.kind == "history" and f.order_by is not None:
            need(f"data.features[{i}].order_by", f"history {f.name!r}", "interactions", f.order_by)
        if f.kind == "bucketized" and not dtype.is_numeric():
            _fail(key, f"feature {f.name!r} is bucketized, so column {f.column!r} must be "
                  f"numeric; it is {dtype}")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Raw values: one expression per feature


def feature_expr(feature: FeatureSpec) -> pl.Expr:
    """The raw string value of ``feature`` per row (a list of strings for multi_hot), from its
    column, aliased to its name. Nulls stay null (the vocabulary maps them to 0). A history's
    expression is the row's own value of its column: its bags are gathered from the training
    rows' values (:mod:`features.history`).

    Args:
        feature: the feature.

    Returns:
        A polars expression over a frame holding ``feature.column``.
    """
    col = pl.col(feature.column)
    if feature.kind in ("id", "categorical", "history"):  # a history: the row's own value
        expr = col.cast(pl.Utf8)
    elif feature.kind == "prefix":
        expr = col.cast(pl.Utf8).str.slice(0, feature.length)
    elif feature.kind == "multi_hot":
        if feature.separator is None:
            expr = col.cast(pl.List(pl.Utf8))
        else:  # "a||b|" has no empty tags
            parts = col.str.split(feature.separator)
            expr = parts.list.eval(pl.element().filter(pl.element() != ""))
    elif feature.width is not None:
        # Floored, then printed as an integer: 1995 and 1995.0 are one bucket, "1995".
        floored = (col // feature.width) * feature.width
        expr = floored.cast(pl.Int64, strict=False).cast(pl.Utf8)
    else:
        expr = _boundary_buckets(col, feature.boundaries, feature.bucket_labels)
    return expr.alias(feature.name)


def _boundary_buckets(col: pl.Expr, boundaries: list[float], labels: list[str]) -> pl.Expr:
    # NaN compares below nothing: without this it would land in the last bucket; it is missing
    # (unknown), as the served module treats it.
    expr = pl.when(col.is_null() | col.cast(pl.Float64).is_nan()).then(None)
    for upper, label in zip(boundaries, labels):
        expr = expr.when(col < upper).then(pl.lit(label))
    return expr.otherwise(pl.lit(labels[-1]))


def feature_exprs(spec: DataSpec, table: str | None = None) -> list[pl.Expr]:
    """:func:`feature_expr` of every feature in spec order (only ``table``'s when given)."""
    return [feature_expr(f) for f in spec.features if table is None or f.table == table]


# ---------------------------------------------------------------------------------------------
# Hashed (open) vocabularies

def stable_hash(value: str) -> int:
    """32-bit FNV-1a of the UTF-8 bytes of ``value`` (the published algorithm: ``"a"`` hashes
    to ``0xE40C292C``): the same number in every process and every Python, polars or torch
    version, and in C++.

    Why not polars' ``hash``: its output is not promised stable across polars versions, and a
    vocabulary saved today must index the same tomorrow. Why not hashlib: TorchScript cannot
    call it, and the served module must hash strings exactly as training did
    (:func:`stable_hash_scriptable` is this function for ``torch.jit.script``).
    """
    h = 0x811C9DC5
    for byte in value.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF  # below 2**57: no int64 overflow anywhere
    return h


def stable_hash_scriptable(value: str) -> int:
    """:func:`stable_hash` written for ``torch.jit.script``, for the served module: a
    TorchScript string iterates over its UTF-8 bytes, one character per byte."""
    h = 0x811C9DC5
    for ch in value:
        h = ((h ^ ord(ch)) * 0x01000193) & 0xFFFFFFFF
    return h


def hash_bucket(value: str, buckets: int) -> int:
    """The index of ``value`` in an open vocabulary of ``buckets`` slots: ``1..buckets``."""
    return 1 + stable_hash(value) % buckets


def hash_bucket_expr(expr: pl.Expr, buckets: int) -> pl.Expr:
    """Indices (``1..buckets``; null -> 0) of a string or list-of-strings expression.

    Each distinct value is hashed once in Python (the distinct values of a column are few next
    to its rows), then mapped back with ``replace_strict``.
    """

    def indices(values: pl.Series) -> pl.Series:
        flat = values.explode() if isinstance(values.dtype, pl.List) else values
        distinct = flat.drop_nulls().unique().to_list()
        mapping = {v: hash_bucket(v, buckets) for v in distinct}
        index = pl.element() if isinstance(values.dtype, pl.List) else pl.col(values.name)
        index = index.replace_strict(mapping, default=0, return_dtype=pl.Int64).fill_null(0)
        frame = values.to_frame()
        if isinstance(values.dtype, pl.List):
            return frame.select(pl.col(values.name).list.eval(index)).to_series()
        return frame.select(index).to_series()

    return expr.map_batches(indices)


__all__ = [
    "DataSpec", "FeatureSpec", "LabelSpec", "SpecError", "KINDS", "TABLES", "check_columns",
    "feature_expr", "feature_exprs", "hash_bucket", "hash_bucket_expr", "load_spec",
    "spec_from_dict", "stable_hash", "stable_hash_scriptable",
]  # fmt: skip
