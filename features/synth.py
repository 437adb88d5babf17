"""A synthetic rating log in the MovieLens shape, generated shard by shard.

The written folder holds the three frames of :mod:`features.sources` with the same columns and
types, so the code that reads MovieLens (vocabularies, feature derivations) reads it too::

    DIR/ratings/part-00000.parquet, ...  user_id i64, item_id i64, rating f32, timestamp i64
    DIR/users.parquet      user_id i64, age i32, gender str, occupation str, zip_code str
    DIR/items.parquet      item_id i64, title str, year i32, genres list[str]
    DIR/meta.json          what generated it: version, seed, sizes, shards, schema

Ids run from 1. Ratings are whole numbers 1..5 (stored as f32, as the loader gives them). How
the data is drawn:

- item popularity is Zipf: an item of popularity rank ``k`` is drawn with probability
  proportional to ``1 / k ** zipf_exponent`` (ranks are a seeded shuffle of the ids), and user
  activity likewise with the smaller ``user_activity_exponent``;
- users and items get attributes from small categorical distributions (ages in the ML-1M
  groups, ML-100K occupations, 1-3 of the 18 ML-100K genres, release years skewed recent);
- a rating is ``clip(round(mu + b_u + b_i + <p_u, q_i> + noise), 1, 5)`` where the item factor
  ``q_i`` is partly the mean of its genres' factors and the user factor ``p_u`` partly the sum
  of its age group's, occupation's and gender's factors, so side features carry signal too.

Memory stays flat as rows grow: each shard is drawn and written on its own, from a generator
seeded by ``(seed, shard index)``. The same arguments give byte-identical files; a different
``shard_rows`` gives a different (equally valid) draw.

Example::

    meta = write_synthetic("/tmp/synth", SynthSpec(rows=1_000_000, users=50_000, items=20_000))
    meta["shards"]                 # 1
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from features.sources import ML100K_GENRES

#: Bumped whenever the same arguments would draw different data.
GENERATOR_VERSION = 1

#: The ML-100K genres as the loader leaves them (without "unknown").
GENRES: tuple[str, ...] = tuple(g for g in ML100K_GENRES if g != "unknown")
#: Relative genre frequencies (Drama and Comedy dominate, as in MovieLens); order of ``GENRES``.
GENRE_WEIGHTS = np.array([
    0.10, 0.05, 0.02, 0.04, 0.17, 0.05, 0.02, 0.22, 0.01, 0.01, 0.03, 0.02, 0.03, 0.08, 0.04,
    0.08, 0.02, 0.01,
])  # fmt: skip
GENRE_COUNT_WEIGHTS = np.array([0.5, 0.35, 0.15])  # an item has 1, 2 or 3 genres
OCCUPATIONS: tuple[str, ...] = (
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive",
    "healthcare", "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer",
    "retired", "salesman", "scientist", "student", "technician", "writer",
)  # fmt: skip  (the ML-100K list)
OCCUPATION_WEIGHTS = np.array([
    0.08, 0.03, 0.01, 0.10, 0.07, 0.02, 0.03, 0.02, 0.01, 0.01, 0.05, 0.03, 0.01, 0.11, 0.07,
    0.02, 0.01, 0.03, 0.21, 0.03, 0.05,
])  # fmt: skip
#: Age groups as ``(lowest age, highest age, weight)``; their bounds match the ML-1M buckets.
AGE_GROUPS: tuple[tuple[int, int, float], ...] = (
    (12, 17, 0.05), (18, 24, 0.20), (25, 34, 0.35), (35, 44, 0.20), (45, 49, 0.08),
    (50, 55, 0.07), (56, 73, 0.05),
)  # fmt: skip
GENDERS = ("M", "F")
GENDER_WEIGHTS = np.array([0.71, 0.29])
ADJECTIVES = (
    "Silent", "Broken", "Golden", "Last", "Hidden", "Crimson", "Lonely", "Electric", "Wild",
    "Forgotten", "Burning", "Midnight", "Secret", "Lost", "Frozen", "Dark", "Endless", "Little",
    "Restless", "Distant", "Savage", "Gentle", "Iron", "Velvet", "Hollow",
)  # fmt: skip
NOUNS = (
    "Harbor", "Road", "Kingdom", "Promise", "Summer", "River", "Stranger", "Garden", "Empire",
    "Island", "Witness", "Machine", "Letter", "Valley", "Shadow", "Dream", "Station", "Frontier",
    "Heart", "Mirror", "Storm", "Signal", "Orchard", "Circus", "Fortress",
)  # fmt: skip
#: A word per genre that ends a title ("The Hidden Harbor Chase" is a thriller).
GENRE_WORDS = {
    "Action": "Showdown", "Adventure": "Quest", "Animation": "Tale", "Children's": "Adventure",
    "Comedy": "Comedy", "Crime": "Heist", "Documentary": "Story", "Drama": "Affair",
    "Fantasy": "Legend", "Film-Noir": "Murder", "Horror": "Nightmare", "Musical": "Song",
    "Mystery": "Riddle", "Romance": "Romance", "Sci-Fi": "Odyssey", "Thriller": "Chase",
    "War": "War", "Western": "Ballad",
}  # fmt: skip
YEAR_RANGE = (1920, 2019)
#: Release years fall exponentially back from the latest, this many years on average.
YEAR_MEAN_AGE = 15.0
#: Ratings fall in [2000-01-01, 2020-01-01) and never before their item's release year.
TIMESTAMP_RANGE = (946_684_800, 1_577_836_800)
_YEAR_SECONDS = 31_556_952


@dataclass(frozen=True)
class SynthSpec:
    """What to generate.

    Args:
        rows: ratings to write.
        users: users ``1..users``.
        items: items ``1..items``.
        seed: the same seed and sizes give byte-identical files.
        shard_rows: the most ratings in one parquet shard (and in memory at once).
        zipf_exponent: item popularity falls as ``rank ** -zipf_exponent``.
        user_activity_exponent: the same for how many ratings a user gives.
        factors: dimension ``D`` of the latent user and item factors.
        global_mean: ``mu``, the mean rating before rounding and clipping.
        user_bias_std: spread of ``b_u``.
        item_bias_std: spread of ``b_i``.
        factor_std: spread of each factor component, so ``<p_u, q_i>`` spreads by about
            ``sqrt(D) * factor_std ** 2``.
        side_share: the share of a factor's variance that its side features explain (age group,
            occupation, gender for users; genres for items).
        noise_std: spread of the per-rating noise.

    Raises:
        ValueError: a size below 1, or a share or spread out of range, named.
    """

    rows: int
    users: int
    items: int
    seed: int = 0
    shard_rows: int = 1_000_000
    zipf_exponent: float = 1.0
    user_activity_exponent: float = 0.6
    factors: int = 8
    global_mean: float = 3.5
    user_bias_std: float = 0.35
    item_bias_std: float = 0.45
    factor_std: float = 0.55
    side_share: float = 0.5
    noise_std: float = 0.5

    def __post_init__(self) -> None:
        for name in ("rows", "users", "items", "shard_rows", "factors"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer of at least 1 (got {value!r})")
        for name in ("zipf_exponent", "user_activity_exponent", "user_bias_std", "item_bias_std",
                     "factor_std", "noise_std"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0 (got {getattr(self, name)!r})")
        if not 0.0 <= self.side_share <= 1.0:
            raise ValueError(f"side_share must be in [0, 1] (got {self.side_share!r})")

    @property
    def shards(self) -> int:
        """How many ratings files: ``ceil(rows / shard_rows)``."""
        return -(-self.rows // self.shard_rows)


@dataclass(frozen=True)
class _World:
    """Everything a rating draw needs about users and items (small: ``U`` and ``I`` rows)."""

    user_cdf: np.ndarray  # [U] cumulative activity, by activity rank
    user_by_rank: np.ndarray  # [U] 0-based user index of each activity rank
    item_cdf: np.ndarray  # [I] cumulative popularity, by popularity rank
    item_by_rank: np.ndarray  # [I]
    user_bias: np.ndarray  # [U] f32
    item_bias: np.ndarray  # [I] f32
    user_factors: np.ndarray  # [U, D] f32
    item_factors: np.ndarray  # [I, D] f32
    item_first_second: np.ndarray  # [I] i64, the earliest timestamp a rating of the item may have


def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _draw(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
    """``n`` ranks (0-based) drawn by inverse CDF."""
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1)


def _side_plus_own(side: np.ndarray, rng: np.random.Generator, spec: SynthSpec) -> np.ndarray:
    """Factors whose variance is ``side_share`` from ``side`` (unit spread) and the rest own."""
    own = rng.standard_normal(side.shape)
    mixed = np.sqrt(spec.side_share) * side + np.sqrt(1.0 - spec.side_share) * own
    return (spec.factor_std * mixed).astype(np.float32)


def _users(rng: np.random.Generator, spec: SynthSpec) -> tuple[pl.DataFrame, np.ndarray]:
    """The users table and the users' factors ``[U, D]``."""
    n, d = spec.users, spec.factors
    group_weights = np.array([w for _, _, w in AGE_GROUPS])
    group = rng.choice(len(AGE_GROUPS), size=n, p=group_weights / group_weights.sum())
    low = np.array([lo for lo, _, _ in AGE_GROUPS])[group]
    high = np.array([hi for _, hi, _ in AGE_GROUPS])[group]
    age = low + np.floor(rng.random(n) * (high - low + 1)).astype(np.int64)
    gender = rng.choice(len(GENDERS), size=n, p=GENDER_WEIGHTS)
    occupation_p = OCCUPATION_WEIGHTS / OCCUPATION_WEIGHTS.sum()
    occupation = rng.choice(len(OCCUPATIONS), size=n, p=occupation_p)
    # Zip codes cluster: a few three-digit areas (Zipf over a shuffle of 000..999) hold most users.
    area = rng.permutation(1000)[_draw(rng, _zipf_cdf(1000, 1.0), n)]
    zip_code = area * 100 + rng.integers(0, 100, size=n)

    # Each attribute contributes a third of the side part, so the side part has unit spread.
    side = (
        rng.standard_normal((len(AGE_GROUPS), d))[group]
        + rng.standard_normal((len(OCCUPATIONS), d))[occupation]
        + rng.standard_normal((len(GENDERS), d))[gender]
    ) / np.sqrt(3.0)
    factors = _side_plus_own(side, rng, spec)
    table = pl.DataFrame({
        "user_id": np.arange(1, n + 1, dtype=np.int64),
        "age": age.astype(np.int32),
        "gender": pl.Series(GENDERS).gather(gender),
        "occupation": pl.Series(OCCUPATIONS).gather(occupation),
        "zip_code": pl.Series(zip_code).cast(pl.Utf8).str.zfill(5),
    })  # fmt: skip
    return table, factors


