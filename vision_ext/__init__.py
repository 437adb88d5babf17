"""Vision extension: a ViT student, ViT and CLIP teachers and image data sets, in the stage API.

The models (:mod:`vision_ext.models`) follow DESIGN.md section 1, so ``recdistill.distill``
distils them exactly as it distils the recommenders; nothing here is imported by the core.
"""
