"""A broker pair's states and decisions: the zguide's Binary Star, with synchronous replication and epochs.
Pure functions over plain data; `nsd.broker.peer` is the I/O around them (docs/design.md "A broker pair").

One broker serves (active or solo), the other holds a copy (passive). The rules that keep it to one:
- A non-serving broker starts to serve only when its peer has been silent for the window AND a worker
  (or, when the active had no workers, a client) comes to it saying it lost the other broker — or when the
  two hear each other, neither serves, and its history is the newer one. It never serves an older history
  than a witness has seen (the witness carries the highest epoch it knows).
- A serving broker whose peer is silent acknowledges nothing (its effects wait) until the cluster shows it
  is not the one cut off: workers that were with it before the silence (or come back carrying its epoch)
  still talk to it. Then it serves alone (solo), as a single broker would, for as long as they do.
- Two serving brokers that hear each other (a healed split) leave the older epoch serving no more.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(str, enum.Enum):
    PRIMARY = "primary"  # leads at a cold start when both histories are equal
    BACKUP = "backup"  # the other one

    @property
    def other(self) -> "Role":
        return Role.BACKUP if self is Role.PRIMARY else Role.PRIMARY


class PairState(str, enum.Enum):
    PENDING = "pending"  # started, has not heard its peer: serves nothing, waits for it or for a witness
    PASSIVE = "passive"  # a copy of the serving broker's state: applies its stream, serves nothing
    ACTIVE = "active"  # serves; each commit's effects wait until the passive has written it
    SOLO = "solo"  # serves alone (its peer is gone, or still catching up): commits are only local
    CUT_OFF = "cut-off"  # was active; its peer and its workers went silent: it acknowledges nothing

    @property
    def serving(self) -> bool:
        """Holds the state and takes requests (a cut-off broker holds every answer back)."""
        return self in (PairState.ACTIVE, PairState.SOLO, PairState.CUT_OFF)

    @property
    def holding(self) -> bool:
        """Effects wait for the passive broker (active), or for a peer or witness to return (cut off)."""
        return self in (PairState.ACTIVE, PairState.CUT_OFF)


@dataclass(frozen=True)
class Side:
    """One broker as the decisions see it (ourselves, or the peer from its last PEER_STATE)."""
    role: Role
    state: PairState
    epoch: int  # the active term its history reached: +1 each time a broker starts to serve
    lsn: int  # its last committed (serving) or applied (passive) transaction
    whole: bool  # its database holds a whole history: a serving broker's, or a copy that had caught up
    workers: int = 0  # workers registered with it
    hears: bool = True  # (the peer's) it heard the other broker within half a window when it sent this


def history(side: Side) -> tuple:
    """Which history is newer: a whole one over a partial copy, then the later epoch, the longer log,
    and the primary on a tie. Both brokers compute the same order."""
    return side.whole, side.epoch, side.lsn, side.role is Role.PRIMARY


def on_peer_state(me: Side, peer: Side, blobs_due: bool) -> PairState:
    """Our next state when the peer's PEER_STATE arrives. `blobs_due`: blobs we told the peer about that
    it has not confirmed yet (it is not a whole copy until it has them). A state the peer sent while it did
    not hear us says nothing about what it does next (it may be taking over as we read it): it moves us
    only to give way, never to serve."""
    if me.state.serving:
        if peer.state.serving or peer.whole and peer.epoch > me.epoch:  # a split healed: the older term gives way
            return PairState.PENDING if (peer.epoch, peer.role is Role.PRIMARY) > (
                me.epoch, me.role is Role.PRIMARY) else me.state
        if not peer.hears:
            return me.state
        if peer.state is PairState.PASSIVE and peer.whole and (me.state.holding or not blobs_due):
            return PairState.ACTIVE  # (while active, a blob the passive has not confirmed is only hidden)
        return PairState.SOLO
    if peer.state.serving:  # its copy, unless ours is of a newer term (then it gives way, above)
        return me.state if me.whole and me.epoch > peer.epoch else PairState.PASSIVE
    if me.whole and peer.hears and history(me) > history(peer):  # neither serves: the newer history does
        return PairState.SOLO
    return me.state


def on_silence(me: Side, silent_s: float, window_s: float, still_heard: bool) -> PairState:
    """A serving broker whose peer went quiet. An active one's effects wait from the first moment (nobody
    confirms them). After half the window — before the passive broker, which counts the same silence from
    about the same moment, may take over at the whole window — it is cut off unless the cluster still hears
    it (`cluster_still_hears`); an active one goes on alone (solo) once the window has passed, and a solo
    one for as long as its witnesses keep talking."""
    if not me.state.serving or silent_s < window_s / 2:
        return me.state
    if still_heard and (me.state is PairState.SOLO or silent_s >= window_s):
        return PairState.SOLO
    return PairState.CUT_OFF


def may_take_over(me: Side, silent_s: float, window_s: float, attests: bool, worker: bool, peer_workers: int,
                  carried_epoch: int) -> bool:
    """Binary Star's failover rule, on a request that reached a broker that does not serve: the peer has
    been silent for the window AND a witness came that lost the other broker — a worker when the serving
    broker had workers (a client is a weaker witness: slow, or lying) — and the witness has seen no newer
    term than our copy holds."""
    return (not me.state.serving and me.whole and attests and silent_s >= window_s
            and (worker or peer_workers == 0) and carried_epoch <= me.epoch)


def fenced(me: Side, carried_epoch: int) -> bool:
    """A serving broker that meets a newer term (a worker or client that has been with the other broker
    since it took over) serves no more, before it handles that message."""
    return me.state.serving and carried_epoch > me.epoch


def cluster_still_hears(now: float, peer_heard: float, heartbeat_s: float, window_s: float, epoch: int,
                        workers: list[tuple[float, float, int]], workers_when_heard: int, last_client: float) -> bool:
    """Whether a serving broker whose peer is silent is not the one cut off. `workers`: (registered, last
    heard, epoch it carried when it registered) of each registered worker; `workers_when_heard`: how many
    there were when the peer last spoke. A worker that has not been with a newer term — with us since before
    the silence, or back carrying our epoch — heard well after the silence began and within the window says
    the cluster still reaches us; with no workers then, any worker, or a client that has been with us
    (`last_client`: it carried our epoch), does."""
    after = max(peer_heard + 2 * heartbeat_s, now - window_s)
    if workers_when_heard:
        return any((registered <= peer_heard or carried == epoch) and seen > after
                   for registered, seen, carried in workers)
    return last_client > after or any(seen > after for _, seen, _ in workers)


def next_epoch(me: Side, peer: Side | None) -> int:
    """The term a broker that starts to serve opens: newer than any it or its peer has seen, odd for the
    primary and even for the backup, so that two brokers never open the same term."""
    epoch = max(me.epoch, peer.epoch if peer is not None else 0) + 1
    return epoch + (epoch % 2 != (1 if me.role is Role.PRIMARY else 0))
