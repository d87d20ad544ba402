"""Handlers the CLI tests run in `rcmd worker` processes (imported by module name from this
directory): domain `clitest`; `data.sleep` seconds of work, `data.fail` a permanent failure."""

from __future__ import annotations

import asyncio
from typing import Any

from commandbus import Command, HandlerContext, HandlerRegistry, PermanentCommandError, handler

registry = HandlerRegistry()


@registry.handler("clitest", "Work")
async def work(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
    await asyncio.sleep(float(cmd.data.get("sleep", 0)))
    if cmd.data.get("fail"):
        raise PermanentCommandError("BROKEN", "asked to fail")
    return {"pid_ok": True}


@handler(domain="clitest", command_type="Plain")
def plain(cmd: Command, ctx: HandlerContext) -> dict[str, Any]:
    """A module-level @handler function (for `rcmd worker cli_handlers`)."""
    return {"plain": True}


@handler(domain="other", command_type="Plain")
def other(cmd: Command, ctx: HandlerContext) -> None:
    """A second domain: `rcmd worker cli_handlers` then needs --domain."""


def make_registry() -> HandlerRegistry:
    """A factory (for `rcmd worker cli_handlers:make_registry`)."""
    return registry
