"""Tensor ops: pure functions, no modules, no config."""

import importlib.util

# Looked up once at import: a constant torch.compile can read (it refuses to trace importlib's find_spec).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
