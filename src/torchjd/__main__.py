"""``python -m torchjd``: the command-line interface (see :mod:`torchjd._cli`)."""

import sys

from torchjd._cli import main

sys.exit(main())
