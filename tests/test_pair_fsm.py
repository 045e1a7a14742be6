"""The pair's decisions (nsd/broker/pair.py) without sockets: each rule, then a model of two brokers and
their workers driven through thousands of random link cuts, heals, kills and restarts, checked at every
step never to have two brokers that acknowledge work, and to settle back to one active and one whole copy."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from nsd.broker.pair import (PairState, Role, Side, cluster_still_hears, fenced, may_take_over, next_epoch,
                             on_peer_state, on_silence)

P, B = Role.PRIMARY, Role.BACKUP
PENDING, PASSIVE, ACTIVE, SOLO, CUT_OFF = (PairState.PENDING, PairState.PASSIVE, PairState.ACTIVE, PairState.SOLO,
                                           PairState.CUT_OFF)


def side(role=P, state=PENDING, epoch=0, lsn=0, whole=True, workers=0) -> Side:
    return Side(role, state, epoch, lsn, whole, workers)


def test_at_a_cold_start_the_newer_whole_history_serves_and_the_primary_breaks_a_tie():
    assert on_peer_state(side(P), side(B, whole=False), False) is SOLO
    assert on_peer_state(side(B, whole=False), side(P), False) is PENDING
    assert on_peer_state(side(P, epoch=1, lsn=9), side(B, epoch=2, lsn=3), False) is PENDING  # the later term
    assert on_peer_state(side(B, epoch=2, lsn=3), side(P, epoch=1, lsn=9), False) is SOLO
    assert on_peer_state(side(P, epoch=1, lsn=5), side(B, epoch=1, lsn=5), False) is SOLO  # a tie: the primary
    assert on_peer_state(side(P, whole=False, epoch=9), side(B, epoch=1), False) is PENDING  # a partial copy never
    assert on_peer_state(side(P, whole=False), side(B, whole=False), False) is PENDING  # nobody whole: nobody serves


def test_a_broker_that_meets_a_serving_peer_becomes_its_copy_and_a_healed_split_keeps_the_newer_term():
    assert on_peer_state(side(B), side(P, SOLO, epoch=1), False) is PASSIVE
    assert on_peer_state(side(P, CUT_OFF, epoch=1), side(B, SOLO, epoch=2), False) is PENDING
    assert on_peer_state(side(B, SOLO, epoch=2), side(P, CUT_OFF, epoch=1), False) is SOLO
    assert on_peer_state(side(P, SOLO, epoch=3), side(B, ACTIVE, epoch=2), False) is SOLO
    # a broker back with the whole history of a newer term (it served while the other was cut off)
    assert on_peer_state(side(P, CUT_OFF, epoch=1), side(B, PENDING, epoch=4), False) is PENDING
    assert on_peer_state(side(B, PENDING, epoch=4), side(P, CUT_OFF, epoch=1), False) is PENDING
    assert on_peer_state(side(P, SOLO, epoch=1), side(B, PENDING, epoch=4, whole=False), False) is SOLO


def test_the_serving_broker_is_active_only_with_a_whole_passive_copy():
    assert on_peer_state(side(P, SOLO), side(B, PASSIVE, whole=True), False) is ACTIVE
    assert on_peer_state(side(P, SOLO), side(B, PASSIVE, whole=True), True) is SOLO  # a blob not confirmed yet
    assert on_peer_state(side(P, ACTIVE), side(B, PASSIVE, whole=True), True) is ACTIVE  # (it is only hidden)
    assert on_peer_state(side(P, ACTIVE), side(B, PASSIVE, whole=False), False) is SOLO  # it is resyncing
    assert on_peer_state(side(P, CUT_OFF), side(B, PENDING), False) is SOLO  # it restarted: it will not take over


def test_silence_holds_effects_then_cuts_off_then_goes_solo_only_with_witnesses():
    me = side(P, ACTIVE, epoch=1)
    assert on_silence(me, 1.0, 5.0, still_heard=True) is ACTIVE  # effects wait, nothing else yet
    assert on_silence(me, 2.5, 5.0, still_heard=True) is CUT_OFF  # before the passive may take over (5 s)
    assert on_silence(side(P, CUT_OFF), 5.0, 5.0, still_heard=False) is CUT_OFF
    assert on_silence(side(P, CUT_OFF), 5.0, 5.0, still_heard=True) is SOLO
    assert on_silence(side(P, SOLO), 9.0, 5.0, still_heard=False) is CUT_OFF  # its workers went silent too
    assert on_silence(side(P, SOLO), 2.5, 5.0, still_heard=False) is CUT_OFF  # (as soon as an active one)
    assert on_silence(side(P, SOLO), 2.5, 5.0, still_heard=True) is SOLO
    assert on_silence(side(P, SOLO), 1.0, 5.0, still_heard=False) is SOLO  # its peer is there, catching up
    assert on_silence(side(B, PASSIVE), 99.0, 5.0, still_heard=False) is PASSIVE  # takeover needs a witness


@pytest.mark.parametrize("attests, worker, peer_workers, carried, silent, whole, ok", [
    (True, True, 3, 1, 5.0, True, True),
    (False, True, 3, 1, 5.0, True, False),  # a worker that did not lose the other broker
    (True, True, 3, 1, 4.9, True, False),  # the peer has not been silent for the whole window
    (True, False, 3, 1, 5.0, True, False),  # a client, while the active one had workers
    (True, False, 0, 1, 5.0, True, True),  # a client, when it had none
    (True, True, 3, 2, 5.0, True, False),  # a witness that has seen a newer term than our copy
    (True, True, 3, 1, 5.0, False, False),  # a copy that is not whole
])
def test_binary_stars_takeover_rule(attests, worker, peer_workers, carried, silent, whole, ok):
    me = side(B, PASSIVE, epoch=1, whole=whole)
    assert may_take_over(me, silent, 5.0, attests, worker, peer_workers, carried) is ok


def test_witnesses_of_a_broker_that_is_not_cut_off():
    now, heard = 100.0, 90.0  # the peer silent for 10 s, window 5 s
    args = dict(now=now, peer_heard=heard, heartbeat_s=1.0, window_s=5.0, epoch=3, workers_when_heard=1, last_client=0.0)
    assert cluster_still_hears(workers=[(50.0, 99.0, 0)], **args)  # with us since before, heard just now
    assert not cluster_still_hears(workers=[(50.0, 91.0, 0)], **args)  # silent since the silence began
    assert not cluster_still_hears(workers=[(95.0, 99.0, 0)], **args)  # new since: it may come from elsewhere
    assert cluster_still_hears(workers=[(95.0, 99.0, 3)], **args)  # new, but back with our epoch
    assert not cluster_still_hears(workers=[(95.0, 99.0, 4)], **args)
    alone = {**args, "workers_when_heard": 0}
    assert cluster_still_hears(workers=[], **{**alone, "last_client": 99.0})
    assert not cluster_still_hears(workers=[], **alone)


def test_terms_never_collide_and_a_newer_epoch_fences_a_serving_broker():
    assert next_epoch(side(P, epoch=0), None) == 1 and next_epoch(side(B, epoch=1), side(P, epoch=1)) == 2
    assert next_epoch(side(P, epoch=2), side(B, epoch=2)) == 3 and next_epoch(side(B, epoch=3), None) == 4
    assert next_epoch(side(P, epoch=4), side(B, epoch=6)) == 7
    assert fenced(side(P, SOLO, epoch=3), 4) and not fenced(side(P, SOLO, epoch=3), 3)
    assert not fenced(side(P, PASSIVE, epoch=3), 9)


# ---- a model of the pair, its workers and the links between them ------------------------------------

HB, WINDOW = 1.0, 5.0  # heartbeat and liveness window; one step is half a heartbeat


@dataclass
class Broker:
    role: Role
    whole: bool
    state: PairState = PENDING
    epoch: int = 0
    lsn: int = 0
    alive: bool = True
    started: float = 0.0
    heard: float = -1e9
    confirmed: float = -1e9  # its peer last showed it hears this one
    peer: Side | None = None
    workers_when_heard: int = 0
    whole_at: float | None = None  # a passive's catch-up completes then

    def side(self, workers: int, now: float = 0.0) -> Side:
        return Side(self.role, self.state, self.epoch, self.lsn, self.whole, workers, now - self.heard < WINDOW / 2)


@dataclass
class Workers:
    """All the workers, in one place: attached to a broker (or none), as a real worker daemon moves."""
    at: str | None = None
    epoch: int = 0
    registered: float = 0.0
    heard: float = 0.0
    trying: str = "a"
    failover: bool = False
    refused_since: float | None = None
    log: list = field(default_factory=list)


class Model:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.b = {"a": Broker(P, whole=True), "b": Broker(B, whole=False)}
        self.links = {"ab": True, "aw": True, "bw": True}
        self.w = Workers()
        self.t = 0.0
        self.loss = 0.2  # a state lost now and then: the two sides count silence from different times

    def other(self, name: str) -> str:
        return "b" if name == "a" else "a"

    def wire(self, x: str, y: str) -> bool:
        if "w" in (x, y):
            return self.links[("aw" if "a" in (x, y) else "bw")]
        return self.links["ab"]

    def serve(self, x: Broker, why: str) -> None:
        x.epoch, x.state, x.whole = next_epoch(x.side(0), x.peer), SOLO, True
        x.lsn += 1  # the term's first transaction

    def step(self) -> None:
        """Half a heartbeat: states cross the link, silence is judged, workers move — in a random order, as
        nothing orders them in the real processes."""
        self.t += HB / 2
        phases = [self.cross, self.judge_silence, self.move_workers]
        self.rng.shuffle(phases)
        for phase in phases:
            phase()
        for x in self.b.values():  # work gets done only where it is acknowledged
            peer_there = x.peer is not None and self.t - x.confirmed <= HB
            if x.alive and self.w.at is not None and (x.state is SOLO or x.state is ACTIVE and peer_there):
                x.lsn += 1

    def cross(self) -> None:
        t, b = self.t, self.b
        sides = {n: x.side(int(self.w.at == n), t) for n, x in b.items()}
        for name, x in b.items():  # states cross the pair's link
            y = b[self.other(name)]
            if not (x.alive and y.alive and self.wire("a", "b")) or self.rng.random() < self.loss:
                continue
            reconnected = y.peer is None or t - y.heard >= WINDOW
            y.heard, y.peer = t, sides[name]
            if sides[name].hears:
                y.confirmed = t
                if y.state.serving:
                    y.workers_when_heard = int(self.w.at == self.other(name))
            new = on_peer_state(y.side(int(self.w.at == self.other(name))), sides[name], False)
            if y.state.serving and new is PENDING:
                y.state, y.whole = PENDING, False
            elif not y.state.serving and new.serving:
                self.serve(y, "cold start")
            else:
                y.state = new
            if y.state is PASSIVE and sides[name].state.serving:  # the copy follows the serving broker
                if reconnected and sides[name].state is SOLO or y.epoch != sides[name].epoch and not y.whole:
                    y.whole, y.whole_at = False, None
                if not y.whole and y.whole_at is None:
                    y.whole_at = t + 2 * HB
                if y.whole_at is not None and t >= y.whole_at:
                    y.whole, y.whole_at = True, None
                y.epoch, y.lsn = sides[name].epoch, sides[name].lsn

    def judge_silence(self) -> None:
        t, b = self.t, self.b
        for name, x in b.items():
            if not (x.alive and x.state.serving):
                continue
            ours = self.w.at == name
            workers = [(self.w.registered, self.w.heard if ours else -1e9, self.w.epoch)] if ours else []
            still = cluster_still_hears(t, x.confirmed, HB, WINDOW, x.epoch, workers, x.workers_when_heard, -1e9)
            x.state = on_silence(x.side(int(ours)), t - max(x.confirmed, x.started), WINDOW, still)

    def move_workers(self) -> None:
        w, t = self.w, self.t
        if w.at is not None:
            x = self.b[w.at]
            if x.alive and self.wire(w.at, "w") and x.state.serving:
                w.heard = t
            elif x.alive and self.wire(w.at, "w"):  # it stepped down: "not active", go to the other
                w.at, w.trying, w.failover = None, self.other(w.at), False
            elif t - w.heard >= WINDOW:  # silent: the other one, as a witness
                w.at, w.trying, w.failover, w.refused_since = None, self.other(w.at), True, None
            return
        y = self.b[w.trying]
        if not (y.alive and self.wire(w.trying, "w")):
            w.trying, w.failover = self.other(w.trying), True
            return
        if fenced(y.side(0), w.epoch):
            y.state, y.whole = PENDING, False
        if not y.state.serving:
            peer_workers = y.peer.workers if y.peer is not None else 0
            if may_take_over(y.side(0), t - max(y.heard, y.started), WINDOW, w.failover, True, peer_workers, w.epoch):
                self.serve(y, "takeover")
            else:
                if w.failover and t - (w.refused_since or t) < WINDOW:
                    w.refused_since = w.refused_since or t  # the same one again: it may take over soon
                else:
                    w.trying, w.failover, w.refused_since = self.other(w.trying), False, None
                return
        w.at, w.registered, w.heard, w.epoch, w.refused_since = w.trying, t, t, max(w.epoch, y.epoch), None

    def fault(self) -> None:
        """One random event: a link cut or healed, a host cut off or back, a broker killed or restarted."""
        what = self.rng.random()
        name = self.rng.choice("ab")
        x = self.b[name]
        if what < 0.3:
            self.links["ab"] = not self.links["ab"]
        elif what < 0.55:
            up = not self.links[f"{name}w"]
            self.links[f"{name}w"] = up
            self.links["ab"] = up and self.links["ab"] if not up else self.links["ab"]
        elif what < 0.75 and x.alive:
            x.alive = False
        elif not x.alive:
            x.alive, x.state, x.started, x.heard, x.confirmed, x.peer, x.whole_at = (True, PENDING, self.t, -1e9, -1e9,
                                                                                    None, None)
        else:
            self.links[f"{name}w"] = True

    def acknowledging(self) -> list[str]:
        return [n for n, x in self.b.items() if x.alive and x.state in (ACTIVE, SOLO)]


@pytest.mark.parametrize("seed", range(60))
def test_no_sequence_of_cuts_kills_and_restarts_makes_two_active_brokers_and_the_pair_settles(seed):
    model = Model(seed)
    for _ in range(60):  # a fault, then a while for it to play out (sometimes less than a window)
        model.fault()
        for _ in range(model.rng.randrange(1, 25)):
            model.step()
            assert len(model.acknowledging()) <= 1, (seed, model.t, model.b, model.links)
    model.links, model.loss = dict.fromkeys(model.links, True), 0.0  # everything mended
    for x in model.b.values():
        if not x.alive:
            x.alive, x.state, x.started, x.heard, x.confirmed, x.peer = True, PENDING, model.t, -1e9, -1e9, None
    for _ in range(int(8 * WINDOW / (HB / 2))):
        model.step()
        assert len(model.acknowledging()) <= 1
    states = sorted(x.state.value for x in model.b.values())
    assert states == ["active", "passive"] and all(x.whole for x in model.b.values()), (seed, model.b)
    assert len({x.epoch for x in model.b.values()}) == 1
