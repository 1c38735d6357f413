"""Shared assertions: the engine's Gramian against the brute-force one."""

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from tests.reference.jacobians import brute_force_gramian
from torchjd.autogram import Engine


def trainable(*modules: nn.Module) -> list[Tensor]:
    seen: dict[int, Tensor] = {}
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


def assert_gramian_exact(
    modules: Sequence[nn.Module],
    forward: Callable[[], Tensor],
    batch_dim: int | None,
    params: Sequence[Tensor] | None = None,
    rtol: float = 1e-10,
) -> Tensor:
    """Runs ``forward`` under an engine over ``modules`` and compares with brute force."""
    with Engine(*modules, batch_dim=batch_dim) as engine:
        output = forward()
        G = engine.compute_gramian(output)
    expected = brute_force_gramian(output, trainable(*modules) if params is None else params)
    assert G.shape == (output.numel(), output.numel())
    assert G.dtype == output.dtype
    scale = expected.abs().max().clamp(min=1e-30)
    assert (G - expected).abs().max() <= rtol * scale, (G - expected).abs().max() / scale
    return G
