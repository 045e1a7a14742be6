"""The broker's bounds on what peers can make it hold: every one a documented option (README "Security")."""

from __future__ import annotations

from dataclasses import dataclass, fields

LIMIT_HELP = {
    "peer_queue": "Messages queued to one peer that does not read; past it, what is sent to it is dropped.",
    "max_blob_bytes": "Largest blob an upload may declare, bytes.",
    "max_store_bytes": "All blobs together, bytes; blobs no task names are removed, oldest first, to stay under.",
    "uploads_per_peer": "Uploads in progress per connection; a new one drops that connection's oldest.",
    "max_open_uploads": "Uploads in progress in all; past it new uploads are refused (never another's dropped).",
    "queued_per_client": "Unfinished tasks per client key (every plaintext client shares one).",
    "batch": "Messages per socket handled, and committed in one transaction, per loop turn.",
}


@dataclass
class BrokerLimits:
    peer_queue: int = 16  # x one chunk (1 MiB) is what a peer that never reads can make the broker hold
    max_blob_bytes: int = 64 << 30
    max_store_bytes: int = 512 << 30
    uploads_per_peer: int = 16
    max_open_uploads: int = 1024
    queued_per_client: int = 1000
    batch: int = 256

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
