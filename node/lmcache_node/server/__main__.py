"""``python -m lmcache_node.server``: the node cache server, as ``lmcache-node serve``.

Dispatched by name through the command line (``lmcache_node.cli``), which loads the serve
command lazily: the server package itself never imports the HTTP API above it.
"""

import sys

from lmcache_node.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
