"""`python -m lmcache_node` is `lmcache-node`."""

import sys

from lmcache_node.cli import main

sys.exit(main())
