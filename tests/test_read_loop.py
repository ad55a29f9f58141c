"""read_loop.ReadLoop without processes, queues or Lua: scripted plugins, the checkpoints it sends.

The rule under test: commit = the oldest position not yet settled. Kill points are modelled by a
stop request at a chosen moment: the last checkpoint sent is what a restart would read from.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from hindsight_py.plugin_stats import PluginTimings
from hindsight_py.queue import Batch
from hindsight_py.read_loop import QueueCursor, ReadLoop, Slot
from hindsight_py.sandbox.base import BatchResult


class Control:
    def __init__(self, stop_after_polls: int | None = None) -> None:
        self.drain = True  # read the queue to its end, then stop
        self.stop = False
        self.sent: list[tuple[str, str]] = []
        self._polls_left = stop_after_polls

    def poll(self) -> None:
        if self._polls_left is not None:
            self._polls_left -= 1
            if self._polls_left < 0:
                self.stop = True  # the kill point

    def outputs_drained(self) -> None:
        pass  # the only output: nothing to wait for

    def wait(self, timeout: float) -> None:
        pass  # the loop polls again at the top of its next turn

    def checkpoint(self, key: str, value: Any) -> None:
        self.sent.append((key, value))

    def send_checkpoints(self) -> None:
        pass


class Reader:
    """Batches of message names; message k of file 0 ends at offset 10 * k."""

    def __init__(self, *batches: list[str]) -> None:
        self.discarded_bytes = 0
        self._batches = []
        n = 0
        for names in batches:
            ends = [10 * (n + i + 1) for i in range(len(names))]
            n += len(names)
            self._batches.append(Batch(0, [name.encode() for name in names], ends))

    def read_batch(self, max_records: int = 1000) -> Batch | None:
        return self._batches.pop(0) if self._batches else None

    def at_end(self) -> bool:
        return not self._batches


class Plugin(SimpleNamespace):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**{"message_matcher": "TRUE", "ticker_interval": 0, "type": "output",
                            "async_buffer_size": 0, "process_message_inject_limit": -1,
                            "timer_event_inject_limit": -1, **kw})


class Sandbox:
    """process(names) -> BatchResult: the plugin's answer to each call, scripted by the test."""

    def __init__(self, process: Callable[[list[str]], BatchResult]) -> None:
        self.process = process
        self.calls: list[list[str]] = []
        self.seq = 0
        self.acks: list[int] = []
        self.timers = 0

    def run_batch(self, raws: list[bytes], inject_limit: int = -1) -> BatchResult:
        names = [r.decode() for r in raws]
        self.calls.append(names)
        res = self.process(names)
        self.seq += res.processed
        return res

    def seq_counter(self) -> int:
        return self.seq

    def take_acks(self) -> list[int]:
        acks, self.acks = self.acks, []
        return acks

    def run_timer(self, ns: int, shutdown: bool, inject_limit: int = -1) -> None:
        self.timers += 1

    def set_ticker(self, seconds: int, inject_limit: int = -1) -> None:
        pass

    def data_now(self) -> int:
        return 0


def ok(names: list[str]) -> BatchResult:
    return BatchResult(len(names), "ok", None, len(names), 0, False)


def run(reader: Reader, sandbox: Sandbox, plugin: Plugin | None = None, control: Control | None = None,
        deliveries: list[Any] | None = None, setup: Callable[[ReadLoop], None] | None = None,
        ) -> tuple[ReadLoop, Control, list[str]]:
    control = control or Control()
    plugin = plugin or Plugin()
    host = SimpleNamespace(stats=SimpleNamespace(processed=0, failures=0, retried=0, timings=PluginTimings()), log=lambda lv, t: None,
                           deliveries=deliveries or [])
    slot = Slot(plugin, sandbox, host)
    ended: list[str] = []
    cursor = QueueCursor("input", "input->out", reader, "0:0")
    loop = ReadLoop(control, [cursor], [slot], is_output=plugin.type == "output",
                    terminated=lambda s, err: ended.append(err), log=lambda lv, t: None,
                    retry_delay=0, idle_sleep=0)
    if setup is not None:
        setup(loop)
    loop.run()
    return loop, control, ended


