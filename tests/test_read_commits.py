"""read_loop.Commits without processes: checkpoints wait behind background deliveries, in order."""

from __future__ import annotations

from types import SimpleNamespace

from hindsight_py.read_loop import Commits


class Sender:
    def __init__(self) -> None:
        self.ticket = 0
        self.done = 0

    @property
    def busy(self) -> bool:
        return self.done != self.ticket


def setup() -> tuple[Commits, list[Sender], list[tuple[str, str]]]:
    senders: list[Sender] = []
    sent: list[tuple[str, str]] = []
    return Commits(lambda: senders, lambda key, value: sent.append((key, value))), senders, sent


def test_without_deliveries_in_flight_a_position_is_committed_at_once() -> None:
    commits, senders, sent = setup()
    reader = SimpleNamespace(key="input->out", committed="")
    senders.append(Sender())
    commits.commit(reader, (0, 100))
    assert sent == [("input->out", "0:100")] and reader.committed == "0:100" and not commits.waiting


def test_positions_wait_for_the_bodies_handed_over_before_them_and_stay_in_order() -> None:
    commits, senders, sent = setup()
    a, b = SimpleNamespace(key="input->out", committed=""), SimpleNamespace(key="analysis->out", committed="")
    pipe = Sender()
    senders.append(pipe)
    pipe.ticket = 1  # body 1 on its way
    commits.commit(a, (0, 100))
    pipe.ticket = 2  # body 2 handed over after that position
    commits.commit(b, (3, 50))
    commits.commit(a, (0, 200))  # nothing new in flight, but it waits behind the others
    assert sent == []
    commits.settle()
    assert sent == []
    pipe.done = 1
    commits.settle()
    assert sent == [("input->out", "0:100")]
    pipe.done = 2
    commits.settle()
    assert sent == [("input->out", "0:100"), ("analysis->out", "3:50"), ("input->out", "0:200")]
    assert a.committed == "0:200" and b.committed == "3:50" and not commits.waiting


def test_a_sender_added_late_is_seen() -> None:
    commits, senders, sent = setup()
    reader = SimpleNamespace(key="input->out", committed="")
    late = Sender()
    late.ticket = 1
    senders.append(late)  # an upstream plugin's LuaSocket takeover starts its sender on its first request
    commits.commit(reader, (1, 10))
    assert sent == []
    late.done = 1
    commits.settle()
    assert sent == [("input->out", "1:10")]
