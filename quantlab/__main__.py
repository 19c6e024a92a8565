"""``python -m quantlab``: the same entry point as the ``quantlab`` script (handlers first, then the work)."""

import sys

from .cli import main

sys.exit(main())
