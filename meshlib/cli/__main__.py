"""``python -m meshlib.cli``: the same as the ``meshctl`` script."""

import sys

from meshlib.cli.app import main

sys.exit(main())
