"""``python -m learnax``: the same as the ``learnax`` command."""

import sys

from learnax.cli import main

sys.exit(main())
