"""Every name of reliable-cmd 0.2.2's `commandbus.__all__`, `commandbus.sync.__all__` and
`commandbus.process.__all__` is importable from the same module (the drop-in promise). The lists
are the predecessor's, read from its packaged `__init__.py` files."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PREDECESSOR_ALL = {
    "commandbus": [
        "DEFAULT_RETRY_POLICY", "AuditEvent", "AuditEventType", "BatchCommand",
        "BatchCompletionCallback", "BatchMetadata", "BatchNotFoundError", "BatchSendResult",
        "BatchStatus", "BusinessRuleException", "Command", "CommandBus", "CommandBusError",
        "CommandMetadata", "CommandNotFoundError", "CommandStatus", "CreateBatchResult",
        "DuplicateCommandError", "HandlerAlreadyRegisteredError", "HandlerContext",
        "HandlerMeta", "HandlerNotFoundError", "HandlerRegistry", "InvalidOperationError",
        "PermanentCommandError", "PgmqClient", "PgmqMessage", "PostgresAuditLogger",
        "PostgresBatchRepository", "PostgresCommandRepository", "ReceivedCommand",
        "ReplyOutcome", "RetryPolicy", "SendRequest", "SendResult", "SyncCommandBus",
        "SyncProcessReplyRouter", "SyncWorker", "TransientCommandError", "TroubleshootingItem",
        "TroubleshootingQueue", "Worker", "__version__", "check_and_invoke_batch_callback",
        "check_schema_exists", "clear_all_callbacks", "get_batch_callback", "get_schema_sql",
        "handler", "register_batch_callback", "remove_batch_callback", "setup_database",
    ],
    "commandbus.sync": [
        "HealthState", "HealthStatus", "SyncCommandBus", "SyncProcessReplyRouter", "SyncWorker",
        "TimeoutConfig", "WorkerWatchdog", "create_pool_with_timeout", "is_pool_timeout",
        "is_query_cancelled", "is_timeout_error", "validate_timeouts",
    ],
    "commandbus.process": [
        "BaseProcessManager", "PostgresProcessRepository", "ProcessAuditEntry",
        "ProcessCommand", "ProcessMetadata", "ProcessReplyRouter", "ProcessRepository",
        "ProcessResponse", "ProcessState", "ProcessStatus",
    ],
}  # fmt: skip


@pytest.mark.parametrize("module", sorted(PREDECESSOR_ALL))
def test_every_predecessor_name_is_exported(module: str) -> None:
    mod = importlib.import_module(module)
    exported = set(mod.__all__)
    missing = [n for n in PREDECESSOR_ALL[module] if n not in exported or not hasattr(mod, n)]
    assert missing == []


def test_top_level_sync_names_are_the_sync_modules_and_load_lazily() -> None:
    code = (
        "import sys, commandbus\n"
        "assert 'commandbus.sync' not in sys.modules\n"
        "from commandbus import SyncCommandBus, SyncProcessReplyRouter, SyncWorker\n"
        "import commandbus.sync as s\n"
        "assert (SyncCommandBus, SyncProcessReplyRouter, SyncWorker) == "
        "(s.SyncCommandBus, s.SyncProcessReplyRouter, s.SyncWorker)\n"
        "try:\n"
        "    commandbus.NoSuchName\n"
        "except AttributeError:\n"
        "    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
