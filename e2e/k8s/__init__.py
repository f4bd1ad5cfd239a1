"""End-to-end suite on a real Kubernetes node; e2e/kind runs the same tests on kind."""
