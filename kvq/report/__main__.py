"""``python -m kvq.report`` = ``kvq report``."""

import sys

from .cli import main

sys.exit(main())
