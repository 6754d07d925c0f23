"""``python -m rotator`` is ``lg-rotate``."""

import sys

from rotator.cli import main

sys.exit(main())
