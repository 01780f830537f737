"""RayVerifier's dispatch, without Ray: a free actor takes a candidate of a task it already holds."""

from __future__ import annotations

from collections import deque

from stepforge.loop.verifiers import RayVerifier, _Slot


class FakeActor:
    def __init__(self):
        self.calls = []
        self.verify = self

    def remote(self, task, program, mode="closed"):
        self.calls.append(task)
        return f"ref-{task}-{len(self.calls)}"


def _verifier(known: list[set]) -> RayVerifier:
    v = RayVerifier.__new__(RayVerifier)
    v.slots = [_Slot(actor=FakeActor(), known=set(k)) for k in known]
    v._queue = deque()
    return v


def test_a_free_actor_takes_a_task_it_holds_before_older_ones():
    v = _verifier([{"a"}, {"b"}])
    v._queue.extend([(0, "b", "p0", "closed"), (1, "a", "p1", "closed"),
                     (2, "b", "p2", "closed"), (3, "a", "p3", "closed")])
    v._dispatch()
    assert [s.job[1] for s in v.slots] == ["a", "b"]  # FIFO would give slot 0 the b
    assert [t for t, _, _, _ in v._queue] == [2, 3]
    assert v.slots[0].actor.calls == ["a"] and v.slots[1].actor.calls == ["b"]


def test_an_actor_holding_nothing_queued_takes_the_oldest_and_then_holds_it():
    v = _verifier([{"z"}])
    v._queue.extend([(0, "b", "p0", "closed"), (1, "a", "p1", "closed")])
    v._dispatch()
    assert v.slots[0].job[0] == 0 and v.slots[0].known == {"z", "b"}
    v.slots[0].job = v.slots[0].ref = None
    v._queue.appendleft((2, "b", "p2", "closed"))
    v._queue.append((3, "b", "p3", "closed"))
    v._queue.rotate(-1)  # queue: a, b(3), b(2)
    v._dispatch()
    assert v.slots[0].job[1] == "b"
