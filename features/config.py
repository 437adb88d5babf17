"""Configuration of the feature layer (the ``data:`` section of a job YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
            ``ml-100k`` folder (``u.data``, ``u.user``, ``u.item``) or ``ml-1m`` folder
            (``ratings.dat``, ``users.dat``, ``movies.dat``).
        strict: reject (instead of dropping with a logged count) ratings outside 1..5 or not
            numbers.
        dedupe_titles: map items whose title and year repeat an earlier item onto that item's
            id (ML-100K lists 18 movies twice); off by default, so counts match the files.
        split: ``"random"`` (seeded 80/10/10) or ``"temporal"`` (per user, by timestamp).
        split_fractions: train / validation / test shares.
        seed: the seed of the random split.
        zip_prefix_len: how many leading characters of the zip code form the zip feature.
        year_bucket: width in years of the release-year buckets.
        user_template: the user part of a prompt; fields in braces are user columns
            (``user_id``, ``age``, ``gender``, ``occupation``, ``zip_code``).
        item_template: the item part, which follows the user part after one space; fields
            are item columns (``item_id``, ``title``, ``year``, ``genres``).
        genre_separator: how several genres are joined in a prompt.
    """

    source: str = "embedded"
    strict: bool = False
    dedupe_titles: bool = False
    split: Literal["random", "temporal"] = "random"
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    seed: int = 0
    zip_prefix_len: int = 3
    year_bucket: int = 5
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
        if self.zip_prefix_len < 1:
            raise ValueError(f"zip_prefix_len must be at least 1, got {self.zip_prefix_len}")
        if self.year_bucket < 1:
            raise ValueError(f"year_bucket must be at least 1, got {self.year_bucket}")
        from features.verbalizer import check_templates  # late: the verbalizer imports this

        check_templates(self.user_template, self.item_template)

    @property
    def template(self) -> str:
        """The whole prompt: the user part, one space, the item part."""
        return f"{self.user_template} {self.item_template}"
