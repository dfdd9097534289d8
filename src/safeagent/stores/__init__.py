"""Stores behind one interface: :class:`ReceiptStore` (and, for a store that claims before
it reads, :class:`ClaimFirstStore`; for one that renews many leases in one transaction,
:class:`BatchRenewStore`).

- :class:`SQLiteStore`: the embedded, durable default.
- :class:`MemoryStore`: in-process and **not durable**.
"""

from safeagent.stores._base import (
    BatchRenewStore,
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
    "BatchRenewStore",
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
