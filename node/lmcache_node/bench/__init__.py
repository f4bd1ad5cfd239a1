"""Benchmarks: `lmcache-node bench --json` prints one JSON object, ratios against memcpy."""
