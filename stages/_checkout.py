"""Imported first by every stage script: this checkout's aevae, not an installed copy, comes first on
sys.path. Inside `dvc exp run` a stage runs in DVC's copy of the commit under test and must run that
commit's code, while the virtual environment's editable install points at the user's working tree."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if sys.path[:1] != [ROOT]:
    sys.path.insert(0, ROOT)
