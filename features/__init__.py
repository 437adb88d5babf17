"""The feature layer: the feature spec, sources (MovieLens, a team's own parquet / CSV tables),
vocabularies, splits, batches (in memory or streamed) and the verbalizer.

Everything here reads and reshapes data with polars and ends in tensors; nothing here knows
about models. Data flows one way: ``features -> recdistill.models -> recdistill.distill ->
pipelines``.
"""

from features.config import DataConfig
from features.sources import DataError, MovieLens, load_movielens

__all__ = ["DataConfig", "DataError", "MovieLens", "load_movielens"]
