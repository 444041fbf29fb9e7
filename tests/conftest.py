import os
import sys
from pathlib import Path

# The test helpers (builders.py) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

# Tables wrap to $COLUMNS where it is set (bnfold.console.width); the tests read them as a pipe does.
# Set, then unset: readline (imported by pytest's debugger) exports COLUMNS behind os.environ's back,
# and unsetting only a name os.environ holds would leave it for every subprocess.
os.environ["COLUMNS"] = ""
del os.environ["COLUMNS"]
