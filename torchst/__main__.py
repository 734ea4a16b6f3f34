"""``python -m torchst ...`` is the same as the ``torchst`` console script."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
