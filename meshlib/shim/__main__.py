"""``python -m meshlib.shim``: see :mod:`meshlib.shim.main`."""

import sys

from meshlib.shim.main import main

sys.exit(main())
