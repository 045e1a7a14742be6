"""The broker's bounds on what peers can make it hold: every one a documented option (README "Security")."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class BrokerLimits:
    peer_queue: int = 16  # messages queued to one peer that does not read; past it, replies to it are dropped
    max_blob_bytes: int = 64 << 30  # one uploaded blob (declared size)
    max_store_bytes: int = 512 << 30  # all blobs; unreferenced ones go first (oldest first) when over it
    uploads_per_peer: int = 16  # open uploads per connection (a new one drops that peer's oldest)
    max_open_uploads: int = 1024  # open uploads in all (past it, new uploads are refused)
    queued_per_client: int = 1000  # unfinished tasks one client key may have (all plaintext clients share one)
    batch: int = 256  # messages per socket handled, and committed, in one loop turn

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
