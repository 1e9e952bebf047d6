"""clickvec: live user-behaviour streams into compact per-user vectors."""

__version__ = "0.1.0"
