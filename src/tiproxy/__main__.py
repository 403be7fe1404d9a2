"""`python -m tiproxy`: the same as the `tiproxy` command."""

import sys

from tiproxy.cli.server import main

sys.exit(main())
