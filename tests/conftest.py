import os
import sys

import pytest
import torch

# Tests import the independent reference implementations as `reference`.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    # The test models are tiny: on a shared 2-core machine, thread handoffs cost far more than they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
