from nsd.broker.scheduler import Demand, place


def test_tasks_take_turns_so_a_small_late_task_starts_at_once():
    placed = place({"a": 2, "b": 1}, [Demand("big", 10), Demand("small", 1)])
    assert [t for t, _ in placed] == ["big", "small", "big"]


def test_least_loaded_worker_first_and_no_overcommit():
    placed = place({"a": 1, "b": 3}, [Demand("t", 10)])
    assert placed == [("t", "b"), ("t", "b"), ("t", "a"), ("t", "b")]
    assert place({"a": 0}, [Demand("t", 1)]) == []
    assert place({"a": 4}, [Demand("t", 0)]) == []
