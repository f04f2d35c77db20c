"""ebdiff: Early-Bird tickets for cheaper diffusion training."""
__version__ = "0.1.0"
