"""Every test starts from the same global RNG state: layers draw their initial weights
from it (as e3nn's do), so a test's weights do not depend on which tests ran before."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_global_rng():
    state = torch.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.set_rng_state(state)
