"""``python -m client_app.predict``: the fedclip-predict command."""

import sys

from client_app.predict.cli import main

if __name__ == "__main__":
    sys.exit(main())
