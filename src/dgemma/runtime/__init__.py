"""Backends implementing dgemma.runtime.base.Backend."""
