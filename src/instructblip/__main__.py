"""`python -m instructblip` and the `instructblip` console script."""

import sys

from instructblip.cli import main

if __name__ == "__main__":
    sys.exit(main())
