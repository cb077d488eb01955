import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread: small tensors run faster so, immune to a busy machine, and the same numbers everywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
