"""Built-in rules, one file per layer family, registered on import."""

from torch import nn

from torchjd.autogram._registry import register_rule
from torchjd.autogram._rules._generic import generic_subtree_rule
from torchjd.autogram._rules._linear import linear_rule

register_rule(nn.Linear, linear_rule)
register_rule(nn.MultiheadAttention, generic_subtree_rule, covers_children=True)
