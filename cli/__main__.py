"""`python -m aube.cli` is the `aube` command."""

from __future__ import annotations

import sys

from aube.cli.main import main

sys.exit(main())
