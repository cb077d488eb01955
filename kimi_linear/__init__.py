"""kimi-linear: Kimi Linear (arXiv 2510.26692) — KDA kernels, the 3:1 KDA:MLA hybrid model, checkpoints,
generation and training."""

__version__ = "0.1.0"