def test_each_batch_delivered_in_full_commits_its_end() -> None:
    _, control, _ = run(Reader(["a", "b"], ["c"]), Sandbox(ok))
    assert control.sent == [("input->out", "0:20"), ("input->out", "0:30")]


def test_held_messages_are_not_committed_until_the_plugin_commits_them() -> None:
    # -4 for a and b; c returns 0 and commits everything before it; d and e are held again
    answers = [BatchResult(2, "ok", None, 0, 0, True), BatchResult(3, "ok", None, 1, 0, True)]
    sandbox = Sandbox(lambda names: answers.pop(0))
    _, control, _ = run(Reader(["a", "b"], ["c", "d", "e"]), sandbox)
    assert control.sent == [("input->out", "0:30")]


def test_a_held_output_keeps_the_checkpoint_even_over_a_batch_its_matcher_skips() -> None:
    plugin = Plugin(message_matcher="FALSE")
    _, control, _ = run(Reader(["a"]), Sandbox(ok), plugin)
    assert control.sent == [("input->out", "0:10")], "a batch nobody wants is settled at once"

    def hold(loop: ReadLoop) -> None:
        loop.slots[0].holding = True  # an earlier batch returned -4

    sandbox = Sandbox(ok)
    _, control, _ = run(Reader(["a"]), sandbox, plugin, setup=hold)
    assert sandbox.calls == [] and control.sent == [], "the held messages before it are not settled"


def test_update_checkpoint_from_a_timer_commits_everything_read() -> None:
    sandbox = Sandbox(lambda names: BatchResult(len(names), "ok", None, 0, 0, True))
    loops: list[ReadLoop] = []

    def timer(ns: int, shutdown: bool, inject_limit: int = -1) -> None:
        loops[0].commit_processed()  # what update_checkpoint() in timer_event does

    sandbox.run_timer = timer  # type: ignore[method-assign]
    _, control, _ = run(Reader(["a", "b"], ["c"]), sandbox, setup=loops.append)
    assert control.sent == [("input->out", "0:30")]


def test_a_retry_hands_over_the_rest_of_the_batch_again() -> None:
    answers = [BatchResult(1, "retry", None, 1, 0, False), ok(["b", "c"])]
    sandbox = Sandbox(lambda names: answers.pop(0))
    loop, control, _ = run(Reader(["a", "b", "c"]), sandbox)
    assert sandbox.calls == [["a", "b", "c"], ["b", "c"]]
    assert loop.slots[0].host.stats.retried == 1
    assert control.sent == [("input->out", "0:10"), ("input->out", "0:30")]


def test_a_stop_while_retrying_commits_only_what_was_delivered() -> None:
    # kill point: the stop arrives during the retry wait of message b
    sandbox = Sandbox(lambda names: BatchResult(int(names[0] == "a"), "retry", None, int(names[0] == "a"), 0, False))
    _, control, _ = run(Reader(["a", "b", "c"]), sandbox, control=Control(stop_after_polls=1))
    assert control.sent == [("input->out", "0:10")]


def test_async_acknowledgements_commit_the_positions_of_the_messages_acknowledged() -> None:
    # async_buffer_size: process_message returns -5 and update_checkpoint(seq) later; acks may come
    # out of order, and each commits its own message's position (upstream's update_checkpoint)
    plugin = Plugin(async_buffer_size=10)
    acks = [[2], [1, 3], [4]]
    sandbox = Sandbox(lambda names: BatchResult(len(names), "ok", None, 0, 0, False))
    real_take = sandbox.take_acks
    sandbox.take_acks = lambda: acks.pop(0) if acks else real_take()  # type: ignore[method-assign]
    loop, control, _ = run(Reader(["a", "b", "c"], ["d"], ["e"]), sandbox, plugin)
    assert control.sent == [("input->out", "0:20"), ("input->out", "0:10"), ("input->out", "0:30"),
                            ("input->out", "0:40")]
    assert sorted(loop.slots[0].unacked) == [5]  # acknowledged after each call: e is not yet


