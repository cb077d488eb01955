import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow_build`` run after all the others: on a cold Triton cache their kernels (K = V = 256)
    build for minutes, and a run cut off by a time limit should have run everything else first."""
    items.sort(key=lambda item: item.get_closest_marker("slow_build") is not None)
