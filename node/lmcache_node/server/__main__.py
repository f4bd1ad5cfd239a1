"""``python -m lmcache_node.server``: the node cache server."""

import sys

from lmcache_node.server.cli import main

sys.exit(main())
