"""PGMQ client module (the predecessor's `commandbus.pgmq`)."""

from commandbus.pgmq.client import PGMQ_NOTIFY_CHANNEL, PgmqClient, PgmqMessage

__all__ = ["PGMQ_NOTIFY_CHANNEL", "PgmqClient", "PgmqMessage"]
