"""Reconcile logic: controller classes that receive their dependencies (no kopf here)."""
