"""The autogram engine: Gramians of Jacobians, computed layer by layer without the Jacobian."""

from torchjd.autogram._engine import Engine
from torchjd.autogram._module_call import ModuleCall
from torchjd.autogram._registry import Rule, WeightedGradients, register_rule

__all__ = ["Engine", "ModuleCall", "Rule", "WeightedGradients", "register_rule"]
