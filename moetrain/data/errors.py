"""The data pipeline's user-facing error type."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the data the user asked for; the message is one line saying what to do."""
