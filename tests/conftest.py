"""Session-wide test setup.

Without CUDA, Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``). It must be set before any kernel
module is imported, since the kernels are defined for the interpreter or the GPU at import. Test files that need
it also set it themselves, but collection imports them in order, and a file that imports the kernels first (for
example ``tests/test_generate.py`` run alone before ``tests/layers``) would otherwise fix them for the GPU. The
interpreter's bf16 dot and cast are then made to compute as the GPU does (``tests/triton_interpreter.py``).
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    from tests.triton_interpreter import install as install_interpreter_bf16

    install_interpreter_bf16()  # bf16 dots and casts as the GPU computes them


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow_build`` run after all the others: on a cold Triton cache their kernels (K = V = 256)
    build for minutes, and a run cut off by a time limit should have run everything else first."""
    items.sort(key=lambda item: item.get_closest_marker("slow_build") is not None)
