"""`python -m bayesvlm_ext fit ...`: the command line of bayesvlm_ext.cli."""

import sys

from .cli import main

sys.exit(main())
