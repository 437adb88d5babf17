"""recdistill: distil a committee of frozen teachers into a small TorchRec recommender."""

__version__ = "0.1.0"
