"""``python -m twlib.bench NAME --params FILE``."""
import sys

from . import main

sys.exit(main())
