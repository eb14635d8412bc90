"""``python -m predict``: the fedclip-predict command."""

import sys

from predict.cli import main

if __name__ == "__main__":
    sys.exit(main())
