"""The observer interface of a `Worker`: how metrics, tracing and health see handler runs.

A worker calls its observers around each handler run (none attached: a None check per
command); metrics count in the Rust engine instead and are not called per command.
`commandbus.metrics`, `commandbus.tracing` and `commandbus.health` implement it; attach one
with `Worker.add_observer` (their `instrument` functions do).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from commandbus import _native
    from commandbus.models import Command, HandlerContext
    from commandbus.worker import Worker

logger = logging.getLogger(__name__)


class Observer(Protocol):
    """Hooks of one worker's runs. `started` and `finished` run on the worker's event loop for
    every command and must be cheap; their failures are logged, never change an outcome. An
    observer whose `per_command` is False gets only `attach` and `detach` (metrics: the engine
    counts per command)."""

    per_command: bool

    def attach(self, worker: Worker, native: _native.NativeWorker) -> None:
        """A run starts (on the worker's event loop); `native` is its engine."""

    async def claimed(self, batch: Sequence[Any]) -> None:
        """A batch was claimed; its handlers start when this returns."""

    def started(self, command: Command, context: HandlerContext, item: Any) -> Any:
        """A handler run starts; the value returned is given back to `finished`. `item` is the
        claimed row (its last field: microseconds since the epoch the command was sent)."""

    def finished(self, token: Any, outcome_kind: str) -> None:
        """The run ended with this outcome kind (SUCCESS, RETRY, EXHAUSTED, PERMANENT,
        BUSINESS_RULE); `token` is what `started` returned (None if it failed)."""

    async def detach(self, worker: Worker, native: _native.NativeWorker) -> None:
        """The run ended: every outcome is applied (called even if `attach` was not)."""


class BaseObserver:
    """An observer that does nothing: subclass it and override what you need."""

    per_command = True

    def attach(self, worker: Worker, native: _native.NativeWorker) -> None:
        return None

    async def claimed(self, batch: Sequence[Any]) -> None:
        return None

    def started(self, command: Command, context: HandlerContext, item: Any) -> Any:
        return None

    def finished(self, token: Any, outcome_kind: str) -> None:
        return None

    async def detach(self, worker: Worker, native: _native.NativeWorker) -> None:
        return None


class _Combined(BaseObserver):
    """Several observers as one (the worker calls one observer per command)."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self._observers = tuple(observers)

    async def claimed(self, batch: Sequence[Any]) -> None:
        for obs in self._observers:
            try:
                await obs.claimed(batch)
            except Exception:
                logger.exception("observer %r failed", obs)

    def started(self, command: Command, context: HandlerContext, item: Any) -> Any:
        tokens = []
        for obs in self._observers:
            try:
                tokens.append(obs.started(command, context, item))
            except Exception:
                logger.exception("observer %r failed", obs)
                tokens.append(None)
        return tokens

    def finished(self, token: Any, outcome_kind: str) -> None:
        for obs, t in zip(self._observers, token or [None] * len(self._observers), strict=True):
            try:
                obs.finished(t, outcome_kind)
            except Exception:
                logger.exception("observer %r failed", obs)


def combine(observers: Sequence[Observer]) -> Observer | None:
    """None for no observer, the observer itself for one, else one that calls each in turn
    (`attach`/`detach` are called on each by the worker itself)."""
    if not observers:
        return None
    if len(observers) == 1:
        return observers[0]
    return _Combined(observers)


__all__ = ["BaseObserver", "Observer", "combine"]
