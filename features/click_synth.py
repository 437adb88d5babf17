"""A synthetic ad click log drawn from a known logistic model, so its ceiling is known exactly.

The folder it writes is what a team's own click log looks like (string keys, list columns, user
and ad side tables), plus what no real log has: the generating model's click probability of
every impression and the model's own parameters::

    DIR/impressions/part-00000.parquet, ...   user_id str, ad_id str, position i32,
                                              clicked i8 (0/1), true_p f64
    DIR/users.parquet     user_id str ("u0001234"), country str, age_group str, device str,
                          interests list[str]
    DIR/ads.parquet       ad_id str ("ad000123"), advertiser str, category str,
                          tags list[str], price f64, headline str
    DIR/spec.yaml         the feature spec a user would write for it (``data.features``)
    DIR/model/users.parquet   user_id, own_bias f64, factors list[f64]   (the model's state:
    DIR/model/ads.parquet     ad_id, own_bias f64, factors list[f64]      no real log has it)
    DIR/meta.json         version, the spec's arguments, the model's effects and bias, schema

**The model.** Impression ``r`` shows ad ``a`` to user ``u`` at slot ``position``; it is
clicked with probability ``true_p = sigmoid(logit)``, where::

    logit = bias
          + country[u] + age_group[u] + device[u] + own_bias[u]              user effects
          + category[a] + advertiser[a] + mean(tag[t] for t in tags[a])
          + price_bucket[bucket(price[a])] + own_bias[a]                     ad effects
          + match * |interests[u] & tags[a]|                                 interest x tag
          + <p_u, q_a>                                                       latent factors
          + position_slope * (position - 1)                                  context

``bucket`` cuts at :data:`PRICE_BOUNDARIES` (the spec's price buckets). The effects are drawn
once per world (``meta.json`` "model" holds every one, by name); ``own_bias`` and the factors
``p_u``, ``q_a`` (``DIR/model/``) are per entity. A factor is partly its entity's side
features, partly its own: ``p_u`` mixes a factor of the user's interests (their mean, rescaled)
and of its age group with an idiosyncratic one, ``q_a`` a factor of the ad's tags and category
with its own, the side part holding ``side_share`` of the variance. So the attributes carry
signal, the interest x tag match is a bilinear term a sum-pooling MLP learns poorly, and part
of every user and ad is knowable only from its own history. ``bias`` is solved so that the
mean ``true_p`` over a seeded calibration draw of impressions is ``click_rate``.

Users and ads are Zipf-popular: a user of activity rank ``k`` is drawn with probability
proportional to ``k ** -user_activity_exponent`` (an ad likewise with
``ad_popularity_exponent``), ranks a seeded shuffle of the keys. With the defaults (300,000
impressions, 10,000 users, 2,000 ads) a user has 30 impressions on average (a few thousand for
the heaviest, about 20 for the median one) and the click rate is about 7%. The spreads are a
realistic mix (the logit spreads by about 0.98: factors 0.72, ad effects 0.48, user effects
0.36, position and match 0.13 each), set so that the generating model's AUC (0.744 at seed 0)
is near the 0.75 of the user log that prompted this generator, and never tuned on any model's
score.

**The ceiling.** ``true_p`` is the best any model can predict: :func:`ceiling` reports its
log loss and AUC on given rows beside the constant click rate's log loss, and
:func:`gap_closed` the share of that gap a model's log loss closes. A user's real log has no
``true_p``; never name it in a feature spec.

**Training on it.** Point a job's ``data:`` section at the folder; ``spec.yaml`` brings the
label (``{column: clicked, kind: click}``) and the keys, so ``data.label`` is not set::

    data:
      interactions: DIR/impressions
      users: DIR/users.parquet
      items: DIR/ads.parquet
      features: DIR/spec.yaml
      # a language teacher's prompts may name any users / ads column, e.g.
      user_template: "user {user_id} from {country}, aged {age_group}, into {interests}."
      item_template: "Ad: {headline} Tags: {tags}."

The same arguments give byte-identical files: the world (users, ads, effects) comes from a
generator seeded by ``(seed, 0)``, the calibration draw from ``(seed, 2)``, and each shard of
impressions from ``(seed, 1, shard)``, so memory stays flat as rows grow (a different
``shard_rows`` gives a different, equally valid draw).

Example::

    meta = write_click_log("/tmp/clicks", ClickSynthSpec(rows=20_000, users=2_000, ads=400))
    meta["click_rate"]                                    # about 0.07
    log = pl.read_parquet("/tmp/clicks/impressions")
    ceiling(log)                                          # {"log_loss": ..., "auc": ...}
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from features.synth import _draw, _zipf_cdf

#: Bumped whenever the same arguments would draw different data.
GENERATOR_VERSION = 1

COUNTRIES: tuple[str, ...] = ("us", "gb", "de", "fr", "in", "br", "jp", "es", "it", "ca", "mx", "au")
COUNTRY_WEIGHTS = np.array([0.25, 0.10, 0.09, 0.07, 0.12, 0.08, 0.06, 0.05, 0.05, 0.05, 0.04, 0.04])
AGE_GROUPS: tuple[str, ...] = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
AGE_WEIGHTS = np.array([0.18, 0.30, 0.22, 0.15, 0.10, 0.05])
DEVICES: tuple[str, ...] = ("mobile", "desktop", "tablet")
DEVICE_WEIGHTS = np.array([0.62, 0.30, 0.08])
#: Users' interests and ads' tags come from the same topics, so they can match.
TOPICS: tuple[str, ...] = (
    "sports", "travel", "cooking", "gaming", "fashion", "technology", "finance", "music",
    "fitness", "pets", "home", "beauty", "movies", "books", "cars", "parenting", "outdoors",
    "photography", "art", "health", "gardening", "crafts", "news", "education",
)  # fmt: skip
TOPIC_WEIGHTS = np.array([
    0.07, 0.07, 0.06, 0.06, 0.06, 0.07, 0.04, 0.07, 0.05, 0.04, 0.04, 0.04, 0.06, 0.04, 0.03,
    0.02, 0.03, 0.02, 0.02, 0.04, 0.02, 0.01, 0.02, 0.02,
])  # fmt: skip
#: How a headline addresses the audience of its first tag.
TOPIC_AUDIENCES: dict[str, str] = {
    "sports": "sports fans", "travel": "travellers", "cooking": "home cooks", "gaming": "gamers",
    "fashion": "trendsetters", "technology": "tech lovers", "finance": "savers",
    "music": "music lovers", "fitness": "runners", "pets": "pet owners", "home": "homeowners",
    "beauty": "beauty fans", "movies": "film buffs", "books": "readers", "cars": "drivers",
    "parenting": "parents", "outdoors": "hikers", "photography": "photographers",
    "art": "artists", "health": "the health-minded", "gardening": "gardeners",
    "crafts": "makers", "news": "news readers", "education": "students",
}  # fmt: skip
#: Per category: (share of advertisers, its likely tags, nouns of its headlines, median price).
CATEGORIES: dict[str, tuple[float, tuple[str, ...], tuple[str, ...], float]] = {
    "electronics": (0.12, ("technology", "gaming", "music", "photography"),
                    ("headphones", "laptops", "smartwatches", "cameras"), 150.0),
    "fashion": (0.12, ("fashion", "beauty"), ("sneakers", "jackets", "handbags"), 60.0),
    "travel": (0.08, ("travel", "outdoors", "photography"), ("flights", "hotel stays", "city breaks"), 300.0),
    "food": (0.10, ("cooking", "health"), ("meal kits", "coffee", "snacks"), 25.0),
    "finance": (0.06, ("finance", "news", "education"), ("savings accounts", "credit cards", "trading apps"), 15.0),
    "games": (0.08, ("gaming", "movies"), ("games", "consoles", "game passes"), 40.0),
    "beauty": (0.08, ("beauty", "fashion", "health"), ("skincare", "perfume", "makeup"), 30.0),
    "home": (0.10, ("home", "gardening", "crafts", "parenting"), ("sofas", "lamps", "cookware"), 90.0),
    "auto": (0.05, ("cars", "outdoors"), ("tyres", "car insurance", "dashcams"), 120.0),
    "sports": (0.09, ("sports", "fitness", "outdoors"), ("running shoes", "bikes", "gym passes"), 70.0),
    "books": (0.07, ("books", "education", "art"), ("novels", "audiobooks", "courses"), 15.0),
    "pets": (0.05, ("pets",), ("pet food", "dog beds", "cat toys"), 20.0),
}  # fmt: skip
#: How much more likely an ad's tags are its category's topics (added to their log weight).
CATEGORY_TAG_BOOST = 2.5
#: Users have 1-4 interests and ads 1-3 tags, with these probabilities.
INTEREST_COUNT_WEIGHTS = np.array([0.30, 0.35, 0.20, 0.15])
TAG_COUNT_WEIGHTS = np.array([0.40, 0.40, 0.20])
#: Spread of each age group's tilt towards a topic (log weight): interests follow age.
AGE_INTEREST_TILT = 0.5
#: Prices spread log-normally around their category's median by this (log) spread.
PRICE_LOG_SPREAD = 0.7
#: Price buckets, in the model and in the shipped spec alike.
PRICE_BOUNDARIES: tuple[float, ...] = (10.0, 25.0, 50.0, 100.0, 250.0)
#: Ad slots on a page: 1 is the top one, shown most often.
POSITION_WEIGHTS = np.array([0.30, 0.25, 0.20, 0.15, 0.10])
HEADLINE_ADJECTIVES = ("New", "Premium", "Smart", "Everyday", "Bold", "Fresh", "Classic", "Easy",
                       "Top-rated", "Eco")  # fmt: skip
BRAND_PARTS = (
    ("Nor", "Kal", "Ven", "Zar", "Lum", "Tri", "Bel", "Cor", "Dex", "Fen", "Gal", "Hal", "Ix",
     "Jor", "Mar", "Ost", "Pra", "Quin", "Ros", "Sol"),
    ("a", "e", "i", "o", "u", "ava", "ero", "ion", "ix", "ora"),
    ("vex", "mo", "tra", "nix", "lo", "ton", "ra", "zy", "dor", "ly"),
)  # fmt: skip
#: Impressions drawn (from their own seeded generator) to solve the bias for ``click_rate``.
CALIBRATION_DRAWS = 200_000


@dataclass(frozen=True)
class ClickSynthSpec:
    """What to generate; every spread is of a logit term.

    Args:
        rows: impressions to write.
        users: users ``u0000001...``.
        ads: ads ``ad000001...``.
        seed: the same seed and arguments give byte-identical files.
        shard_rows: the most impressions in one parquet shard (and in memory at once).
        click_rate: the mean ``true_p`` the bias is solved for.
        user_activity_exponent: user activity falls as ``rank ** -exponent``.
        ad_popularity_exponent: the same for how often an ad is shown.
        ads_per_advertiser: advertisers = ``max(1, round(ads / ads_per_advertiser))``; an ad's
            category is its advertiser's.
        factors: dimension ``D`` of ``p_u`` and ``q_a``.
        factor_std: spread of each factor component (``<p_u, q_a>`` spreads by about
            ``sqrt(D) * factor_std ** 2``).
        side_share: the share of a factor's variance its entity's side features give.
        user_attribute_std: spread of each country, age group and device effect.
        ad_attribute_std: spread of each category, advertiser and tag effect.
        user_bias_std: spread of a user's own bias.
        ad_bias_std: spread of an ad's own bias.
        price_effect: the cheapest price bucket's effect minus the dearest's (even steps).
        match_effect: ``match``, per topic shared by the user's interests and the ad's tags.
        position_slope: the effect of each slot further down the page.

    Raises:
        ValueError: a size below 1, or a rate, share or spread out of range, named.
    """

    rows: int = 300_000
    users: int = 10_000
    ads: int = 2_000
    seed: int = 0
    shard_rows: int = 1_000_000
    click_rate: float = 0.07
    user_activity_exponent: float = 0.6
    ad_popularity_exponent: float = 0.8
    ads_per_advertiser: float = 10.0
    factors: int = 8
    factor_std: float = 0.5
    side_share: float = 0.5
    user_attribute_std: float = 0.15
    ad_attribute_std: float = 0.2
    user_bias_std: float = 0.3
    ad_bias_std: float = 0.3
    price_effect: float = 0.3
    match_effect: float = 0.3
    position_slope: float = -0.1

    def __post_init__(self) -> None:
        for name in ("rows", "users", "ads", "shard_rows", "factors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer of at least 1 (got {value!r})")
        if not 0.0 < self.click_rate < 1.0:
            raise ValueError(f"click_rate must be strictly between 0 and 1 (got {self.click_rate!r})")
        if not 0.0 <= self.side_share <= 1.0:
            raise ValueError(f"side_share must be in [0, 1] (got {self.side_share!r})")
        if not self.ads_per_advertiser >= 1.0:
            raise ValueError(f"ads_per_advertiser must be at least 1 (got {self.ads_per_advertiser!r})")
        for name in ("user_activity_exponent", "ad_popularity_exponent", "factor_std",
                     "user_attribute_std", "ad_attribute_std", "user_bias_std", "ad_bias_std",
                     "match_effect"):  # fmt: skip
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number of at least 0 (got {value!r})")
        for name in ("price_effect", "position_slope"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number (got {getattr(self, name)!r})")

    @property
    def shards(self) -> int:
        """How many impressions files: ``ceil(rows / shard_rows)``."""
        return -(-self.rows // self.shard_rows)

    @property
    def advertisers(self) -> int:
        return max(1, round(self.ads / self.ads_per_advertiser))


# ---------------------------------------------------------------------------------------------
# The world: users, ads and the model's effects


@dataclass(frozen=True)
class _World:
    """Everything an impression draw needs, per user ``[U]`` and per ad ``[A]`` (0-based)."""

    user_cdf: np.ndarray  # [U] cumulative activity, by activity rank
    user_by_rank: np.ndarray  # [U] user index of each activity rank
    ad_cdf: np.ndarray  # [A]
    ad_by_rank: np.ndarray  # [A]
    user_effect: np.ndarray  # [U] f64: attribute effects + own bias
    ad_effect: np.ndarray  # [A] f64: attribute effects + own bias
    user_topics: np.ndarray  # [U] int64 bit mask of interests (bit t: TOPICS[t])
    ad_topics: np.ndarray  # [A] int64 bit mask of tags
    user_factors: np.ndarray  # [U, D] f64
    ad_factors: np.ndarray  # [A, D] f64


def _pick_topics(rng: np.random.Generator, log_weights: np.ndarray, count_weights: np.ndarray) -> np.ndarray:
    """``[N, T]`` 0/1 membership: each row the top ``k`` of ``log_weights + Gumbel`` (``k`` drawn
    from ``count_weights``, 1-based): ``k`` distinct topics drawn by weight without replacement."""
    n, t = log_weights.shape
    keys = log_weights + rng.gumbel(size=(n, t))
    order = np.argsort(-keys, axis=1)
    count = rng.choice(len(count_weights), size=n, p=count_weights / count_weights.sum()) + 1
    rank = np.argsort(order, axis=1)  # [N, T] each topic's place in its row's order
    return (rank < count[:, None]).astype(np.int64)


def _topic_lists(member: np.ndarray) -> pl.Series:
    """Each row's topics as a list of names, in :data:`TOPICS` order."""
    names = np.array(TOPICS, dtype=object)
    return pl.Series([names[row.astype(bool)].tolist() for row in member], dtype=pl.List(pl.Utf8))


