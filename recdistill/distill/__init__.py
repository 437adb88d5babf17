"""Distillation: the DiverseDistill module, methods registered by name, the trainer, gating.

Knows students and teachers only through the stage API (``recdistill.stages``); never imports
``recdistill.models``.
"""

from recdistill.distill.config import DistillConfig, GatingConfig
from recdistill.distill.methods import METHODS, build_method, register_method
from recdistill.distill.module import AnswerAugmenter, DistillationModule, QuestionAugmenter

__all__ = [
    "METHODS",
    "AnswerAugmenter",
    "DistillConfig",
    "DistillationModule",
    "GatingConfig",
    "QuestionAugmenter",
    "build_method",
    "register_method",
]
