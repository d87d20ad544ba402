"""Operator APIs: the troubleshooting queue."""

from commandbus.ops.troubleshooting import TroubleshootingQueue

__all__ = ["TroubleshootingQueue"]
