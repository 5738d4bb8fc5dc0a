#!/usr/bin/env python
"""Start PathLDM's local web app for pathologists (same as the ``pathldm-app`` command).

Three pages: Generate (images from tumor/TIL levels and a summary), Summary review (a random
5% of the report summaries) and a blinded real-vs-synthetic Reader study. See
``python scripts/app.py --help``.
"""
from __future__ import annotations

import sys

from pathldm_app.cli import main

if __name__ == "__main__":
    sys.exit(main())
