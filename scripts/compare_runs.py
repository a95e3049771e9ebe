"""Compare runs: python scripts/compare_runs.py multirun/2026-01-01/12-00-00 [--out curves.png]

The same as `python -m pufferfish.compare`; see pufferfish/compare.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pufferfish.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
