"""Tensor ops: pure functions, no modules, no config."""
