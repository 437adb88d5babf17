"""What differs between a job on ratings, on clicks and on images: a small domain adapter the
job engine (:mod:`pipelines.engine`) asks.

A domain (:class:`~pipelines.domains.base.Domain`) loads the data, builds a model by name and
rebuilds one from its checkpoint, exports the student for serving, and describes the data (its
summary, its reference predictors, its MLflow dataset inputs, what makes two holdout figures
comparable). The task and its headline metric come from the data
(:mod:`recdistill.training.tasks`), so the engine needs no more.

- :class:`~pipelines.domains.recommendation.RatingsDomain`: a rating log (MovieLens or a
  team's own interactions), its TorchRec recommenders, a TorchScript student of raw values.
- :class:`~pipelines.domains.recommendation.ClicksDomain`: the same for a click label (its
  reference is the training click rate instead of the mean and bias predictors).
- :class:`~pipelines.domains.images.ImagesDomain`: an image data set, ViT and CLIP models, a
  traced ViT student taking image tensors.

Example::

    domain = domain_for(load_config("quick"))        # RatingsDomain
    domain = domain_for(load_vision_config("vision_quick"))  # ImagesDomain
"""

from __future__ import annotations

from typing import Any

from pipelines.domains.base import Domain


def domain_for(cfg: Any) -> Domain:
    """The domain adapter of a validated job config (a ``JobConfig`` or a ``VisionJobConfig``)."""
    from pipelines.vision_config import VisionJobConfig

    if isinstance(cfg, VisionJobConfig):
        from pipelines.domains.images import ImagesDomain

        return ImagesDomain(cfg)
    from pipelines.domains.recommendation import ClicksDomain, RatingsDomain

    label = cfg.data.spec_for("ml-100k").label
    return ClicksDomain(cfg) if label.kind == "click" else RatingsDomain(cfg)
