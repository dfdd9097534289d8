"""Stores behind one interface: :class:`ReceiptStore` (and, for a store that claims before
it reads, :class:`ClaimFirstStore`).

- :class:`SQLiteStore`: the embedded, durable default.
- :class:`MemoryStore`: in-process and **not durable**.
"""

from safeagent.stores._base import (
    ClaimFirstStore,
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
    "ClaimFirstStore",
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
