"""A pull-only, pull-through, caching OCI Distribution server on Twisted."""

__version__ = "0.1.0"
