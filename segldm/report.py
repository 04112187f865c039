"""`python -m segldm.report <sweep folder | MLflow experiment>`: a sweep's runs as a table and plots
(segldm.sweeps.report; docs/sweeps.md)."""

from __future__ import annotations

import sys

from segldm.sweeps.report import main

if __name__ == "__main__":
    sys.exit(main())
