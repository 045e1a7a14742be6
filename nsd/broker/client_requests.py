"""The broker's answers to client requests, one loop turn's part (nsd/broker/daemon.py): each request in
a savepoint of the turn's transaction, its answer (or why it was refused) sent after the commit.

A part of `Broker`, which supplies the core, the blob store, the SQLite store and the endpoints."""

from __future__ import annotations

import logging
import time
from typing import Any

from nsd import __version__
from nsd.blobs import parse_ref
from nsd.broker.store import StorageError
from nsd.protocol import MAX_CHUNK_BYTES, PROTOCOL_VERSION, Cmd, Message
from nsd.spec import SpecError, spec_blob_refs, validate

log = logging.getLogger("nsd.broker")


class ClientRequests:
    """Broker's client side: `_client_message` answers one checked request."""

    def _client_message(self, identity: bytes, key: str | None, msg: Message) -> tuple[bytes, Cmd, dict]:
        req = msg.body["req"]
        try:
            with self.core.tx():  # a savepoint: a request that fails leaves nothing behind
                answer = self._client_request(identity, key, msg)
        except StorageError:
            raise
        except (SpecError, LookupError, ValueError) as exc:
            return identity, Cmd.ERROR, {"req": req, "error": str(exc)}
        except Exception:
            log.exception("request %s failed", msg.cmd.name)
            return identity, Cmd.ERROR, {"req": req, "error": "internal broker error (see its log)"}
        return identity, Cmd.REPLY, {"req": req, **answer}

    def _client_request(self, identity: bytes, key: str | None, msg: Message) -> dict[str, Any]:
        body, core = msg.body, self.core
        if msg.cmd is Cmd.HELLO:
            return {"protocol": PROTOCOL_VERSION, "version": __version__, "events": self.endpoints["events"]}
        if msg.cmd is Cmd.SUBMIT:
            spec = validate(body["spec"])
            missing = [ref for ref in spec_blob_refs(spec) if not self.blobs.has(parse_ref(ref)[0])]
            if missing:
                raise ValueError(f"blob(s) not uploaded: {', '.join(missing)}; upload them first (BLOB_PUT)")
            return {"task_id": core.submit(spec, owner=key or "", submit_id=body.get("submit_id"))}
        if msg.cmd is Cmd.BLOB_HAVE:
            return {"missing": [h for h in body["sha256"] if not self.blobs.has(h)]}
        if msg.cmd is Cmd.BLOB_PUT:
            offset, complete = self.blobs.write(identity, body["sha256"], body["offset"], body["size"], body["data"])
            return {"offset": offset, "complete": complete}
        if msg.cmd is Cmd.BLOB_GET:
            data, size = self.blobs.read(body["sha256"], body["offset"], body["length"])
            return {"data": data, "size": size}
        if msg.cmd is Cmd.LIST:
            return {"tasks": [t.summary() for t in core.tasks.values()]}
        if msg.cmd is Cmd.CLUSTER:
            now = time.time()
            return {"workers": [w.public(now) for w in core.workers.values()],
                    **({"pair": self.pair.status()} if self.pair is not None else {})}
        task = core.find(body["task_id"])
        if msg.cmd in (Cmd.STATUS, Cmd.RESULT_GET):
            return {"task": task.public()}
        if msg.cmd is Cmd.LOGS:
            return {"logs": self._logs(task.id, body.get("job"))}
        if msg.cmd is Cmd.CANCEL_TASK:
            core.cancel(task)
            return {"task": task.summary()}
        raise ValueError(f"unhandled request {msg.cmd.name}")  # pragma: no cover - CLIENT_TO_BROKER is exhaustive

    def _logs(self, task_id: str, job: str | None) -> list[dict]:
        """A task's job logs; the oldest are cut so that the reply fits one message (ask per job for those)."""
        logs, budget = self.store.logs(task_id, job), MAX_CHUNK_BYTES * 3
        for entry in reversed(logs):
            budget -= len(entry["text"].encode()) + 256
            if budget < 0:
                entry["text"], entry["cut"] = "[cut: this reply holds at most 12 MiB of logs; ask for this job alone]", True
        return logs
