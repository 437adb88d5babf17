"""Configuration of the feature layer (the ``data:`` section of a job YAML)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from features.spec import DataSpec

from dataclasses import dataclass, field
from typing import Any, Literal

from features.templates import check_templates

#: A rating prompt is a user part followed by an item part (DESIGN.md section 2): the user part
#: may name only user fields and the item part only item fields, so a language teacher can
#: encode each part once per user and once per item, not once per rating.
DEFAULT_USER_TEMPLATE = "user u-{user_id}, a {age}-year-old {gender} {occupation}."
DEFAULT_ITEM_TEMPLATE = "Watched movie '{title}' ({year}, {genres}), id m-{item_id}. Rating:"


@dataclass
class DataConfig:
    """Where the ratings come from and how they become features, splits and prompts.

    Args:
        source: ``"embedded"`` (ML-100K shipped in the recbole wheel) or a path to a GroupLens
            ``ml-100k`` folder (``u.data``, ``u.user``, ``u.item``), ``ml-1m`` folder
            (``ratings.dat``, ``users.dat``, ``movies.dat``), ``ml-10m`` folder
            (``ratings.dat``, ``movies.dat``) or ``ml-20m`` / ``ml-25m`` folder
            (``ratings.csv``, ``movies.csv``).
        interactions: a team's own interaction log instead of ``source``: parquet or CSV, a
            file, a folder of shards or a glob (``logs/part-*.parquet``); ``features`` must
            then say what to read from it (a spec file or a list).
        users: with ``interactions``: the users table (parquet or CSV), joined on ``user_key``.
        items: with ``interactions``: the items table, joined on ``item_key``.
        stream: read ``interactions`` chunk by chunk instead of into memory
            (:mod:`features.stream`: a shuffle buffer, splits hashed per row, each rank its
            own shards); vocabularies are built in streaming scans.
        chunk_rows: with ``stream``: rows read at a time from one shard.
        shuffle_buffer: with ``stream``: rows shuffled together.
        strict: reject (instead of dropping with a logged count) ratings outside 1..5 or not
            numbers.
        dedupe_titles: map items whose title and year repeat an earlier item onto that item's
            id (ML-100K lists 18 movies twice); off by default, so counts match the files.
        split: ``"random"`` (seeded 80/10/10) or ``"temporal"`` (per user, by timestamp).
        split_fractions: train / validation / test shares.
        seed: the seed of the random split.
        features: the feature spec (:mod:`features.spec`): the name of a shipped spec
            (``ml100k``, ``ml1m``) or a spec YAML file, or the list of features itself (then
            ``label``, ``user_key``, ``item_key`` and ``embedding_dim`` here complete it).
            Default: the source's shipped spec (``ml100k``, ``ml1m``, or ``ml20m`` for the
            GroupLens logs without a users table: ml-10m, ml-20m, ml-25m).
        label: with a features list: ``{column, kind}`` (kind ``rating`` or ``click``);
            default ``{column: rating, kind: rating}``.
        user_key: with a features list: the users table's key column.
        item_key: with a features list: the items table's key column.
        embedding_dim: with a features list: the width of features that name none (else the
            model's id / side widths).
        kind_embedding_dims: with a features list: a width per kind (``{categorical: 8}``),
            before ``embedding_dim``.
        logged_scores: with a features list: ``[{name, column}]``, columns of the
            interactions holding another model's predictions, each a prediction-only committee
            member (:class:`features.spec.LoggedScoreSpec`).
        user_template: the user part of a prompt; fields in braces are user columns
            (MovieLens: ``user_id``, ``age``, ``gender``, ``occupation``, ``zip_code``; any
            column of your own users table).
        item_template: the item part, which follows the user part after one space; fields
            are item columns (MovieLens: ``item_id``, ``title``, ``year``, ``genres``).
        genre_separator: how several genres are joined in a prompt.
    """

    source: str = "embedded"
    interactions: str | None = None
    users: str | None = None
    items: str | None = None
    stream: bool = False
    chunk_rows: int = 262_144
    shuffle_buffer: int = 1_048_576
    strict: bool = False
    dedupe_titles: bool = False
    split: Literal["random", "temporal"] = "random"
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    seed: int = 0
    features: str | list[dict[str, Any]] | None = None
    label: dict[str, Any] | None = None
    user_key: str = "user_id"
    item_key: str = "item_id"
    embedding_dim: int | None = None
    kind_embedding_dims: dict[str, int] = field(default_factory=dict)
    logged_scores: list[dict[str, Any]] = field(default_factory=list)
    user_template: str = DEFAULT_USER_TEMPLATE
    item_template: str = DEFAULT_ITEM_TEMPLATE
    genre_separator: str = ", "

    def __post_init__(self) -> None:
        if len(self.split_fractions) != 3 or any(f < 0 for f in self.split_fractions):
            raise ValueError(
                f"split_fractions must be three non-negative shares, got {self.split_fractions}"
            )
        if abs(sum(self.split_fractions) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must sum to 1, got {self.split_fractions}")
        if self.interactions is None:  # own tables: checked against their columns when built
            check_templates(self.user_template, self.item_template)
        for key in ("users", "items"):
            if getattr(self, key) is not None and self.interactions is None:
                raise ValueError(f"data.{key}: a {key} table goes with data.interactions (a team's "
                                 "own tables); a GroupLens source brings its own")  # fmt: skip
        if self.interactions is not None and self.features is None:
            raise ValueError("data.features: your own tables (data.interactions) need a feature "
                             "spec: a spec file, or a list of features with data.label")  # fmt: skip
        if self.stream and self.interactions is None:
            raise ValueError("data.stream: streams your own tables (data.interactions); a "
                             "MovieLens source is read into memory")  # fmt: skip
        if self.stream and self.split != "random":
            raise ValueError("data.split: the streaming reader splits at random per row (a "
                             f"{self.split!r} split needs the whole table in memory)")  # fmt: skip
        for key in ("chunk_rows", "shuffle_buffer"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key}: must be at least 1, got {getattr(self, key)}")
        spec = self.spec_for("ml-100k")  # a bad spec fails on load, naming its key path
        if self.stream and spec.histories:
            i = spec.names.index(spec.histories[0].name)
            raise ValueError(f"data.features[{i}]: history {spec.histories[0].name!r} is gathered "
                             "from the training split in memory; a streamed log (data.stream) "
                             "takes no history features yet")  # fmt: skip
        if self.stream and spec.logged_scores:
            raise ValueError(f"data.logged_scores: {spec.logged_scores[0].name!r} is looked up per "
                             "row of the whole log in memory; a streamed log (data.stream) takes "
                             "no logged scores yet")  # fmt: skip

    def spec_for(self, dataset: str) -> "DataSpec":
        """The feature spec of this config for a source named ``dataset`` (``ml-100k``,
        ``ml-1m``, ...: the default spec is the source's shipped one).

        Raises:
            SpecError: a bad spec (with its key path under ``data``), or no spec for a source
                that ships none.
        """
        from features.spec import SpecError, load_spec, spec_from_dict  # late: spec imports polars

        spec_keys = ("label", "embedding_dim")
        if not isinstance(self.features, list):
            given = [k for k in spec_keys if getattr(self, k) is not None]
            given += [k for k in ("user_key", "item_key") if getattr(self, k) != f"{k[:4]}_id"]
            given += ["kind_embedding_dims"] if self.kind_embedding_dims else []
            given += ["logged_scores"] if self.logged_scores else []
            if given:
                raise SpecError(f"data.{given[0]}: set only with a list of data.features (a "
                                "spec file gives its own)")  # fmt: skip
        if isinstance(self.features, str):
            return load_spec(self.features)
        if self.features is None:
            shipped = {"ml-100k": "ml100k", "ml-1m": "ml1m"}
            if dataset.startswith("ml-") and dataset not in shipped:  # 10m, 20m, 25m, latest
                return load_spec("ml20m")
            if dataset not in shipped:
                raise SpecError(f"data.features: the source {dataset!r} ships no feature spec; "
                                "give one (a list of features, or a spec file)")  # fmt: skip
            return load_spec(shipped[dataset])
        raw: dict[str, Any] = {"features": self.features, "user_key": self.user_key,
                               "item_key": self.item_key}  # fmt: skip
        raw["label"] = self.label if self.label is not None else {"column": "rating"}
        if self.embedding_dim is not None:
            raw["embedding_dim"] = self.embedding_dim
        if self.kind_embedding_dims:
            raw["kind_embedding_dims"] = dict(self.kind_embedding_dims)
        if self.logged_scores:
            raw["logged_scores"] = list(self.logged_scores)
        return spec_from_dict(raw, "data")

    @property
    def template(self) -> str:
        """The whole prompt: the user part, one space, the item part."""
        return f"{self.user_template} {self.item_template}"
