"""The process reply router for synchronous code (`SyncProcessReplyRouter`)."""

from commandbus.sync.process.router import SyncProcessReplyRouter

__all__ = ["SyncProcessReplyRouter"]
