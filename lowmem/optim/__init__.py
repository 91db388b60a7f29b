"""lowmem.optim: memory-efficient Adam variants in plain PyTorch (no Lightning import).

    from lowmem.optim import HMAdamW
    opt = HMAdamW(model.parameters(), lr=1e-3)

See ``ALGORITHMS.md`` (docs/algorithms.md) for the exact update rules each class implements.
"""

from lowmem.optim._base import Capabilities, LowMemOptimizer
from lowmem.optim.memory import state_bytes, tensor_bytes
from lowmem.optim.roles import ParamRole, Role, classify_parameters, weight_decay_param_groups

__all__ = [
    "Capabilities",
    "LowMemOptimizer",
    "ParamRole",
    "Role",
    "classify_parameters",
    "state_bytes",
    "tensor_bytes",
    "weight_decay_param_groups",
]
