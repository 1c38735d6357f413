import pytest
import torch


@pytest.fixture(autouse=True)
def _float64_one_thread():
    """Float64 oracles; one thread, since these small problems only lose time to thread hand-offs
    on a shared machine."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
