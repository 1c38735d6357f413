"""``python -m torchjd``: the command-line interface (see :mod:`torchjd._cli`)."""

import sys

from torchjd._cli import main

if __name__ == "__main__":  # not when imported (e.g. by doctest collection)
    sys.exit(main())
