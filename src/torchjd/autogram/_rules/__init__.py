"""Built-in rules, one file per layer family, registered on import.

Besides being called, a built-in rule function may carry attributes that the engine reads:
``weighted_gradients(module, calls, W)`` (the fused step, see ``_fused.py``);
``fuses(module, calls)``, whether ``weighted_gradients`` will give every trainable parameter's
gradient (then the fused step may free the graph in its only backward pass);
``pure(module, calls)``, whether the rule needs nothing but the recorded tensors (then it may run
during the Gramian's backward pass, see ``_streaming.py``); ``inner_edges(module, call)``, points
inside the call's graph whose gradients it wants too; ``recomputes_forward``, whether it re-runs
the module (the random state is then recorded, unless ``draws_random(module)`` says that the call
draws no random numbers).
"""

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from torchjd.autogram._registry import register_builtin_rule
from torchjd.autogram._rules._attention import attention_rule
from torchjd.autogram._rules._conv import conv_rule
from torchjd.autogram._rules._embedding import embedding_rule
from torchjd.autogram._rules._linear import linear_rule
from torchjd.autogram._rules._norm import channel_norm_rule, layer_norm_rule
from torchjd.autogram._rules._rnn import rnn_rule

# Each holds for the class's own computation: a subclass that overrides ``forward`` (or, for the
# convolutions and instance norms, the method that their ``forward`` calls) gets the generic rule.
register_builtin_rule(nn.Linear, linear_rule)
for conv_type in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_builtin_rule(conv_type, conv_rule, assumes=("forward", "_conv_forward"))
register_builtin_rule(nn.Embedding, embedding_rule)
for rnn_type in (nn.RNN, nn.LSTM, nn.GRU):
    register_builtin_rule(rnn_type, rnn_rule)
register_builtin_rule(nn.LayerNorm, layer_norm_rule)
register_builtin_rule(nn.RMSNorm, layer_norm_rule)
register_builtin_rule(nn.GroupNorm, channel_norm_rule)
register_builtin_rule(_InstanceNorm, channel_norm_rule, assumes=("forward", "_apply_instance_norm"))
register_builtin_rule(_BatchNorm, channel_norm_rule)
# Overrides forward (for its process group), but computes as BatchNorm in eval mode, where the
# rule's closed form applies; in training mode (batch statistics), the rule re-runs the module.
register_builtin_rule(nn.SyncBatchNorm, channel_norm_rule)
# Its forward uses its child out_proj's parameters without calling out_proj.
register_builtin_rule(nn.MultiheadAttention, attention_rule, covers_children=True)