def _mask(member: np.ndarray) -> np.ndarray:
    """``[N]`` int64 bit masks of ``[N, T]`` memberships."""
    return (member << np.arange(member.shape[1], dtype=np.int64)).sum(axis=1)


def _factors(side: np.ndarray, rng: np.random.Generator, spec: ClickSynthSpec) -> np.ndarray:
    """``factor_std * (sqrt(s) * side + sqrt(1 - s) * own)``, ``side`` of unit spread."""
    own = rng.standard_normal(side.shape)
    return spec.factor_std * (np.sqrt(spec.side_share) * side + np.sqrt(1.0 - spec.side_share) * own)


def _effects(rng: np.random.Generator, names, std: float) -> dict[str, float]:
    return dict(zip(names, (std * rng.standard_normal(len(names))).tolist()))


def price_bucket(price: np.ndarray) -> np.ndarray:
    """Bucket ``i`` of each price: ``PRICE_BOUNDARIES[i-1] <= price < PRICE_BOUNDARIES[i]``."""
    return np.searchsorted(np.array(PRICE_BOUNDARIES), price, side="right")


def _users(rng: np.random.Generator, spec: ClickSynthSpec, model: dict) -> tuple[pl.DataFrame, dict]:
    n, d, t = spec.users, spec.factors, len(TOPICS)
    country = rng.choice(len(COUNTRIES), size=n, p=COUNTRY_WEIGHTS / COUNTRY_WEIGHTS.sum())
    age = rng.choice(len(AGE_GROUPS), size=n, p=AGE_WEIGHTS / AGE_WEIGHTS.sum())
    device = rng.choice(len(DEVICES), size=n, p=DEVICE_WEIGHTS / DEVICE_WEIGHTS.sum())
    tilt = AGE_INTEREST_TILT * rng.standard_normal((len(AGE_GROUPS), t))
    interests = _pick_topics(rng, np.log(TOPIC_WEIGHTS)[None, :] + tilt[age], INTEREST_COUNT_WEIGHTS)
    # The side part of p_u: the interests' factors (summed, / sqrt(count): unit spread) and the
    # age group's, in equal shares.
    topic_factors = rng.standard_normal((t, d))
    age_factors = rng.standard_normal((len(AGE_GROUPS), d))
    interest_part = interests @ topic_factors / np.sqrt(interests.sum(axis=1))[:, None]
    factors = _factors((interest_part + age_factors[age]) / np.sqrt(2.0), rng, spec)
    own_bias = spec.user_bias_std * rng.standard_normal(n)
    effect = own_bias.copy()
    for name, names, index in (("country", COUNTRIES, country), ("age_group", AGE_GROUPS, age),
                               ("device", DEVICES, device)):  # fmt: skip
        model[name] = _effects(rng, names, spec.user_attribute_std)
        effect += np.array([model[name][v] for v in names])[index]
    keys = pl.Series([f"u{i:07d}" for i in range(1, n + 1)], dtype=pl.Utf8)
    table = pl.DataFrame({
        "user_id": keys,
        "country": pl.Series(COUNTRIES).gather(country),
        "age_group": pl.Series(AGE_GROUPS).gather(age),
        "device": pl.Series(DEVICES).gather(device),
        "interests": _topic_lists(interests),
    })  # fmt: skip
    state = pl.DataFrame({"user_id": keys, "own_bias": own_bias,
                          "factors": pl.Series(factors.tolist(), dtype=pl.List(pl.Float64))})  # fmt: skip
    return table, {"effect": effect, "topics": _mask(interests), "factors": factors, "state": state}


