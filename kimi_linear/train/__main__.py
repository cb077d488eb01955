"""``python -m kimi_linear.train`` (and ``torchrun --nproc-per-node N -m kimi_linear.train``): `kimi-linear train`."""

import sys

from kimi_linear.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
