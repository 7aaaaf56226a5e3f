"""``python -m labctl`` is the ``labctl`` command."""

import sys

from labctl.server.cli import main

sys.exit(main())
