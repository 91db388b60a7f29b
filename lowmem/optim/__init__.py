"""lowmem.optim: memory-efficient Adam variants in plain PyTorch (no Lightning import).

    from lowmem.optim import HMAdamW
    opt = HMAdamW(model.parameters(), lr=1e-3)

See ``docs/algorithms.md`` for the exact update rules each class implements.
"""

from lowmem.optim._base import Capabilities, LowMemOptimizer
from lowmem.optim.adafactor import Adafactor
from lowmem.optim.adam_mini import AdamMini, adam_mini_param_groups
from lowmem.optim.adams import AdamS
from lowmem.optim.adapm import AdaPM, adapm_param_groups
from lowmem.optim.hmadam import HMAdam, HMAdamW
from lowmem.optim.ioadam import IOAdam
from lowmem.optim.memory import sharded_state_bytes, state_bytes, tensor_bytes
from lowmem.optim.roles import ParamRole, Role, classify_parameters, weight_decay_param_groups
from lowmem.optim.slim_rules import load_slim_rules, save_slim_rules, slimadam_param_groups, snr_rules
from lowmem.optim.slimadam import SlimAdamW

__all__ = [
    "AdaPM",
    "Adafactor",
    "AdamMini",
    "AdamS",
    "Capabilities",
    "HMAdam",
    "HMAdamW",
    "IOAdam",
    "LowMemOptimizer",
    "ParamRole",
    "Role",
    "SlimAdamW",
    "adam_mini_param_groups",
    "adapm_param_groups",
    "classify_parameters",
    "load_slim_rules",
    "save_slim_rules",
    "slimadam_param_groups",
    "snr_rules",
    "sharded_state_bytes",
    "state_bytes",
    "tensor_bytes",
    "weight_decay_param_groups",
]
