"""Whether a solver's step runs under autograd on tracked inputs (a Gramian that requires grad):
there, some steps avoid in-place writes to tensors that a backward pass may need, or keep failed
factorisations out of the graph."""

import torch
from torch import Tensor


def tracked(*tensors: Tensor) -> bool:
    """Whether grad mode is on and one of ``tensors`` requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
