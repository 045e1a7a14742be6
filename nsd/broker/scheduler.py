"""Placement of jobs on free slots, as a pure function (the ipyparallel way).

Higher `priority` is served first: a tier gets every slot it can use before a lower tier gets any.
Within a tier, slots are shared fairly: each free slot goes to the task running the fewest jobs right
now (oldest first on ties), so a small task submitted behind a large one starts at its next free slot
instead of waiting for the large one to drain (Neural Solution's FIFO queue blocked on its head), and
two large tasks split the cluster evenly. Each slot goes to the worker with the most free slots (least
loaded), earliest registered on ties. A task's own `workers` limit is applied before this, in `wants`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Demand:
    task_id: str
    wants: int  # jobs this task could start now (already capped by its `workers` limit)
    priority: int = 0
    running: int = 0  # jobs it runs now


def place(free_slots: dict[str, int], demands: list[Demand]) -> list[tuple[str, str]]:
    """(task_id, worker_id) pairs to assign now."""
    free = {w: n for w, n in free_slots.items() if n > 0}
    wants = {d.task_id: d.wants for d in demands if d.wants > 0}
    running = {d.task_id: d.running for d in demands}
    age = {d.task_id: i for i, d in enumerate(demands)}
    priority = {d.task_id: d.priority for d in demands}
    out: list[tuple[str, str]] = []
    while free and wants:
        task_id = min(wants, key=lambda t: (-priority[t], running[t], age[t]))
        worker = max(free, key=lambda w: free[w])  # dicts keep registration order: ties go early
        out.append((task_id, worker))
        running[task_id] += 1
        free[worker] -= 1
        if not free[worker]:
            del free[worker]
        wants[task_id] -= 1
        if not wants[task_id]:
            del wants[task_id]
    return out
