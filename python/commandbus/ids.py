"""Time-ordered command ids: UUID version 7 (RFC 9562).

    from commandbus import uuid7
    await bus.send("orders", "CreateOrder", uuid7(), {...})

Any UUID is a valid `command_id`. A random one (`uuid4()`) lands anywhere in the command table's
unique index on `(domain, command_id)`, so with a large history each send, claim and finish
reads and dirties an index page no other recent command touched; a version 7 id starts with
its millisecond timestamp, so the ids of recent commands sit together at the end of the index
(see the README's "Command ids"). Python 3.14's `uuid.uuid7` where there is one; otherwise the
same layout here: 48 bits of Unix milliseconds, the version, 74 random bits, the variant.
"""

from __future__ import annotations

import os
import sys
import time
import uuid

_TS_SHIFT = 80
_VERSION_MASK = 0xF << 76
_VARIANT_MASK = 0x3 << 62


def uuid7() -> uuid.UUID:
    """A new UUID version 7: time-ordered to the millisecond, random within it."""
    if sys.version_info >= (3, 14):
        return uuid.uuid7()
    ms = time.time_ns() // 1_000_000
    value = (ms & 0xFFFF_FFFF_FFFF) << _TS_SHIFT | int.from_bytes(os.urandom(10), "big")
    value = (value & ~_VERSION_MASK) | (0x7 << 76)
    value = (value & ~_VARIANT_MASK) | (0x2 << 62)
    return uuid.UUID(int=value)
