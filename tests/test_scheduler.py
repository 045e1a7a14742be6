from nsd.broker.scheduler import Demand, place


def test_tasks_take_turns_so_a_small_late_task_starts_at_once():
    placed = place({"a": 2, "b": 1}, [Demand("big", 10), Demand("small", 1)])
    assert [t for t, _ in placed] == ["big", "small", "big"]
    # One slot frees while the big task holds the rest: the small one gets it, not the big one again.
    assert place({"a": 1}, [Demand("big", 10, running=7), Demand("small", 1)]) == [("small", "a")]
    # Two large tasks converge to an even split.
    placed = place({"a": 4}, [Demand("x", 10, running=3), Demand("y", 10, running=1)])
    assert [t for t, _ in placed] == ["y", "y", "x", "y"]


def test_best_fit_worker_first_and_no_overcommit():
    placed = place({"a": 1, "b": 3}, [Demand("t", 10)])
    assert placed == [("t", "a"), ("t", "b"), ("t", "b"), ("t", "b")]
    assert place({"a": 0}, [Demand("t", 1)]) == []
    assert place({"a": 4}, [Demand("t", 0)]) == []


def test_higher_priority_is_served_first_then_turns_within_a_tier():
    placed = place({"a": 3}, [Demand("old", 5), Demand("urgent", 2, priority=10), Demand("new", 5)])
    assert [t for t, _ in placed] == ["urgent", "urgent", "old"]
    placed = place({"a": 4}, [Demand("old", 5), Demand("urgent", 1, priority=1), Demand("new", 5)])
    assert [t for t, _ in placed] == ["urgent", "old", "new", "old"]


def test_trials_of_k_cores_fit_where_k_cores_are_free():
    # A 4-core task fits only on the worker with 4 free cores; a 1-core task fills the rest.
    placed = place({"a": 3, "b": 8}, [Demand("wide", 5, cores=4), Demand("narrow", 5, cores=1)])
    assert placed.count(("wide", "b")) == 2 and ("wide", "a") not in placed
    assert placed.count(("narrow", "a")) == 3  # narrow trials fill the small hole, not the big block
    # Tasks that leave the shape to the worker take its slot size.
    assert place({"a": 8}, [Demand("t", 5)], {"a": 4}) == [("t", "a"), ("t", "a")]
