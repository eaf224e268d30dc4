"""`python -m harness.server` runs the device process (see harness.server.cli)."""

import sys

from harness.server.cli import main

sys.exit(main())