def test_unacknowledged_async_messages_are_never_committed() -> None:
    plugin = Plugin(async_buffer_size=10)
    sandbox = Sandbox(lambda names: BatchResult(len(names), "ok", None, 0, 0, False))
    loop, control, _ = run(Reader(["a", "b"]), sandbox, plugin)
    assert control.sent == [] and sorted(loop.slots[0].unacked) == [1, 2]


class Delivery:
    """A background delivery that settles a ticket when the test says so."""

    def __init__(self) -> None:
        self.ticket = 0
        self.done = 0
        self.interrupted = False

    @property
    def busy(self) -> bool:
        return self.done != self.ticket

    def wait(self) -> str | None:
        if self.busy:
            self.interrupted = True
            return "stopped before the batch was delivered"
        return None


def test_a_kill_while_a_delivery_is_in_flight_leaves_the_checkpoint_before_it() -> None:
    delivery = Delivery()

    def hand_to_delivery(names: list[str]) -> BatchResult:
        delivery.ticket += 1  # the plugin hands its body over and reports its messages done
        if names == ["a"]:
            delivery.done = delivery.ticket  # the first body is delivered at once
        return ok(names)

    _, control, ended = run(Reader(["a"], ["b"], ["c"]), Sandbox(hand_to_delivery), deliveries=[delivery])
    # b's body never settled: neither b nor c (behind it) is committed; the stop is no failure
    assert control.sent == [("input->out", "0:10")] and ended == []


def test_positions_behind_a_delivery_are_committed_once_it_settles() -> None:
    delivery = Delivery()

    def hand_to_delivery(names: list[str]) -> BatchResult:
        delivery.done = delivery.ticket  # the previous body settles as the next one is handed over
        delivery.ticket += 1
        return ok(names)

    sandbox = Sandbox(hand_to_delivery)
    sandbox.run_timer = lambda *a: setattr(delivery, "done", delivery.ticket)  # type: ignore[method-assign]
    _, control, _ = run(Reader(["a"], ["b"], ["c"]), sandbox, deliveries=[delivery])
    assert control.sent == [("input->out", "0:10"), ("input->out", "0:20"), ("input->out", "0:30")]


def test_a_failed_delivery_terminates_the_output_and_commits_nothing_behind_it() -> None:
    delivery = Delivery()
    delivery.wait = lambda: "bulk delivery failed: boom"  # type: ignore[method-assign]

    def hand_to_delivery(names: list[str]) -> BatchResult:
        delivery.ticket += 1
        return ok(names)

    _, control, ended = run(Reader(["a"]), Sandbox(hand_to_delivery), deliveries=[delivery])
    assert control.sent == [] and ended == ["timer_event() bulk delivery failed: boom"]


def test_a_terminated_output_stops_reading_and_keeps_the_last_settled_position() -> None:
    answers = [ok(["a"]), BatchResult(1, "terminate", "process_message() boom", 1, 0, False)]
    sandbox = Sandbox(lambda names: answers.pop(0))
    _, control, ended = run(Reader(["a"], ["b", "c"], ["d"]), sandbox)
    assert ended == ["process_message() boom"]
    assert control.sent == [("input->out", "0:10"), ("input->out", "0:20")]
    assert sandbox.calls == [["a"], ["b", "c"]]


def test_analysis_commits_each_batch_once_handed_over() -> None:
    _, control, _ = run(Reader(["a", "b"], ["c"]), Sandbox(ok), Plugin(type="analysis"))
    assert control.sent == [("input->out", "0:20"), ("input->out", "0:30")]
