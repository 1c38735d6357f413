"""torchjd._amp: autocast turned off on a tensor's device, also on a torch without
``torch.amp.is_autocast_available`` (before 2.4)."""

import pytest
import torch

from torchjd._amp import without_autocast


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("old_torch", [False, True])
def test_autocast_is_off_inside_and_restored_after(old_torch: bool, monkeypatch):
    if old_torch:
        monkeypatch.delattr(torch.amp, "is_autocast_available")
    x = torch.ones(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with without_autocast(x):
            assert not torch.is_autocast_enabled("cpu")
            assert (x @ x).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
        with without_autocast("not a tensor"):
            assert torch.is_autocast_enabled("cpu")
    with without_autocast(x):  # off already: nothing to do
        assert not torch.is_autocast_enabled("cpu")
