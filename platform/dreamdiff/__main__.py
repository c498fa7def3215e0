"""`python -m dreamdiff`: the `dreamdiff` command."""

import sys

from dreamdiff.cli import main

sys.exit(main())
