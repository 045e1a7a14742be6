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
    PASSED = "passed"  # metric meets the accuracy goal
    FAILED_GOAL = "failed_goal"  # ran, metric misses the goal
    ERROR = "error"  # the recipe or INC raised, or the runner died max_attempts times
    CANCELLED = "cancelled"  # no longer needed (a lower trial passed, or the task ended)

    @property
    def finished(self) -> bool:
        return self not in (TrialState.PENDING, TrialState.RUNNING)
