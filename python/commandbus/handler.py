"""Handler registry for command dispatch.

Handlers are callables ``handler(command, context)``. They may be ``async def``
functions (run as asyncio tasks by the worker) or plain ``def`` functions (run
in a thread pool). :meth:`HandlerRegistry.resolve` tells the worker which.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from commandbus.exceptions import (
    HandlerAlreadyRegisteredError,
    HandlerNotFoundError,
    ValidationError,
)
from commandbus.models import Command, HandlerContext

__all__ = [
    "AnyHandlerFn",
    "HandlerFn",
    "HandlerMeta",
    "HandlerRegistry",
    "ResolvedHandler",
    "SyncHandlerFn",
    "get_handler_meta",
    "handler",
]

logger = logging.getLogger(__name__)

HandlerFn: TypeAlias = Callable[[Command, HandlerContext], Awaitable[Any]]
"""An async handler."""
SyncHandlerFn: TypeAlias = Callable[[Command, HandlerContext], Any]
"""A plain (blocking) handler."""
AnyHandlerFn: TypeAlias = Callable[[Command, HandlerContext], Any]
"""Either kind of handler."""

_HANDLER_ATTR = "_commandbus_handler_meta"

F = TypeVar("F", bound=Callable[..., Any])
H = TypeVar("H", bound=AnyHandlerFn)


@dataclass(frozen=True)
class HandlerMeta:
    """Metadata attached to functions decorated with :func:`handler`."""

    domain: str
    command_type: str


@dataclass(frozen=True)
class ResolvedHandler:
    """A registered handler and whether calling it returns a coroutine."""

    fn: AnyHandlerFn
    is_async: bool


def _check_key(domain: object, command_type: object) -> None:
    if not isinstance(domain, str) or not domain:
        raise ValidationError("domain", domain, "must be a non-empty str")
    if not isinstance(command_type, str) or not command_type:
        raise ValidationError("command_type", command_type, "must be a non-empty str")


def _is_async_callable(fn: object) -> bool:
    """True for coroutine functions, async bound methods, partials of them and
    objects whose ``__call__`` is a coroutine function."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isroutine(fn) or inspect.isclass(fn) or not callable(fn):
        return False
    return inspect.iscoroutinefunction(fn.__call__)


def handler(domain: str, command_type: str) -> Callable[[F], F]:
    """Mark a function or method as the handler of ``domain``/``command_type``.

    Decorated methods are discovered by :meth:`HandlerRegistry.register_instance`;
    decorated module-level functions are registered with
    :meth:`HandlerRegistry.register_function`. The function is returned
    unchanged.

    Example:
        class PaymentHandlers:
            @handler(domain="payments", command_type="DebitAccount")
            async def handle_debit(self, cmd: Command, ctx: HandlerContext) -> dict:
                return {"status": "ok"}

        registry.register_instance(PaymentHandlers())
    """
    _check_key(domain, command_type)
    meta = HandlerMeta(domain=domain, command_type=command_type)

    def decorator(fn: F) -> F:
        setattr(fn, _HANDLER_ATTR, meta)
        if isinstance(fn, staticmethod | classmethod):
            # Attribute lookups through the instance return the inner function.
            setattr(fn.__func__, _HANDLER_ATTR, meta)
        return fn

    return decorator


def get_handler_meta(fn: Callable[..., Any]) -> HandlerMeta | None:
    """Return the :class:`HandlerMeta` of a decorated function, else None."""
    meta = getattr(fn, _HANDLER_ATTR, None)
    return meta if isinstance(meta, HandlerMeta) else None


