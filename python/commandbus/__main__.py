"""`python -m commandbus ...` is the `rcmd` command line (`commandbus.cli`)."""

import sys

from commandbus.cli import main

if __name__ == "__main__":
    sys.exit(main())
