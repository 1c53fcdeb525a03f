"""The `humanconnect` command line."""

from humanconnect.cli.main import main

__all__ = ["main"]
