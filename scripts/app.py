#!/usr/bin/env python
"""Start PathLDM's local web app for pathologists (same as the ``pathldm-app`` command).

Three pages: Generate (images from tumor/TIL levels and a summary), Summary review (a random
5% of the report summaries) and a blinded real-vs-synthetic Reader study. See
``python scripts/app.py --help``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from pathldm_app.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
