import sys

from kimi_linear.cli import main

sys.exit(main())
