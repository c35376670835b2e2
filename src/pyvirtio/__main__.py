"""``python -m pyvirtio``: the pyvirtio command."""

from __future__ import annotations

import sys

from pyvirtio.cli import main

sys.exit(main())
