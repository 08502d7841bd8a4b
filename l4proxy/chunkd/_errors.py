"""Errors of the reference service: each maps to one CWP/1 error code."""

from __future__ import annotations

from l4proxy.wire import ErrorCode

__all__ = ["ChunkdConfigError", "ServiceError"]


class ServiceError(Exception):
    """A request failed in a way the client should hear about, with its wire code.

    The message is sent to the client, so it must never contain secrets or host paths.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ChunkdConfigError(Exception):
    """The service's command line, key file or data directory is unusable."""
