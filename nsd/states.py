"""Task and trial states, shared by broker, client and CLI (no I/O, no torch)."""

import enum


class TaskState(str, enum.Enum):
    QUEUED = "queued"  # accepted and committed; waiting for a slot to plan it
    PLANNING = "planning"  # a worker loads the model, evaluates FP32 once and expands the config set
    TUNING = "tuning"  # trials run on free slots in INC's order
    FINALIZING = "finalizing"  # the winner is known; producing its artifact
    DONE = "done"  # finished with a winner (met_goal says whether it met the accuracy goal)
    FAILED = "failed"  # could not run at all (plan failed, every trial errored)
    CANCELLED = "cancelled"  # cancelled by a user

    @property
    def terminal(self) -> bool:
        return self in (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)


class TrialState(str, enum.Enum):
    PENDING = "pending"  # waiting for a slot (again, after a lost worker: attempt + 1)
    RUNNING = "running"  # leased to (worker, attempt)
    SCORED = "scored"  # has its metric; passes or fails once the FP32 baseline is known (it ran beside it)
    PASSED = "passed"  # metric meets the accuracy goal
    FAILED_GOAL = "failed_goal"  # ran, metric misses the goal
    ERROR = "error"  # the recipe or INC raised, or the runner died max_attempts times
    CANCELLED = "cancelled"  # no longer needed (a lower trial passed, or the task ended)

    @property
    def finished(self) -> bool:
        """Its outcome is known (a SCORED trial's is not yet: pass or fail waits for the baseline)."""
        return self not in (TrialState.PENDING, TrialState.RUNNING, TrialState.SCORED)


# Every state change goes through `nsd.broker.model` and is checked against these tables: a change not
# listed here is a bug, refused before anything is written.
TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.QUEUED: frozenset({TaskState.PLANNING, TaskState.CANCELLED}),
    TaskState.PLANNING: frozenset({TaskState.TUNING, TaskState.FAILED, TaskState.CANCELLED}),
    TaskState.TUNING: frozenset({TaskState.FINALIZING, TaskState.FAILED, TaskState.CANCELLED}),
    TaskState.FINALIZING: frozenset({TaskState.DONE, TaskState.FAILED,  # failed: the saved model failed verification
                                     TaskState.CANCELLED}),
    TaskState.DONE: frozenset(), TaskState.FAILED: frozenset(), TaskState.CANCELLED: frozenset(),
}
TRIAL_TRANSITIONS: dict[TrialState, frozenset[TrialState]] = {
    # PASSED/FAILED_GOAL straight from PENDING: a metric already known (answered without running it); SCORED
    # straight from PENDING: the same before the baseline is known.
    TrialState.PENDING: frozenset({TrialState.RUNNING, TrialState.CANCELLED, TrialState.PASSED,
                                   TrialState.FAILED_GOAL, TrialState.SCORED}),
    TrialState.RUNNING: frozenset({TrialState.PENDING, TrialState.PASSED, TrialState.FAILED_GOAL, TrialState.ERROR,
                                   TrialState.CANCELLED, TrialState.SCORED}),
    TrialState.SCORED: frozenset({TrialState.PASSED, TrialState.FAILED_GOAL, TrialState.CANCELLED}),
    TrialState.PASSED: frozenset(), TrialState.FAILED_GOAL: frozenset(), TrialState.ERROR: frozenset(),
    TrialState.CANCELLED: frozenset(),
}


class TransitionError(RuntimeError):
    """A state change the tables above do not allow (a bug of ours, never a peer's doing)."""


def check_transition(table: dict, old, new) -> None:
    if new is not old and new not in table[old]:
        raise TransitionError(f"{old.value} -> {new.value} is not an allowed transition")
