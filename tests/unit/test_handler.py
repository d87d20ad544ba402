"""HandlerRegistry: registration, discovery, sync/async detection, dispatch."""

from __future__ import annotations

import asyncio
import functools
import threading
from typing import Any
from uuid import uuid4

import pytest

from commandbus.exceptions import (
    HandlerAlreadyRegisteredError,
    HandlerNotFoundError,
    ValidationError,
)
from commandbus.handler import (
    HandlerMeta,
    HandlerRegistry,
    ResolvedHandler,
    get_handler_meta,
    handler,
)
from commandbus.models import Command, HandlerContext


def _command(domain: str = "payments", command_type: str = "Debit") -> Command:
    return Command(domain=domain, command_type=command_type, command_id=uuid4(), data={"n": 2})


def _context(cmd: Command) -> HandlerContext:
    return HandlerContext(command=cmd, attempt=1, max_attempts=3, msg_id=1)


async def async_fn(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
    return {"kind": "async", "n": cmd.data["n"]}


def sync_fn(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
    return {"kind": "sync", "thread": threading.current_thread().name}


@handler("payments", "Refund")
async def decorated_refund(cmd: Command, ctx: HandlerContext) -> str:
    return "refunded"


@handler(domain="payments", command_type="Audit")
def decorated_audit(cmd: Command, ctx: HandlerContext) -> str:
    return "audited"


class AsyncCallable:
    async def __call__(self, cmd: Command, ctx: HandlerContext) -> str:
        return "async-callable"


class SyncCallable:
    def __call__(self, cmd: Command, ctx: HandlerContext) -> str:
        return "sync-callable"


class PaymentHandlers:
    def __init__(self) -> None:
        self.seen: list[str] = []
        self.property_reads = 0

    @handler(domain="payments", command_type="Debit")
    async def handle_debit(self, cmd: Command, ctx: HandlerContext) -> str:
        self.seen.append("debit")
        return "debited"

    @handler(domain="payments", command_type="Credit")
    def handle_credit(self, cmd: Command, ctx: HandlerContext) -> str:
        self.seen.append("credit")
        return "credited"

    @handler(domain="payments", command_type="Private")
    async def _private(self, cmd: Command, ctx: HandlerContext) -> None:
        raise AssertionError("private handlers must not be registered")

    @staticmethod
    @handler(domain="payments", command_type="Static")
    def handle_static(cmd: Command, ctx: HandlerContext) -> str:
        return "static"

    async def not_a_handler(self, cmd: Command, ctx: HandlerContext) -> None:
        raise AssertionError("undecorated")

    @property
    def expensive(self) -> int:
        self.property_reads += 1
        raise RuntimeError("properties must not be evaluated during discovery")


def test_handler_decorator_sets_meta_and_returns_function() -> None:
    def fn(cmd: Command, ctx: HandlerContext) -> None:
        return None

    decorated = handler("orders", "Create")(fn)
    assert decorated is fn
    assert get_handler_meta(fn) == HandlerMeta(domain="orders", command_type="Create")
    assert get_handler_meta(sync_fn) is None


def test_handler_decorator_applied_over_staticmethod() -> None:
    class Holder:
        @handler("d", "T")  # decorator on top of @staticmethod
        @staticmethod
        def run(cmd: Command, ctx: HandlerContext) -> str:
            return "ran"

    registry = HandlerRegistry()
    assert registry.register_instance(Holder()) == [("d", "T")]
    cmd = _command("d", "T")
    assert registry.get_or_raise("d", "T")(cmd, _context(cmd)) == "ran"


def test_handler_decorator_on_method_visible_through_instance() -> None:
    obj = PaymentHandlers()
    assert get_handler_meta(obj.handle_debit) == HandlerMeta("payments", "Debit")
    assert get_handler_meta(obj.not_a_handler) is None


@pytest.mark.parametrize(("domain", "ct"), [("", "X"), ("d", ""), (None, "X")])
def test_handler_decorator_validates(domain: object, ct: object) -> None:
    with pytest.raises(ValidationError):
        handler(domain, ct)  # type: ignore[arg-type]


def test_register_and_duplicate_detection() -> None:
    registry = HandlerRegistry()
    registry.register("payments", "Debit", async_fn)
    with pytest.raises(HandlerAlreadyRegisteredError) as info:
        registry.register("payments", "Debit", sync_fn)
    assert (info.value.domain, info.value.command_type) == ("payments", "Debit")
    assert str(info.value) == "Handler already registered for payments.Debit"
    assert registry.get("payments", "Debit") is async_fn
    # Same command type in another domain is a different key.
    registry.register("orders", "Debit", sync_fn)
    assert registry.registered_handlers() == [
        ("payments", "Debit"),
        ("orders", "Debit"),
    ]


@pytest.mark.parametrize(
    ("domain", "ct", "field"),
    [("", "Debit", "domain"), (1, "Debit", "domain"), ("d", "", "command_type")],
)
def test_register_validates_key(domain: object, ct: object, field: str) -> None:
    registry = HandlerRegistry()
    with pytest.raises(ValidationError) as info:
        registry.register(domain, ct, async_fn)  # type: ignore[arg-type]
    assert info.value.field == field
    assert registry.registered_handlers() == []


def test_register_rejects_non_callable() -> None:
    with pytest.raises(ValidationError, match="must be callable"):
        HandlerRegistry().register("d", "T", "not callable")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fn", "is_async"),
    [
        (async_fn, True),
        (sync_fn, False),
        (AsyncCallable(), True),
        (SyncCallable(), False),
        (functools.partial(async_fn), True),
        (functools.partial(functools.partial(AsyncCallable())), True),
        (functools.partial(sync_fn), False),
        (PaymentHandlers().handle_debit, True),
        (PaymentHandlers().handle_credit, False),
        (lambda cmd, ctx: None, False),
    ],
)
def test_resolve_detects_coroutine_functions(fn: Any, is_async: bool) -> None:
    registry = HandlerRegistry()
    registry.register("d", "T", fn)
    resolved = registry.resolve("d", "T")
    assert resolved == ResolvedHandler(fn=fn, is_async=is_async)
    assert registry.resolve("d", "Other") is None


def test_resolve_falls_back_to_sync_registry() -> None:
    registry = HandlerRegistry()
    registry.register_sync("d", "T", sync_fn)
    assert registry.resolve("d", "T") == ResolvedHandler(fn=sync_fn, is_async=False)
    registry.register("d", "T", async_fn)
    assert registry.resolve("d", "T") == ResolvedHandler(fn=async_fn, is_async=True)


@pytest.mark.asyncio
async def test_dispatch_async_and_sync_handlers() -> None:
    registry = HandlerRegistry()
    registry.register("payments", "Debit", async_fn)
    registry.register("payments", "Credit", sync_fn)
    registry.register("payments", "Call", AsyncCallable())
    cmd = _command()
    assert await registry.dispatch(cmd, _context(cmd)) == {"kind": "async", "n": 2}
    credit = _command(command_type="Credit")
    result = await registry.dispatch(credit, _context(credit))
    assert result == {"kind": "sync", "thread": threading.current_thread().name}
    call = _command(command_type="Call")
    assert await registry.dispatch(call, _context(call)) == "async-callable"


@pytest.mark.asyncio
async def test_dispatch_awaits_awaitable_returned_by_plain_function() -> None:
    def wrapper(cmd: Command, ctx: HandlerContext) -> Any:
        return async_fn(cmd, ctx)

    registry = HandlerRegistry()
    registry.register("payments", "Debit", wrapper)
    assert registry.resolve("payments", "Debit") == ResolvedHandler(wrapper, False)
    cmd = _command()
    assert await registry.dispatch(cmd, _context(cmd)) == {"kind": "async", "n": 2}


@pytest.mark.asyncio
async def test_dispatch_unknown_raises() -> None:
    registry = HandlerRegistry()
    registry.register_sync("payments", "Debit", sync_fn)  # sync registry only
    cmd = _command()
    with pytest.raises(HandlerNotFoundError) as info:
        await registry.dispatch(cmd, _context(cmd))
    assert str(info.value) == "No handler registered for payments.Debit"


def test_get_or_raise_and_has_handler() -> None:
    registry = HandlerRegistry()
    assert registry.get("d", "T") is None
    assert not registry.has_handler("d", "T")
    with pytest.raises(HandlerNotFoundError):
        registry.get_or_raise("d", "T")
    registry.register("d", "T", sync_fn)
    assert registry.get_or_raise("d", "T") is sync_fn
    assert registry.has_handler("d", "T")
    assert not registry.has_sync_handler("d", "T")


@pytest.mark.asyncio
async def test_registry_handler_decorator() -> None:
    registry = HandlerRegistry()

    @registry.handler("payments", "Debit")
    async def debit(cmd: Command, ctx: HandlerContext) -> int:
        return 42

    assert registry.get("payments", "Debit") is debit
    cmd = _command()
    assert await debit(cmd, _context(cmd)) == 42


def test_register_function() -> None:
    registry = HandlerRegistry()
    assert registry.register_function(decorated_refund) == ("payments", "Refund")
    assert registry.register_function(decorated_audit) == ("payments", "Audit")
    assert registry.resolve("payments", "Refund") == ResolvedHandler(decorated_refund, True)
    assert registry.resolve("payments", "Audit") == ResolvedHandler(decorated_audit, False)
    with pytest.raises(HandlerAlreadyRegisteredError):
        registry.register_function(decorated_refund)


def test_register_function_rejects_undecorated() -> None:
    with pytest.raises(ValueError, match="not decorated with @handler") as info:
        HandlerRegistry().register_function(sync_fn)
    assert isinstance(info.value, ValidationError)
    assert "sync_fn" in str(info.value)


@pytest.mark.asyncio
async def test_register_instance() -> None:
    registry = HandlerRegistry()
    obj = PaymentHandlers()
    registered = registry.register_instance(obj)
    assert sorted(registered) == [
        ("payments", "Credit"),
        ("payments", "Debit"),
        ("payments", "Static"),
    ]
    assert obj.property_reads == 0
    assert not registry.has_handler("payments", "Private")
    debit = registry.resolve("payments", "Debit")
    credit = registry.resolve("payments", "Credit")
    assert debit is not None
    assert debit.is_async
    assert credit is not None
    assert not credit.is_async
    cmd = _command()
    assert await registry.dispatch(cmd, _context(cmd)) == "debited"
    cmd = _command(command_type="Credit")
    assert await registry.dispatch(cmd, _context(cmd)) == "credited"
    cmd = _command(command_type="Static")
    assert await registry.dispatch(cmd, _context(cmd)) == "static"
    assert obj.seen == ["debit", "credit"]


def test_register_instance_duplicate_registers_nothing() -> None:
    registry = HandlerRegistry()
    registry.register("payments", "Debit", async_fn)
    with pytest.raises(HandlerAlreadyRegisteredError):
        registry.register_instance(PaymentHandlers())
    assert registry.registered_handlers() == [("payments", "Debit")]


def test_register_instance_same_key_twice_on_one_instance() -> None:
    class Twice:
        @handler("d", "T")
        def first(self, cmd: Command, ctx: HandlerContext) -> None:
            return None

        @handler("d", "T")
        def second(self, cmd: Command, ctx: HandlerContext) -> None:
            return None

    registry = HandlerRegistry()
    with pytest.raises(HandlerAlreadyRegisteredError):
        registry.register_instance(Twice())
    assert registry.registered_handlers() == []


def test_sync_registry() -> None:
    registry = HandlerRegistry()

    @registry.sync_handler("payments", "Debit")
    def debit(cmd: Command, ctx: HandlerContext) -> str:
        return f"sync {cmd.command_type}"

    assert registry.get_sync("payments", "Debit") is debit
    assert registry.get_sync_or_raise("payments", "Debit") is debit
    assert registry.has_sync_handler("payments", "Debit")
    assert not registry.has_handler("payments", "Debit")
    assert registry.registered_sync_handlers() == [("payments", "Debit")]
    cmd = _command()
    assert registry.dispatch_sync(cmd, _context(cmd)) == "sync Debit"
    with pytest.raises(HandlerAlreadyRegisteredError):
        registry.register_sync("payments", "Debit", sync_fn)
    with pytest.raises(HandlerNotFoundError):
        registry.get_sync_or_raise("payments", "Credit")
    other = _command(command_type="Credit")
    with pytest.raises(HandlerNotFoundError):
        registry.dispatch_sync(other, _context(other))
    with pytest.raises(ValidationError):
        registry.register_sync("", "X", sync_fn)


def test_register_instance_as_sync() -> None:
    registry = HandlerRegistry()
    obj = PaymentHandlers()
    registered = registry.register_instance_as_sync(obj)
    assert sorted(registered) == [
        ("payments", "Credit"),
        ("payments", "Debit"),
        ("payments", "Static"),
    ]
    assert registry.registered_handlers() == []
    # The async method is wrapped with asyncio.run; the plain one is as-is.
    assert registry.get_sync("payments", "Credit") == obj.handle_credit
    cmd = _command()
    assert registry.dispatch_sync(cmd, _context(cmd)) == "debited"
    cmd = _command(command_type="Credit")
    assert registry.dispatch_sync(cmd, _context(cmd)) == "credited"
    assert obj.seen == ["debit", "credit"]


@pytest.mark.asyncio
async def test_sync_wrapper_runs_in_worker_thread() -> None:
    registry = HandlerRegistry()
    registry.register_instance_as_sync(PaymentHandlers())
    fn = registry.get_sync_or_raise("payments", "Debit")
    cmd = _command()
    # From inside a running loop the wrapper must run in another thread.
    assert await asyncio.to_thread(fn, cmd, _context(cmd)) == "debited"


def test_clear() -> None:
    registry = HandlerRegistry()
    registry.register("d", "T", async_fn)
    registry.register_sync("d", "T", sync_fn)
    registry.clear()
    assert registry.registered_handlers() == []
    assert registry.registered_sync_handlers() == []
    assert registry.resolve("d", "T") is None
