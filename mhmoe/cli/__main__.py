"""`python -m mhmoe.cli`: the same entry point as the `mhmoe` console script."""

import sys

from mhmoe.cli.main import main

sys.exit(main())
