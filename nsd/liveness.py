"""When a peer heartbeats: one rule for the broker and the worker (pure functions, no sockets).

Each side declares the other dead after `heartbeat_s × liveness` of silence. A peer with work in flight
heartbeats every `heartbeat_s`: the worker's HEARTBEAT carries the leases it runs, which the broker
reconciles, and a lost lease is found one interval sooner. An idle pair has nothing to reconcile, only
liveness to show, so each side speaks half as often. With the defaults (1 s × 5) an idle worker and the
broker send a heartbeat every 2 s instead of every second: half the messages of an idle cluster
(`bench/scale.py --scenario idle`), and a heartbeat may still be 3 s late before anyone is declared dead.
"""

from __future__ import annotations

import math
from typing import Any

# Outside these a value is a mistake or an attack, not a choice: a broker refuses to start with them, and a
# worker ignores a READY_ACK that carries them.
HEARTBEAT_BOUNDS_S = (0.05, 60.0)
LIVENESS_BOUNDS = (1, 100)

def timing_problem(heartbeat_s: Any, liveness: Any) -> str | None:
    """What is wrong with a heartbeat interval and liveness (the broker's settings, READY_ACK's values), or None."""
    low, high = HEARTBEAT_BOUNDS_S
    if isinstance(heartbeat_s, bool) or not isinstance(heartbeat_s, (int, float)) or \
            not math.isfinite(heartbeat_s) or not low <= heartbeat_s <= high:
        return f"heartbeat_s {str(heartbeat_s)[:20]!r} is not between {low} and {high}"
    if isinstance(liveness, bool) or not isinstance(liveness, int) or not LIVENESS_BOUNDS[0] <= liveness <= LIVENESS_BOUNDS[1]:
        return f"liveness {str(liveness)[:20]!r} is not between {LIVENESS_BOUNDS[0]} and {LIVENESS_BOUNDS[1]}"
    return None


def idle_interval(heartbeat_s: float, liveness: int) -> float:
    """The heartbeat period between idle peers: every other interval, where that still leaves at least
    half the deadline window for a heartbeat to arrive late (liveness 4 and up); else every interval."""
    return heartbeat_s * (2 if liveness >= 4 else 1)


def heartbeat_due(now: float, last_sent: float, heartbeat_s: float, liveness: int, busy: bool) -> bool:
    """Whether to heartbeat now, having last sent anything to the peer at `last_sent`."""
    period = heartbeat_s if busy else idle_interval(heartbeat_s, liveness)
    return now - last_sent >= period
