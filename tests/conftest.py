import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

SHARED_HESSIANS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hessians",
                               "clip-vit-b-32-laion2b")


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def published_factor_dir():
    path = os.path.abspath(SHARED_HESSIANS)
    if not os.path.isdir(path):
        pytest.skip(f"the published factors are not beside the checkout ({path} is absent)")
    return path
