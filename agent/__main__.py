"""`python -m agent` is the `dnstls-agent` command."""

import sys

from agent.cli import main

sys.exit(main())