def _brands(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct made-up brand names (a number appended past the syllables' combinations)."""
    first, middle, last = BRAND_PARTS
    combos = [a + b + c for a in first for b in middle for c in last]
    order = rng.permutation(len(combos))
    return [combos[order[i % len(combos)]] + ("" if i < len(combos) else f" {i // len(combos) + 1}")
            for i in range(n)]  # fmt: skip


def _ads(rng: np.random.Generator, spec: ClickSynthSpec, model: dict) -> tuple[pl.DataFrame, dict]:
    n, d, t = spec.ads, spec.factors, len(TOPICS)
    names = tuple(CATEGORIES)
    shares = np.array([CATEGORIES[c][0] for c in names])
    brands = _brands(rng, spec.advertisers)
    brand_category = rng.choice(len(names), size=spec.advertisers, p=shares / shares.sum())
    # Advertisers run Zipf-many ads: a few big ones, many with one or two.
    advertiser = rng.permutation(spec.advertisers)[_draw(rng, _zipf_cdf(spec.advertisers, 1.0), n)]
    category = brand_category[advertiser]
    related = np.zeros((len(names), t))
    for c, name in enumerate(names):
        related[c, [TOPICS.index(topic) for topic in CATEGORIES[name][1]]] = 1.0
    tags = _pick_topics(rng, np.log(TOPIC_WEIGHTS)[None, :] + CATEGORY_TAG_BOOST * related[category],
                        TAG_COUNT_WEIGHTS)  # fmt: skip
    median = np.array([CATEGORIES[c][3] for c in names])[category]
    price = np.maximum(np.round(median * np.exp(PRICE_LOG_SPREAD * rng.standard_normal(n)), 2), 0.99)

    topic_factors = rng.standard_normal((t, d))
    category_factors = rng.standard_normal((len(names), d))
    tag_part = tags @ topic_factors / np.sqrt(tags.sum(axis=1))[:, None]
    factors = _factors((tag_part + category_factors[category]) / np.sqrt(2.0), rng, spec)
    own_bias = spec.ad_bias_std * rng.standard_normal(n)
    model["category"] = _effects(rng, names, spec.ad_attribute_std)
    model["advertiser"] = _effects(rng, brands, spec.ad_attribute_std)
    model["tag"] = _effects(rng, TOPICS, spec.ad_attribute_std)
    steps = np.linspace(0.5, -0.5, len(PRICE_BOUNDARIES) + 1)  # cheapest first
    model["price_bucket"] = (spec.price_effect * steps).tolist()
    tag_mean = tags @ np.array([model["tag"][topic] for topic in TOPICS]) / tags.sum(axis=1)
    effect = (own_bias + np.array([model["category"][c] for c in names])[category]
              + np.array([model["advertiser"][b] for b in brands])[advertiser] + tag_mean
              + np.array(model["price_bucket"])[price_bucket(price)])  # fmt: skip

    adjective = rng.integers(0, len(HEADLINE_ADJECTIVES), size=n)
    noun_pick = rng.integers(0, 1 << 30, size=n)
    tag_lists = _topic_lists(tags)
    headlines = []
    for i in range(n):
        nouns = CATEGORIES[names[category[i]]][2]
        audience = TOPIC_AUDIENCES[tag_lists[i][0]]
        headlines.append(f"{HEADLINE_ADJECTIVES[adjective[i]]} {nouns[noun_pick[i] % len(nouns)]} "
                         f"for {audience} by {brands[advertiser[i]]}, from ${price[i]:.2f}")  # fmt: skip
    keys = pl.Series([f"ad{i:06d}" for i in range(1, n + 1)], dtype=pl.Utf8)
    table = pl.DataFrame({
        "ad_id": keys,
        "advertiser": pl.Series(brands).gather(advertiser),
        "category": pl.Series(names).gather(category),
        "tags": tag_lists,
        "price": price,
        "headline": headlines,
    })  # fmt: skip
    state = pl.DataFrame({"ad_id": keys, "own_bias": own_bias,
                          "factors": pl.Series(factors.tolist(), dtype=pl.List(pl.Float64))})  # fmt: skip
    return table, {"effect": effect, "topics": _mask(tags), "factors": factors, "state": state}


def _logits(world: _World, spec: ClickSynthSpec, user: np.ndarray, ad: np.ndarray,
            position: np.ndarray) -> np.ndarray:  # fmt: skip
    """``[n]`` logits without the bias, of impressions of ``ad`` to ``user`` at ``position``."""
    matches = np.bitwise_count(world.user_topics[user] & world.ad_topics[ad]).astype(np.float64)
    dot = np.einsum("nd,nd->n", world.user_factors[user], world.ad_factors[ad])
    return (world.user_effect[user] + world.ad_effect[ad] + spec.match_effect * matches + dot
            + spec.position_slope * (position - 1))  # fmt: skip


def _draw_impressions(rng: np.random.Generator, world: _World, n: int) -> tuple[np.ndarray, ...]:
    """``n`` impressions' 0-based user, 0-based ad and 1-based position."""
    user = world.user_by_rank[_draw(rng, world.user_cdf, n)]
    ad = world.ad_by_rank[_draw(rng, world.ad_cdf, n)]
    position = rng.choice(len(POSITION_WEIGHTS), size=n, p=POSITION_WEIGHTS / POSITION_WEIGHTS.sum()) + 1
    return user, ad, position


def _solve_bias(logits: np.ndarray, rate: float) -> float:
    """The ``b`` with ``mean(sigmoid(b + logits)) == rate`` (bisection: the mean rises with b)."""
    low, high = -30.0, 30.0
    for _ in range(100):
        mid = (low + high) / 2
        if _sigmoid(mid + logits).mean() < rate:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warning at large |x|


def _world(spec: ClickSynthSpec) -> tuple[pl.DataFrame, pl.DataFrame, dict, _World, list[pl.DataFrame]]:
    rng = np.random.default_rng([spec.seed, 0])
    model: dict = {}
    users, u = _users(rng, spec, model)
    ads, a = _ads(rng, spec, model)
    world = _World(
        user_cdf=_zipf_cdf(spec.users, spec.user_activity_exponent),
        user_by_rank=rng.permutation(spec.users),
        ad_cdf=_zipf_cdf(spec.ads, spec.ad_popularity_exponent),
        ad_by_rank=rng.permutation(spec.ads),
        user_effect=u["effect"], ad_effect=a["effect"], user_topics=u["topics"],
        ad_topics=a["topics"], user_factors=u["factors"], ad_factors=a["factors"],
    )  # fmt: skip
    calibration = _draw_impressions(np.random.default_rng([spec.seed, 2]), world, CALIBRATION_DRAWS)
    model["bias"] = _solve_bias(_logits(world, spec, *calibration), spec.click_rate)
    model["match"] = spec.match_effect
    model["position_slope"] = spec.position_slope
    model["price_boundaries"] = list(PRICE_BOUNDARIES)
    return users, ads, model, world, [u["state"], a["state"]]


def _impressions(rng: np.random.Generator, spec: ClickSynthSpec, world: _World, bias: float,
                 n: int) -> pl.DataFrame:  # fmt: skip
    user, ad, position = _draw_impressions(rng, world, n)
    true_p = _sigmoid(bias + _logits(world, spec, user, ad, position))
    clicked = (rng.random(n) < true_p).astype(np.int8)
    return pl.DataFrame({
        "user_id": pl.Series([f"u{i:07d}" for i in user + 1], dtype=pl.Utf8),
        "ad_id": pl.Series([f"ad{i:06d}" for i in ad + 1], dtype=pl.Utf8),
        "position": position.astype(np.int32),
        "clicked": clicked,
        "true_p": true_p,
    })  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Writing the folder


SCHEMA = {
    "impressions": {"user_id": "str", "ad_id": "str", "position": "i32", "clicked": "i8",
                    "true_p": "f64"},
    "users": {"user_id": "str", "country": "str", "age_group": "str", "device": "str",
              "interests": "list[str]"},
    "ads": {"ad_id": "str", "advertiser": "str", "category": "str", "tags": "list[str]",
            "price": "f64", "headline": "str"},
    "model/users": {"user_id": "str", "own_bias": "f64", "factors": "list[f64]"},
    "model/ads": {"ad_id": "str", "own_bias": "f64", "factors": "list[f64]"},
}  # fmt: skip

SPEC_YAML = f"""\
# The feature spec of a click log written by `recdistill data synth-clicks`
# (features/click_synth.py). Point a job at its folder DIR:
#   data: {{interactions: DIR/impressions, users: DIR/users.parquet, items: DIR/ads.parquet,
#          features: DIR/spec.yaml}}
# The label and keys come from here (do not set data.label). Never name true_p: it is the
# generating model's click probability, which no real log has.
label: {{column: clicked, kind: click}}
user_key: user_id
item_key: ad_id
features:
  - {{name: user_id, table: users, column: user_id, kind: id}}
  # Named item_id: the evaluation's cold/warm slices and the language teachers find a row's
  # item by that feature name.
  - {{name: item_id, table: items, column: ad_id, kind: id}}
  - {{name: position, table: interactions, column: position, kind: categorical}}
  - {{name: country, table: users, column: country, kind: categorical}}
  - {{name: age_group, table: users, column: age_group, kind: categorical}}
  - {{name: device, table: users, column: device, kind: categorical}}
  - {{name: advertiser, table: items, column: advertiser, kind: categorical}}
  - {{name: category, table: items, column: category, kind: categorical}}
  - name: price
    table: items
    column: price
    kind: bucketized
    boundaries: [{", ".join(f"{b:g}" for b in PRICE_BOUNDARIES)}]
  - {{name: interests, table: users, column: interests, kind: multi_hot}}
  - {{name: tags, table: items, column: tags, kind: multi_hot}}
"""

_OURS = ("users.parquet", "ads.parquet", "spec.yaml", "meta.json", "model/users.parquet",
         "model/ads.parquet")  # fmt: skip


def _prepare_folder(out: Path, force: bool) -> None:
    """Make ``out``; when it is not empty, refuse, or with ``force`` remove what we would write."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ValueError(f"{out} is not empty; pass --force to overwrite it")
        # Only our own files go, so that a stale shard of a bigger earlier run is not read back.
        for path in [*out.glob("impressions/part-*.parquet"), *(out / name for name in _OURS)]:
            path.unlink(missing_ok=True)
    (out / "impressions").mkdir(parents=True, exist_ok=True)
    (out / "model").mkdir(exist_ok=True)


def write_click_log(out: str | Path, spec: ClickSynthSpec, force: bool = False) -> dict:
    """Generate ``spec`` into the folder ``out`` and return what ``meta.json`` records.

    Args:
        out: the folder; created when missing.
        spec: sizes, seed and the model's parameters.
        force: write into a non-empty folder, replacing the files a previous run wrote there.

    Returns:
        ``meta.json``'s content: ``generator``, ``generator_version``, ``spec`` (the arguments),
        ``shards``, ``clicks``, ``click_rate`` (of the written impressions), ``model`` (``bias``
        and every effect by name: ``country``, ``age_group``, ``device``, ``category``,
        ``advertiser``, ``tag``, ``price_bucket`` (cheapest first), ``match``,
        ``position_slope``, ``price_boundaries``) and ``schema``.

    Raises:
        ValueError: ``out`` is not empty (without ``force``) or is a file.
    """
    out = Path(out)
    _prepare_folder(out, force)
    users, ads, model, world, (user_state, ad_state) = _world(spec)
    users.write_parquet(out / "users.parquet")
    ads.write_parquet(out / "ads.parquet")
    user_state.write_parquet(out / "model" / "users.parquet")
    ad_state.write_parquet(out / "model" / "ads.parquet")
    (out / "spec.yaml").write_text(SPEC_YAML)
    clicks = 0
    for shard in range(spec.shards):
        n = min(spec.shard_rows, spec.rows - shard * spec.shard_rows)
        rng = np.random.default_rng([spec.seed, 1, shard])
        frame = _impressions(rng, spec, world, model["bias"], n)
        clicks += int(frame["clicked"].cast(pl.Int64).sum())
        frame.write_parquet(out / "impressions" / f"part-{shard:05d}.parquet")
    meta = {
        "generator": "features.click_synth",
        "generator_version": GENERATOR_VERSION,
        "spec": asdict(spec),
        "shards": spec.shards,
        "clicks": clicks,
        "click_rate": clicks / spec.rows,
        "model": model,
        "schema": SCHEMA,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# ---------------------------------------------------------------------------------------------
# The ceiling


def binary_log_loss(p: np.ndarray, clicked: np.ndarray) -> float:
    """Mean log loss of click probabilities ``p`` ``[N]`` for the 0/1 ``clicked`` ``[N]``."""
    p = np.clip(p, 1e-15, 1 - 1e-15)
    return float(-np.mean(np.where(clicked == 1, np.log(p), np.log1p(-p))))


def roc_auc(score: np.ndarray, clicked: np.ndarray) -> float:
    """ROC AUC of ``score`` ``[N]`` for the 0/1 ``clicked`` ``[N]`` (ties count one half: the
    Mann-Whitney statistic, what a trapezoidal ROC curve gives); NaN with one class only."""
    positives = int(clicked.sum())
    negatives = len(clicked) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based, ties averaged
    rank_sum = mean_rank[inverse][clicked == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def ceiling(impressions: pl.DataFrame, rate: float | None = None) -> dict[str, float]:
    """What the generating model scores on ``impressions``, beside a constant click rate.

    Args:
        impressions: the rows to score (e.g. a test split), with ``clicked`` and ``true_p``.
        rate: the constant predictor's click rate (e.g. the training split's, what a model
            can know); default the rows' own.

    Returns:
        ``rows``, ``click_rate`` (of these rows), ``log_loss`` and ``auc`` of ``true_p``,
        ``constant_rate`` and ``constant_log_loss`` (of predicting it for every row).

    Raises:
        ValueError: a column is missing (a real log has no ``true_p``), or no rows.
    """
    missing = [c for c in ("clicked", "true_p") if c not in impressions.columns]
    if missing:
        raise ValueError(f"ceiling: the impressions lack {', '.join(missing)} (only a log written "
                         "by features.click_synth carries the generating model's true_p)")  # fmt: skip
    if impressions.height == 0:
        raise ValueError("ceiling: no impressions to score")
    clicked = impressions["clicked"].cast(pl.Int64).to_numpy()
    true_p = impressions["true_p"].cast(pl.Float64).to_numpy()
    rate = float(clicked.mean()) if rate is None else float(rate)
    return {
        "rows": int(len(clicked)),
        "click_rate": float(clicked.mean()),
        "log_loss": binary_log_loss(true_p, clicked),
        "auc": roc_auc(true_p, clicked),
        "constant_rate": rate,
        "constant_log_loss": binary_log_loss(np.full(len(clicked), rate), clicked),
    }


def gap_closed(log_loss: float, ceiling: dict[str, float]) -> float:
    """The share of the log-loss gap between the constant rate and the generating model that a
    model's ``log_loss`` closes: 0 for the constant, 1 for the generating model."""
    return (ceiling["constant_log_loss"] - log_loss) / (ceiling["constant_log_loss"] - ceiling["log_loss"])
