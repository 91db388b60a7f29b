"""LightningModules and data for lowmem: subclass one for your own model."""

from lowmem.lightning_modules.base import ConfigError, LowMemModule, default_optimizer
from lowmem.lightning_modules.diffusion import DiffusionModel, image_grid
from lowmem.lightning_modules.digits import DigitsDataModule, load_digits_tensors
from lowmem.lightning_modules.gpt import GPT, GPTConfig
from lowmem.lightning_modules.image_classifier import ImageClassifier
from lowmem.lightning_modules.integration import FoldedMomentumMixin, LowMemCallback, TrainingDiverged
from lowmem.lightning_modules.language_model import LanguageModel
from lowmem.lightning_modules.sampling import ResumableSampler
from lowmem.lightning_modules.streaming import StreamingDataModule, write_chunks
from lowmem.lightning_modules.text import StdlibTextDataModule, stdlib_corpus
from lowmem.lightning_modules.unet import UNet

__all__ = [
    "GPT",
    "ConfigError",
    "DiffusionModel",
    "DigitsDataModule",
    "FoldedMomentumMixin",
    "GPTConfig",
    "ImageClassifier",
    "LanguageModel",
    "LowMemCallback",
    "LowMemModule",
    "ResumableSampler",
    "StdlibTextDataModule",
    "StreamingDataModule",
    "TrainingDiverged",
    "UNet",
    "default_optimizer",
    "image_grid",
    "load_digits_tensors",
    "stdlib_corpus",
    "write_chunks",
]