def _items(rng: np.random.Generator, spec: SynthSpec) -> tuple[pl.DataFrame, np.ndarray]:
    """The items table and the items' factors ``[I, D]``."""
    n, d, g = spec.items, spec.factors, len(GENRES)
    # 1-3 distinct genres per item: the top keys of log(weight) + Gumbel noise, kept in the
    # canonical genre order as MovieLens lists them.
    keys = np.log(GENRE_WEIGHTS / GENRE_WEIGHTS.sum()) + rng.gumbel(size=(n, g))
    top = np.argsort(-keys, axis=1)[:, :3]  # [I, 3]
    count = rng.choice(3, size=n, p=GENRE_COUNT_WEIGHTS) + 1
    chosen = np.where(np.arange(3) < count[:, None], top, g)  # g marks "no genre"
    chosen.sort(axis=1)
    primary = top[:, 0]  # the most weighted genre names the title
    member = np.zeros((n, g + 1), dtype=np.float64)
    np.put_along_axis(member, chosen, 1.0, axis=1)
    member = member[:, :g]  # [I, G]

    span = YEAR_RANGE[1] - YEAR_RANGE[0]
    years_back = np.minimum(np.floor(rng.exponential(YEAR_MEAN_AGE, size=n)), span)
    year = YEAR_RANGE[1] - years_back.astype(np.int64)

    # The genre part is the mean of unit-spread genre factors, rescaled to unit spread again.
    genre_factors = rng.standard_normal((g, d))
    side = (member @ genre_factors) / np.sqrt(count)[:, None]
    factors = _side_plus_own(side, rng, spec)

    adjective = rng.integers(0, len(ADJECTIVES), size=n)
    noun = rng.integers(0, len(NOUNS), size=n)
    genre_word = pl.Series([GENRE_WORDS[name] for name in GENRES]).gather(primary)
    genre_names = pl.Series("g", [*GENRES, None], dtype=pl.Utf8)
    table = pl.DataFrame({
        "item_id": np.arange(1, n + 1, dtype=np.int64),
        "adjective": pl.Series(ADJECTIVES).gather(adjective),
        "noun": pl.Series(NOUNS).gather(noun),
        "genre_word": genre_word,
        "year": year.astype(np.int32),
        **{f"g{k}": genre_names.gather(chosen[:, k]) for k in range(3)},
    })  # fmt: skip
    base = pl.concat_str(
        pl.lit("The "), "adjective", pl.lit(" "), "noun", pl.lit(" "), "genre_word"
    )
    # A title that repeats within its year gets a sequel number, so (title, year) is unique.
    sequel = pl.int_range(pl.len()).over(base, "year") + 1
    numbered = pl.concat_str(base, pl.lit(" "), sequel.cast(pl.Utf8))
    title = pl.when(sequel == 1).then(base).otherwise(numbered)
    table = table.select(
        "item_id",
        title.alias("title"),
        "year",
        pl.concat_list("g0", "g1", "g2").list.drop_nulls().alias("genres"),
    )
    return table, factors


