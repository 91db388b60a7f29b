"""LightningModules and data for lowmem: subclass one for your own model."""

from lowmem.lightning_modules.base import ConfigError, LowMemModule, default_optimizer
from lowmem.lightning_modules.digits import DigitsDataModule, load_digits_tensors
from lowmem.lightning_modules.image_classifier import ImageClassifier

__all__ = [
    "ConfigError",
    "DigitsDataModule",
    "ImageClassifier",
    "LowMemModule",
    "default_optimizer",
    "load_digits_tensors",
]
