"""The seed README's code (setup, handlers class, errors, registry, worker, send), as written
there, against a real server. Only what the snippets leave out (imports of Any/UUID, the
InventoryHandlers class and the payment gateway they mention) is filled in here."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID, uuid4

from itest_helpers import events, status_of, wait_until
from psycopg_pool import AsyncConnectionPool

from commandbus import (
    Command,
    CommandBus,
    HandlerContext,
    HandlerRegistry,
    RetryPolicy,
    Worker,
    get_schema_sql,
    handler,
    setup_database,
)
from commandbus.exceptions import PermanentCommandError, TransientCommandError


class PaymentDeclined(Exception):
    pass


class GatewayTimeout(Exception):
    pass


class _Gateway:
    def __init__(self) -> None:
        self.timed_out: set[str] = set()

    async def process(self, data: dict[str, Any]) -> Any:
        if data.get("decline"):
            raise PaymentDeclined("insufficient funds")
        token = data.get("timeout")
        if token and token not in self.timed_out:  # the first call times out
            self.timed_out.add(token)
            raise GatewayTimeout("gateway did not answer")

        class Result:
            id = "tx-1"

        return Result()


payment_gateway = _Gateway()


class OrderHandlers:
    """Handlers for order domain commands."""

    def __init__(self, pool: AsyncConnectionPool) -> None:  # type: ignore[type-arg]
        """Inject dependencies via constructor."""
        self._pool = pool

    @handler(domain="orders", command_type="CreateOrder")
    async def handle_create_order(self, cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        order_data = cmd.data
        assert order_data is not None
        return {"status": "created", "order_id": str(cmd.command_id)}

    @handler(domain="orders", command_type="CancelOrder")
    async def handle_cancel_order(self, cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        """Handle CancelOrder command."""
        return {"status": "cancelled"}

    @handler(domain="orders", command_type="ProcessPayment")
    async def handle_payment(self, cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        try:
            result = await payment_gateway.process(cmd.data)
            return {"status": "paid", "transaction_id": result.id}
        except PaymentDeclined as e:
            raise PermanentCommandError(code="PAYMENT_DECLINED", message=str(e)) from e
        except GatewayTimeout as e:
            raise TransientCommandError(code="GATEWAY_TIMEOUT", message=str(e)) from e


class InventoryHandlers:
    def __init__(self, pool: AsyncConnectionPool) -> None:  # type: ignore[type-arg]
        self._pool = pool

    @handler(domain="inventory", command_type="Reserve")
    async def reserve(self, cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
        return {"reserved": True}


def create_registry(pool: AsyncConnectionPool) -> HandlerRegistry:  # type: ignore[type-arg]
    """Create registry and register all handlers."""
    order_handlers = OrderHandlers(pool)
    inventory_handlers = InventoryHandlers(pool)
    registry = HandlerRegistry()
    registry.register_instance(order_handlers)
    registry.register_instance(inventory_handlers)
    return registry


def create_worker(pool: AsyncConnectionPool) -> Worker:  # type: ignore[type-arg]
    """Create worker with retry policy."""
    registry = create_registry(pool)
    retry_policy = RetryPolicy(
        max_attempts=3,
        backoff_schedule=[0, 0, 0],  # the README's [10, 60, 300], shortened for a test
    )
    return Worker(
        pool=pool,
        domain="orders",
        registry=registry,
        retry_policy=retry_policy,
        visibility_timeout=30,
    )


async def create_order(bus: CommandBus, order_data: dict[str, Any]) -> UUID:
    command_id = uuid4()
    await bus.send(
        domain="orders",
        command_type="CreateOrder",
        command_id=command_id,
        data=order_data,
        max_attempts=3,
    )
    return command_id


async def test_seed_readme_flow(database_url: str) -> None:
    pool = AsyncConnectionPool(conninfo=database_url, min_size=2, max_size=10, open=False)
    await pool.open()
    try:
        # 1. Database setup: the fixture's database already has the schema.
        created = await setup_database(pool)
        assert created is False
        assert get_schema_sql().lstrip().startswith("--")

        bus = CommandBus(pool)
        order_id = await create_order(bus, {"sku": "A1"})
        declined = uuid4()
        await bus.send("orders", "ProcessPayment", declined, {"decline": True})
        flaky = uuid4()
        await bus.send("orders", "ProcessPayment", flaky, {"timeout": str(flaky)})

        worker = create_worker(pool)
        task = asyncio.create_task(worker.run(concurrency=4, poll_interval=0.05))
        try:
            for cid, status in (
                (order_id, "COMPLETED"),
                (declined, "IN_TROUBLESHOOTING_QUEUE"),
                (flaky, "COMPLETED"),
            ):

                async def check(cid: UUID = cid, status: str = status) -> bool:
                    return await status_of(pool, "orders", cid) == status

                await wait_until(check)
        finally:
            await worker.stop(timeout=5)
            await task
        meta = await bus.get_command("orders", order_id)
        assert meta is not None and meta.result == {"status": "created", "order_id": str(order_id)}
        assert "RETRY_SCHEDULED" in await events(pool, flaky)
        tsq = await bus.get_command("orders", declined)
        assert tsq is not None and tsq.last_error_code == "PAYMENT_DECLINED"
    finally:
        await pool.close()


async def test_setup_database_on_a_fresh_database(pg_admin_dsn: str) -> None:
    """The README's step 1 on an empty database: True, then False; the schema works."""
    from commandbus.embedded import create_database, drop_database

    dsn = create_database(pg_admin_dsn, "rcmd_seed_setup")
    try:
        pool = AsyncConnectionPool(conninfo=dsn, open=False)
        await pool.open()
        try:
            assert await setup_database(pool) is True
            assert await setup_database(pool) is False
            bus = CommandBus(pool)
            await bus.send("orders", "CreateOrder", uuid4(), {})
        finally:
            await pool.close()
    finally:
        drop_database(pg_admin_dsn, "rcmd_seed_setup")
