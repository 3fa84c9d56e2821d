"""The error types of the node. Subsystems subclass these; the API layer maps them to answers."""

from __future__ import annotations


class NcpError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(NcpError):
    """A node's configuration is missing, malformed or unsafe; the message names the key."""


class ArchiveError(NcpError):
    """The image archive could not answer (down, refused, timed out, or answered nonsense)."""


class UnreadableInstance(NcpError):
    """One file or instance cannot be indexed; the indexer records the reason and goes on."""

    def __init__(self, locator: str, reason: str) -> None:
        super().__init__(f"{locator}: {reason}")
        self.locator = locator
        self.reason = reason
