"""What the broker does with each worker message, one loop turn's part (nsd/broker/daemon.py): blob
chunks answered at once, registrations and results handed to the core inside the turn's transaction.

A part of `Broker`, which supplies the core, the blob store and `_to_worker`."""

from __future__ import annotations

import logging
import time

from nsd.broker.blobs import BlobError
from nsd.broker.tenancy import STORED_BY
from nsd.protocol import Cmd, Message

log = logging.getLogger("nsd.broker")


class WorkerMessages:
    """Broker's worker side: `_worker_message` applies one checked message."""

    def _worker_message(self, identity: bytes, key: str | None, msg: Message) -> None:
        core, now, b = self.core, time.time(), msg.body
        worker = core.worker_for(identity, key)
        if worker is not None:
            core.heard(worker)  # any traffic counts as a heartbeat
        if msg.cmd is Cmd.FETCH:  # only the blobs of the jobs it holds (issue 15); files, so sent at once
            refused = "register first" if worker is None else None if core.fetchable(worker, b["sha256"]) else \
                f"no blob {b['sha256'][:12]}… among the jobs you hold"
            self._to_worker(identity, Cmd.CHUNK, self._chunk(b) if refused is None else
                            {"sha256": b["sha256"], "offset": b["offset"], "error": refused})
        elif msg.cmd is Cmd.STORE:
            if worker is None or not core.may_store(worker):
                why = "register first" if worker is None else "a worker stores blobs only for a save job it holds"
                ack = {"sha256": b["sha256"], "offset": b["offset"], "error": why}
            else:
                try:  # every byte, even of bytes stored already: the artifact it names must be what it sent
                    offset, complete = self.blobs.write(identity, b["sha256"], b["offset"], b["size"], b["data"],
                                                        known=False)
                    if complete:
                        core.add_owner(b["sha256"], STORED_BY + worker.id)
                    ack = {"sha256": b["sha256"], "offset": offset, "complete": complete}
                except BlobError as exc:
                    ack = {"sha256": b["sha256"], "offset": b["offset"], "error": str(exc)}
            # held (a pair): a completed blob is acknowledged once the passive broker has it too
            self._to_worker(identity, Cmd.STORE_ACK, ack, held=True, blob=b["sha256"] if ack.get("complete") else None)
        elif msg.cmd is Cmd.READY:
            with core.tx():
                core.register(identity, b, key, now)
        elif msg.cmd is Cmd.RESULT:
            if worker is None:  # not registered (or not with this key): it holds no lease
                core.ignored_results += 1
                self.metrics.ignored_results.inc()
                core.send(identity, Cmd.DISCONNECT, {"reason": "unknown worker: register again"})
                return
            core._result_in_savepoint(worker, b)
            core.send(worker, Cmd.RESULT_ACK, {"trial_id": b["trial_id"], "attempt": b["attempt"]})
        elif worker is None:
            # A heartbeat or goodbye from a worker we do not know (we restarted, or declared it dead).
            if msg.cmd is not Cmd.BYE:
                core.send(identity, Cmd.DISCONNECT, {"reason": "unknown worker: register again"})
        elif msg.cmd is Cmd.BYE:
            log.info("worker %s said goodbye", worker.id)
            core.drop_worker(worker, "worker left", handback=b.get("handback") is True)


    def _chunk(self, body: dict) -> dict:
        try:
            data, size = self.blobs.read(body["sha256"], body["offset"], body["length"])
            return {"sha256": body["sha256"], "offset": body["offset"], "size": size, "data": data}
        except BlobError as exc:
            return {"sha256": body["sha256"], "offset": body["offset"], "error": str(exc)}
