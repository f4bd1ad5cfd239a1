"""Pure builders: a validated spec in, Kubernetes objects (dicts) out; no API calls."""
