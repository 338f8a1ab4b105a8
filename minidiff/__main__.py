"""`python -m minidiff ...` is the `minidiff` command (inside a venv or a notebook, and for `torchrun -m minidiff`)."""

import sys

from minidiff.cli import main

sys.exit(main())
