"""Optimizer strategies: optimizer + parameter groups + zero_grad policy + precision + checks.

Select one in a config as ``model.init_args.optimizer.class_path: lowmem.strategies.<Name>``.
"""

from lowmem.strategies.base import CallableStrategy, OptimizerStrategy
from lowmem.strategies.checks import StrategyError, capabilities_of, check_trainer, clip_gradients
from lowmem.strategies.catalog import AdaPM, AdamMini, AdamS, AdamW, Adafactor, HMAdam, HMAdamW, IOAdam, SlimAdamW
from lowmem.strategies.precision import FoldedMomentumPrecision, folds_momentum

__all__ = [
    "AdaPM",
    "AdamMini",
    "AdamS",
    "AdamW",
    "Adafactor",
    "CallableStrategy",
    "FoldedMomentumPrecision",
    "HMAdam",
    "HMAdamW",
    "IOAdam",
    "OptimizerStrategy",
    "SlimAdamW",
    "StrategyError",
    "capabilities_of",
    "check_trainer",
    "clip_gradients",
    "folds_momentum",
]
