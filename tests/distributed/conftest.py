"""One launch of 4 ranks for the equivalence tests of both engines: starting processes is what
costs on a small machine."""

from typing import Any

import pytest

from tests.distributed.launch import run_on_ranks


def _every_step(rank: int, world_size: int) -> dict[str, Any]:
    from tests.distributed import (
        test_fsdp,
        test_fsdp_autojac,
        test_gramian,
        test_jac_to_grad,
        test_sharded,
        test_sharded_engine,
    )

    return {
        "autojac": test_jac_to_grad.distributed_steps(rank, world_size),
        "autogram": test_gramian.distributed_steps(rank, world_size),
        "sharded_autogram": test_sharded_engine.distributed_steps(rank, world_size),
        "fsdp": test_fsdp.distributed_steps(rank, world_size),
        "fsdp_autojac": test_fsdp_autojac.distributed_steps(rank, world_size),
        "sharded_autojac": test_sharded.distributed_steps(rank, world_size),
    }


@pytest.fixture(scope="session")
def four_ranks() -> list[Any]:
    """What each of 4 ranks returned (or ``("raised", type, message)``)."""
    # every equivalence test of both engines in one launch: a generous limit on a loaded machine
    results = run_on_ranks(_every_step, 4, timeout_s=150.0)
    for result in results:
        assert isinstance(result, dict), result
    return results
