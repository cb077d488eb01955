"""``python -m kimi_linear.train``, also under ``torchrun --nproc-per-node N``: `kimi-linear train`."""

import sys

from kimi_linear.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
