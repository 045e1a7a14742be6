"""Which broker to talk to: one endpoint, or the two of a broker pair (`tcp://a:5550,tcp://b:5550`).

Clients and workers keep the endpoint they talk to until it goes silent (then the other one, saying so:
`failover`, the witness Binary Star's takeover needs) or answers "not active" (then the other one, without
that claim). They carry the highest epoch a broker told them, so a broker that stopped serving while cut
off learns it from the first request that reaches it (README "A broker pair").
"""

from __future__ import annotations

import contextlib
from pathlib import Path


def split_endpoints(value: str) -> list[str]:
    endpoints = [part.strip() for part in value.split(",") if part.strip()]
    if not 1 <= len(endpoints) <= 2:
        raise ValueError(f"{value!r}: give one broker endpoint, or the two of a pair separated by a comma")
    return endpoints


class Endpoints:
    def __init__(self, value: str, epoch_file: Path | None = None):
        self.all = split_endpoints(value)
        self.at = 0
        self.epoch = 0  # the highest epoch a broker of the pair has told us
        self.epoch_file = epoch_file if self.pair else None  # a worker keeps it across restarts
        if self.epoch_file is not None:
            with contextlib.suppress(OSError, ValueError):
                self.epoch = int(self.epoch_file.read_text())
        self.failover = False  # the endpoint we left did not answer: we are a witness that it is gone
        self.switches = 0  # how often we moved (an upload cut by a move starts over)

    @property
    def current(self) -> str:
        return self.all[self.at]

    @property
    def pair(self) -> bool:
        return len(self.all) > 1

    def extra(self) -> dict:
        """Fields a request to a broker of a pair carries (nothing for a single broker)."""
        if not self.pair:
            return {}
        return {**({"epoch": self.epoch} if self.epoch else {}), **({"failover": True} if self.failover else {})}

    def heard(self, body: dict) -> None:
        epoch = body.get("epoch")
        if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch > self.epoch:
            self.epoch = epoch
            if self.epoch_file is not None:
                with contextlib.suppress(OSError):
                    self.epoch_file.write_text(str(epoch))

    def silent(self) -> None:
        """No answer: the other broker, as a witness that this one is gone."""
        self._move()
        self.failover = True

    def refused(self) -> None:
        """"Not active": the other broker, claiming nothing."""
        self._move()
        self.failover = False

    def answered(self) -> None:
        self.failover = False

    def _move(self) -> None:
        self.at = (self.at + 1) % len(self.all)
        self.switches += 1

    def __str__(self) -> str:
        return ",".join(self.all)
