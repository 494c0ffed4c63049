"""``python -m aligndraw`` (and ``torchrun -m aligndraw``) runs the command line."""

import sys

from aligndraw.cli import main

sys.exit(main())
