"""``python -m sparse``: the sparsekern command line (see sparse/cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
