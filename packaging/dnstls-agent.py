#!/usr/bin/python3
"""The installed `dnstls-agent` command (/usr/bin/dnstls-agent in the distro packages).

The Python package is called `agent`, a name too generic for the shared
dist-packages: the packages put it in a private directory, which this launcher puts
first on the module path. Nothing else here: `agent.cli` is the command.
"""

import sys

sys.path.insert(0, "/usr/lib/dnstls-agent")

from agent.cli import main

sys.exit(main())
