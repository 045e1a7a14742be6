"""Placement of jobs on free slots, as a pure function (the ipyparallel way).

Tasks take turns, one slot per turn, in the order given (the broker passes them oldest first), so a
small task submitted behind a large one starts at once instead of waiting for the large one to drain.
Each slot goes to the worker with the most free slots (least loaded), earliest registered on ties.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Demand:
    task_id: str
    wants: int  # jobs this task could start now (already capped by its `workers` limit)


def place(free_slots: dict[str, int], demands: list[Demand]) -> list[tuple[str, str]]:
    """(task_id, worker_id) pairs to assign now."""
    free = {w: n for w, n in free_slots.items() if n > 0}
    wants = {d.task_id: d.wants for d in demands if d.wants > 0}
    order = [d.task_id for d in demands if d.task_id in wants]
    out: list[tuple[str, str]] = []
    while free and order:
        for task_id in list(order):
            if not free:
                break
            worker = max(free, key=lambda w: free[w])  # dicts keep registration order: ties go early
            out.append((task_id, worker))
            free[worker] -= 1
            if not free[worker]:
                del free[worker]
            wants[task_id] -= 1
            if not wants[task_id]:
                order.remove(task_id)
    return out
