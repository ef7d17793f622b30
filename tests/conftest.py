import os
import sys

import pytest
import torch

# Tests import the independent reference implementations as `reference`.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