def _world(spec: SynthSpec) -> tuple[pl.DataFrame, pl.DataFrame, _World]:
    rng = np.random.default_rng([spec.seed, 0])
    users, user_factors = _users(rng, spec)
    items, item_factors = _items(rng, spec)
    release = (items["year"].to_numpy().astype(np.int64) - 1970) * _YEAR_SECONDS
    world = _World(
        user_cdf=_zipf_cdf(spec.users, spec.user_activity_exponent),
        user_by_rank=rng.permutation(spec.users),
        item_cdf=_zipf_cdf(spec.items, spec.zipf_exponent),
        item_by_rank=rng.permutation(spec.items),
        user_bias=(spec.user_bias_std * rng.standard_normal(spec.users)).astype(np.float32),
        item_bias=(spec.item_bias_std * rng.standard_normal(spec.items)).astype(np.float32),
        user_factors=user_factors,
        item_factors=item_factors,
        item_first_second=np.maximum(TIMESTAMP_RANGE[0], release),
    )
    return users, items, world


def _ratings(rng: np.random.Generator, spec: SynthSpec, world: _World, n: int) -> pl.DataFrame:
    """``n`` ratings, drawn with ``rng``."""
    user = world.user_by_rank[_draw(rng, world.user_cdf, n)]  # [n] 0-based
    item = world.item_by_rank[_draw(rng, world.item_cdf, n)]  # [n]
    score = np.einsum("nd,nd->n", world.user_factors[user], world.item_factors[item])
    score += spec.global_mean + world.user_bias[user] + world.item_bias[item]
    score += spec.noise_std * rng.standard_normal(n, dtype=np.float32)
    rating = np.clip(np.rint(score), 1, 5).astype(np.float32)
    first = world.item_first_second[item]
    timestamp = first + (rng.random(n) * (TIMESTAMP_RANGE[1] - first)).astype(np.int64)
    return pl.DataFrame({
        "user_id": user.astype(np.int64) + 1,
        "item_id": item.astype(np.int64) + 1,
        "rating": rating,
        "timestamp": timestamp,
    })  # fmt: skip


