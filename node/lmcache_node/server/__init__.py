"""The node cache server process (ZMQ ROUTER, worker pool, session reaper, HTTP API)."""
