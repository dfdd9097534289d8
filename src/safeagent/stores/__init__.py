"""Stores behind one interface: :class:`ReceiptStore`.

- :class:`SQLiteStore`: the embedded, durable default.
- :class:`MemoryStore`: in-process and **not durable**.
"""

from safeagent.stores._base import (
    ClaimRequest,
    ClaimResult,
    Completion,
    ReceiptStore,
    Resolution,
    WriteResult,
)
from safeagent.stores.memory import MemoryStore
from safeagent.stores.sqlite import SQLiteStore, default_path

__all__ = [
    "ClaimRequest",
    "ClaimResult",
    "Completion",
    "MemoryStore",
    "ReceiptStore",
    "Resolution",
    "SQLiteStore",
    "WriteResult",
    "default_path",
]