def _prepare_folder(out: Path, force: bool) -> None:
    """Make ``out``; when it is not empty, refuse, or with ``force`` remove what we would write."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ValueError(f"{out} is not empty; pass --force to overwrite it")
        # Only our own files go, so that a stale shard of a bigger earlier run is not read back.
        ours = [out / "users.parquet", out / "items.parquet", out / "meta.json"]
        for path in [*out.glob("ratings/part-*.parquet"), *ours]:
            path.unlink(missing_ok=True)
    (out / "ratings").mkdir(parents=True, exist_ok=True)


SCHEMA = {
    "ratings": {"user_id": "i64", "item_id": "i64", "rating": "f32", "timestamp": "i64"},
    "users": {
        "user_id": "i64", "age": "i32", "gender": "str", "occupation": "str", "zip_code": "str",
    },  # fmt: skip
    "items": {"item_id": "i64", "title": "str", "year": "i32", "genres": "list[str]"},
}


def write_synthetic(out: str | Path, spec: SynthSpec, force: bool = False) -> dict:
    """Generate ``spec`` into the folder ``out`` and return what ``meta.json`` records.

    Args:
        out: the folder; created when missing.
        spec: sizes, seed and the generator's parameters.
        force: write into a non-empty folder, replacing the files a previous run wrote there.

    Raises:
        ValueError: ``out`` is not empty (without ``force``) or is a file.
    """
    out = Path(out)
    _prepare_folder(out, force)
    users, items, world = _world(spec)
    users.write_parquet(out / "users.parquet")
    items.write_parquet(out / "items.parquet")
    for shard in range(spec.shards):
        n = min(spec.shard_rows, spec.rows - shard * spec.shard_rows)
        rng = np.random.default_rng([spec.seed, 1, shard])
        _ratings(rng, spec, world, n).write_parquet(out / "ratings" / f"part-{shard:05d}.parquet")
    meta = {
        "generator": "features.synth",
        "generator_version": GENERATOR_VERSION,
        "spec": asdict(spec),
        "shards": spec.shards,
        "schema": SCHEMA,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