def _make_sync_wrapper(fn: HandlerFn) -> SyncHandlerFn:
    """Adapt an async handler to a blocking call (for use in worker threads)."""

    def sync_wrapper(command: Command, context: HandlerContext) -> Any:
        return asyncio.run(_await(fn(command, context)))

    return sync_wrapper


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class HandlerRegistry:
    """Maps ``(domain, command_type)`` pairs to handlers.

    Example:
        registry = HandlerRegistry()

        @registry.handler("payments", "DebitAccount")
        async def handle_debit(command: Command, context: HandlerContext) -> dict:
            return {"processed": True}

        registry.register("payments", "CreditAccount", handle_credit)
    """

    def __init__(self) -> None:
        """Create an empty registry."""
        self._handlers: dict[tuple[str, str], ResolvedHandler] = {}
        self._sync_handlers: dict[tuple[str, str], SyncHandlerFn] = {}

    # -- async worker registry (accepts async and plain callables) ----------

    def register(self, domain: str, command_type: str, handler: AnyHandlerFn) -> None:
        """Register a handler (``async def``, plain ``def`` or async callable).

        Raises:
            ValidationError: If domain/command_type is not a non-empty str or
                the handler is not callable.
            HandlerAlreadyRegisteredError: If the pair is already registered.
        """
        _check_key(domain, command_type)
        if not callable(handler):
            raise ValidationError("handler", handler, "must be callable")
        key = (domain, command_type)
        if key in self._handlers:
            raise HandlerAlreadyRegisteredError(domain, command_type)
        is_async = _is_async_callable(handler)
        self._handlers[key] = ResolvedHandler(fn=handler, is_async=is_async)
        logger.debug(
            "Registered %s handler for %s.%s",
            "async" if is_async else "sync",
            domain,
            command_type,
        )

    def handler(self, domain: str, command_type: str) -> Callable[[H], H]:
        """Decorator that registers the function and returns it unchanged."""

        def decorator(fn: H) -> H:
            self.register(domain, command_type, fn)
            return fn

        return decorator

    def register_function(self, fn: AnyHandlerFn) -> tuple[str, str]:
        """Register a function decorated with :func:`handler`.

        Returns:
            The ``(domain, command_type)`` pair read from the decoration.

        Raises:
            ValidationError: (a ValueError) if ``fn`` is not decorated.
            HandlerAlreadyRegisteredError: If the pair is already registered.
        """
        meta = get_handler_meta(fn)
        if meta is None:
            raise ValidationError("fn", fn, "is not decorated with @handler(domain, command_type)")
        self.register(meta.domain, meta.command_type, fn)
        return (meta.domain, meta.command_type)

    def resolve(self, domain: str, command_type: str) -> ResolvedHandler | None:
        """Return the handler and its kind, or None if nothing is registered.

        Handlers registered with :meth:`register` take precedence; handlers
        registered only with :meth:`register_sync` are returned as sync.
        """
        key = (domain, command_type)
        resolved = self._handlers.get(key)
        if resolved is not None:
            return resolved
        sync_fn = self._sync_handlers.get(key)
        if sync_fn is not None:
            return ResolvedHandler(fn=sync_fn, is_async=False)
        return None

    def get(self, domain: str, command_type: str) -> AnyHandlerFn | None:
        """Return the handler registered with :meth:`register`, or None."""
        resolved = self._handlers.get((domain, command_type))
        return None if resolved is None else resolved.fn

    def get_or_raise(self, domain: str, command_type: str) -> AnyHandlerFn:
        """Return the handler, raising :class:`HandlerNotFoundError` if absent."""
        fn = self.get(domain, command_type)
        if fn is None:
            raise HandlerNotFoundError(domain, command_type)
        return fn

    async def dispatch(self, command: Command, context: HandlerContext) -> Any:
        """Call the handler for ``command`` and return its result.

        Async handlers are awaited; plain handlers are called directly (on
        the event loop thread) and an awaitable they return is awaited.

        Raises:
            HandlerNotFoundError: If no handler is registered.
        """
        key = (command.domain, command.command_type)
        resolved = self._handlers.get(key)
        if resolved is None:
            raise HandlerNotFoundError(command.domain, command.command_type)
        logger.debug(
            "Dispatching %s.%s (command_id=%s)",
            command.domain,
            command.command_type,
            command.command_id,
        )
        result = resolved.fn(command, context)
        if inspect.isawaitable(result):
            result = await result
        return result

    def has_handler(self, domain: str, command_type: str) -> bool:
        """True if a handler was registered with :meth:`register`."""
        return (domain, command_type) in self._handlers

    def registered_handlers(self) -> list[tuple[str, str]]:
        """All ``(domain, command_type)`` pairs registered with :meth:`register`."""
        return list(self._handlers)

    # -- sync registry (reliable-cmd SyncWorker API) ------------------------

    def register_sync(self, domain: str, command_type: str, handler: SyncHandlerFn) -> None:
        """Register a blocking handler in the sync registry.

        Raises:
            ValidationError: If domain/command_type is invalid or the handler
                is not callable.
            HandlerAlreadyRegisteredError: If the pair is already registered.
        """
        _check_key(domain, command_type)
        if not callable(handler):
            raise ValidationError("handler", handler, "must be callable")
        key = (domain, command_type)
        if key in self._sync_handlers:
            raise HandlerAlreadyRegisteredError(domain, command_type)
        self._sync_handlers[key] = handler
        logger.debug("Registered sync handler for %s.%s", domain, command_type)

    def sync_handler(self, domain: str, command_type: str) -> Callable[[H], H]:
        """Decorator that registers a blocking handler and returns it unchanged."""

        def decorator(fn: H) -> H:
            self.register_sync(domain, command_type, fn)
            return fn

        return decorator

    def get_sync(self, domain: str, command_type: str) -> SyncHandlerFn | None:
        """Return the sync handler, or None."""
        return self._sync_handlers.get((domain, command_type))

    def get_sync_or_raise(self, domain: str, command_type: str) -> SyncHandlerFn:
        """Return the sync handler, raising :class:`HandlerNotFoundError`."""
        fn = self.get_sync(domain, command_type)
        if fn is None:
            raise HandlerNotFoundError(domain, command_type)
        return fn

    def dispatch_sync(self, command: Command, context: HandlerContext) -> Any:
        """Call the sync handler for ``command`` and return its result."""
        fn = self.get_sync_or_raise(command.domain, command.command_type)
        logger.debug(
            "Dispatching (sync) %s.%s (command_id=%s)",
            command.domain,
            command.command_type,
            command.command_id,
        )
        return fn(command, context)

    def has_sync_handler(self, domain: str, command_type: str) -> bool:
        """True if a handler is registered in the sync registry."""
        return (domain, command_type) in self._sync_handlers

    def registered_sync_handlers(self) -> list[tuple[str, str]]:
        """All pairs registered in the sync registry."""
        return list(self._sync_handlers)

    def clear(self) -> None:
        """Remove all handlers (both registries)."""
        self._handlers.clear()
        self._sync_handlers.clear()

    # -- discovery ----------------------------------------------------------

    def register_instance(self, instance: object) -> list[tuple[str, str]]:
        """Register the public ``@handler``-decorated methods of ``instance``.

        Registration is all-or-nothing: on a duplicate nothing is registered.

        Returns:
            The registered ``(domain, command_type)`` pairs.

        Raises:
            HandlerAlreadyRegisteredError: If a pair is already registered or
                declared twice on the instance.
        """
        found = self._discover(instance, self._handlers.keys())
        for meta, method in found:
            self.register(meta.domain, meta.command_type, method)
        return [(meta.domain, meta.command_type) for meta, _ in found]

    def register_instance_as_sync(self, instance: object) -> list[tuple[str, str]]:
        """Register the decorated methods of ``instance`` in the sync registry.

        Async methods are wrapped so that each call runs them with
        ``asyncio.run()``; plain methods are registered as they are.
        Registration is all-or-nothing, as in :meth:`register_instance`.
        """
        found = self._discover(instance, self._sync_handlers.keys())
        for meta, method in found:
            fn: SyncHandlerFn = _make_sync_wrapper(method) if _is_async_callable(method) else method
            self.register_sync(meta.domain, meta.command_type, fn)
        return [(meta.domain, meta.command_type) for meta, _ in found]

    @staticmethod
    def _discover(
        instance: object, taken: Collection[tuple[str, str]]
    ) -> list[tuple[HandlerMeta, AnyHandlerFn]]:
        """Find decorated public methods without triggering properties."""
        found: list[tuple[HandlerMeta, AnyHandlerFn]] = []
        seen: set[tuple[str, str]] = set()
        for name in dir(instance):
            if name.startswith("_"):
                continue
            try:
                raw = inspect.getattr_static(instance, name)
            except AttributeError:
                continue
            if isinstance(raw, staticmethod | classmethod):
                raw = raw.__func__
            meta = get_handler_meta(raw)
            if meta is None:
                continue
            method = getattr(instance, name)
            if not callable(method):
                continue
            key = (meta.domain, meta.command_type)
            if key in taken or key in seen:
                raise HandlerAlreadyRegisteredError(meta.domain, meta.command_type)
            seen.add(key)
            found.append((meta, method))
            logger.info(
                "Discovered handler %s.%s for %s.%s",
                type(instance).__name__,
                name,
                meta.domain,
                meta.command_type,
            )
        return found
