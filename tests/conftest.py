import pytest
import torch

from memoe_fast.testing import shared_data_path


def pytest_configure(config):
    config.addinivalue_line("markers", "interpret: runs Triton kernels (under TRITON_INTERPRET=1 on CPU)")
    config.addinivalue_line("markers", "slow: loads the embedded real model")


@pytest.fixture
def shared_data():
    """Returns a function giving a path in ../shared/data, skipping the test with a reason when absent."""

    def get(name: str) -> str:
        path = shared_data_path(name)
        if path is None:
            pytest.skip(f"{name} not found in ../shared/data (the shared data sets are not shipped with the project)")
        return path

    return get


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
