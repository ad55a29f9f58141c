"""The read loop of analysis and output processes: queue batches to plugins, checkpoints in order.

Its state, named:
- the read position of each queue: the end of the last batch handed to the plugins
  (``QueueCursor.read``);
- what is in flight: bodies handed to background deliveries (``Delivery.ticket`` handed over,
  ``Delivery.done`` settled), messages an output holds (-4, ``Slot.holding``), and the messages an
  async output has processed but not acknowledged yet (``Slot.unacked``);
- the commit position of each queue: the checkpoint sent to the supervisor
  (``QueueCursor.committed``).

The one rule: **commit = the oldest position not yet settled.** A message is settled once it is
delivered, dead-lettered or (analysis) its injections are on disk; the checkpoint never passes a
message that is not. Positions are committed in the order they were made; one made while a
delivery was in flight waits for that delivery, and every later position waits behind it
(``Commits``). A kill at any point therefore re-reads what was not settled, and never skips it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from hindsight_py import message as hmsg
from hindsight_py.matcher import compile_matcher
from hindsight_py.queue import Batch, format_position
from hindsight_py.sandbox.base import BatchResult, PluginError

IDLE_SLEEP = 0.02  # seconds to wait for new queue data
RETRY_DELAY = 1.0  # upstream re-offers a -3 message after one second
BATCH_RECORDS = 1000


class Control(Protocol):
    """What the loop needs of its process: the supervisor's requests and the checkpoint reports."""

    drain: bool  # every writer upstream has finished: read the queues to their end, then stop
    stop: bool  # stop as soon as possible

    def poll(self) -> None: ...
    def outputs_drained(self) -> None: ...  # an output after its drain: wait for the others (or a stop)
    def wait(self, timeout: float) -> None: ...  # poll() after up to `timeout` s, sooner on a request
    def checkpoint(self, key: str, value: Any) -> None: ...
    def send_checkpoints(self) -> None: ...


class Delivery(Protocol):
    """A settle/commit ticket counter: an output's work that outlives the call that started it
    (a bulk body on its way, a file not yet synced). ``ticket`` counts what was handed over,
    ``done`` what is settled; positions made while ``busy`` wait until ``done`` reaches the
    ticket they saw."""

    ticket: int
    done: int
    interrupted: bool  # the error of wait() is a stop request, not a failure

    @property
    def busy(self) -> bool: ...
    def wait(self) -> str | None: ...


class QueueReader(Protocol):
    discarded_bytes: int

    def read_batch(self, max_records: int = ...) -> Batch | None: ...
    def at_end(self) -> bool: ...


class QueueCursor:
    """One queue as the loop reads it: its reader, checkpoint key, read and committed positions."""

    def __init__(self, queue: str, key: str, reader: QueueReader, committed: str) -> None:
        self.queue = queue
        self.key = key
        self.reader = reader
        self.read: tuple[int, int] | None = None  # the end of the last batch handed to the plugins
        self.committed = committed  # the last checkpoint sent
        self.reported_discards = 0


class Slot:
    """One plugin in the loop: its sandbox, its host (stats, deliveries, log) and its matcher."""

    def __init__(self, plugin: Any, sandbox: Any, host: Any) -> None:
        self.plugin = plugin
        self.sandbox = sandbox
        self.host = host
        self.matcher = compile_matcher(plugin.message_matcher)
        self.alive = True
        self.next_timer = time.monotonic() + plugin.ticker_interval if plugin.ticker_interval else None
        # async outputs: sequence number -> the position just after that message, until acknowledged
        self.unacked: dict[int, tuple[int, int]] = {}
        # injection budgets per call: analysis plugins have upstream's limits, outputs none (-1)
        analysis = plugin.type == "analysis"
        self.message_inject_limit = plugin.process_message_inject_limit if analysis else -1
        self.timer_inject_limit = plugin.timer_event_inject_limit if analysis else -1
        # an output that returned -4 holds messages it has not delivered yet: until it commits, the
        # read position must not pass them, not even over a batch its matcher skips entirely
        self.holding = False

    def deliveries(self) -> list[Delivery]:
        return list(getattr(self.host, "deliveries", ()))


class Commits:
    """The checkpoints of one read loop, in the order they were made. A position becomes its
    queue's checkpoint only once every delivery ticket handed over before it is settled; until
    then it waits, and every later position waits behind it."""

    def __init__(self, deliveries: Callable[[], list[Any]], send: Callable[[str, str], None]) -> None:
        self._deliveries = deliveries  # looked at anew each time: an output may start one late
        self._send = send
        self.waiting: list[tuple[list[tuple[Any, int]], Any, tuple[int, int]]] = []

    def commit(self, cursor: Any, pos: tuple[int, int]) -> None:
        busy = [(d, d.ticket) for d in self._deliveries() if d.busy]
        if busy or self.waiting:
            self.waiting.append((busy, cursor, pos))
        else:
            self._now(cursor, pos)

    def settle(self) -> None:
        """Commit the waiting positions whose deliveries have all finished, oldest first."""
        while self.waiting and all(d.done >= t for d, t in self.waiting[0][0]):
            _, cursor, pos = self.waiting.pop(0)
            self._now(cursor, pos)

    def _now(self, cursor: Any, pos: tuple[int, int]) -> None:
        cursor.committed = format_position(pos)
        self._send(cursor.key, cursor.committed)


class ReadLoop:
    """Reads batches from the cursors in turn, hands each to the slots whose matcher selects
    messages in it, fires timers, and commits as the module docstring says. `terminated(slot,
    error)` is called once for a plugin that fails; the loop goes on with the others."""

    def __init__(self, control: Control, cursors: Sequence[QueueCursor], slots: Sequence[Slot], *,
                 is_output: bool, terminated: Callable[[Slot, str], None], log: Callable[[int, str], None],
                 retry_delay: float = RETRY_DELAY, idle_sleep: float = IDLE_SLEEP) -> None:
        self.control = control
        self.cursors = list(cursors)
        self.slots = list(slots)
        self.is_output = is_output
        self._terminated = terminated
        self._log = log
        self._retry_delay = retry_delay
        self._idle_sleep = idle_sleep
        self._turn = 0  # the cursor read first next time (queues are read in turn)
        self.commits = Commits(lambda: [d for s in self.slots for d in s.deliveries()], control.checkpoint)
        # decode only what the matchers look at: most test headers alone
        live = [s.matcher for s in self.slots if not s.matcher.always]
        self._need_fields = any(not m.headers_only for m in live)
        self._need_payload = any("Payload" in m.expression for m in live)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        """Until a stop, the end of the queues after a drain, or no plugin left; then the final
        timer_event, the deliveries awaited and the last checkpoints sent."""
        # Timers run on data time inside batches (the sandboxes do it, as hindsight_cli does). When
        # no message arrives for ticker_interval seconds, they fire on the wall clock instead, so
        # that a partly filled batch still leaves while the input is idle.
        for slot in self.slots:
            if slot.plugin.ticker_interval:
                slot.sandbox.set_ticker(slot.plugin.ticker_interval, slot.timer_inject_limit)
        while True:
            self.control.poll()
            if self.control.stop:
                break
            if not any(s.alive for s in self.slots):
                return
            cursor, batch = self._next_batch()
            if batch is None:
                self.commits.settle()
                if self.control.drain and all(c.reader.at_end() for c in self.cursors):
                    if self.is_output:
                        self.control.outputs_drained()
                    break
                self.fire_timers(False)
                self.control.wait(self._idle_sleep)  # new queue data, or the supervisor's drain/stop
                continue
            assert cursor is not None
            fed = self._hand_over(cursor, batch)
            if self.is_output and not self.slots[0].alive:
                break
            # a plugin whose matcher took nothing from this batch gets no data-time timers from it:
            # its ticker runs on the wall clock meanwhile, as upstream's fires for every message,
            # matched or not
            self._postpone_timers(fed)
            self.fire_timers(False)
            self.commits.settle()
        self._finish()

    def commit_processed(self) -> None:
        """update_checkpoint() from a timer_event: everything read so far is settled."""
        for cursor in self.cursors:
            if cursor.read is not None:
                self.commits.commit(cursor, cursor.read)
        if self.is_output:
            self.slots[0].holding = False

    def _next_batch(self) -> tuple[QueueCursor | None, Batch | None]:
        found: tuple[QueueCursor | None, Batch | None] = (None, None)
        n = len(self.cursors)
        for k in range(n):
            cursor = self.cursors[(self._turn + k) % n]
            batch = cursor.reader.read_batch(BATCH_RECORDS)
            if batch is not None:
                self._turn = (self._turn + k + 1) % n
                found = (cursor, batch)
                break
        for c in self.cursors:
            d = c.reader.discarded_bytes
            if d != c.reported_discards:
                self._log(4, f"{c.queue} queue: skipped {d - c.reported_discards} corrupt bytes")
                c.reported_discards = d
        return found

    def _hand_over(self, cursor: QueueCursor, batch: Batch) -> list[Slot]:
        """The batch to every live slot; then its end is the read position, committed at once
        unless an output holds or awaits messages of it. The slots it gave messages to."""
        decoded: list[Any] | None = None
        committable = True
        fed: list[Slot] = []
        for slot in self.slots:
            if not slot.alive:
                continue
            timings = slot.host.stats.timings
            timings.read += len(batch.records)
            started = time.perf_counter_ns()
            idx: list[int] | None = None
            if not slot.matcher.always:
                idx = slot.matcher.select(batch.records) if decoded is None else None  # no decoding if it can
                if idx is None:
                    if decoded is None:
                        decoded = [self._decode(raw) for raw in batch.records]
                    idx = [i for i, m in enumerate(decoded) if m is not None and slot.matcher(m)]
            timings.call(timings.matcher, time.perf_counter_ns() - started, len(batch.records))
            if idx is None or idx:
                fed.append(slot)
            if not self._run_slot(slot, cursor, batch, idx):
                committable = False
        cursor.read = (batch.file_id, batch.ends[-1])
        # analysis: the messages it injected are on disk before the read position moves
        if committable or not self.is_output:
            self.commits.commit(cursor, cursor.read)
        return fed

    def _run_slot(self, slot: Slot, cursor: QueueCursor, batch: Batch, idx: list[int] | None) -> bool:
        """The selected messages (`idx`: indexes into the batch; None: all) through one plugin,
        retrying after a -3. False when the batch's end may not be committed because of it."""
        subset = batch.records if idx is None else [batch.records[i] for i in idx]
        if not subset:
            return not (self.is_output and slot.holding)
        start = 0
        while True:
            seq0 = slot.sandbox.seq_counter() if slot.plugin.async_buffer_size else 0
            started = time.perf_counter_ns()
            res = slot.sandbox.run_batch(subset[start:], slot.message_inject_limit)
            timings = slot.host.stats.timings
            timings.call(timings.process, time.perf_counter_ns() - started, res.processed)
            slot.host.stats.processed += res.processed
            slot.host.stats.failures += res.failures
            slot.holding = res.batching
            # (the messages before a retry are committed by the call that retried)
            settled = self._output_commits(slot, cursor, batch, idx, start, seq0, res) if self.is_output else True
            if res.status == "terminate":
                slot.alive = False
                self._terminated(slot, res.error or "terminated")
                return False
            if res.status != "retry":
                return settled
            start += res.processed
            slot.host.stats.retried += 1
            self._wait_retry()
            if self.control.stop:
                return False

    def _output_commits(self, slot: Slot, cursor: QueueCursor, batch: Batch, idx: list[int] | None,
                        start: int, seq0: int, res: BatchResult) -> bool:
        """What an output's call settled, committed; False when the batch's end is not settled."""
        def position(j: int) -> tuple[int, int]:  # j: index into the selected messages
            return batch.file_id, batch.ends[j if idx is None else idx[j]]

        if slot.plugin.async_buffer_size:
            # the plugin acknowledges by sequence number: each acknowledged position is committed
            # in the order the plugin made them (upstream's update_checkpoint(sequence_id))
            for j in range(res.processed):
                slot.unacked[seq0 + j + 1] = position(start + j)
            for seq in slot.sandbox.take_acks():
                pos = slot.unacked.pop(seq, None)
                if pos is not None:
                    self.commits.commit(cursor, pos)
            return False
        if res.batching or res.status != "ok":
            # held messages: only what the plugin committed may be checkpointed
            if res.commit_index:
                self.commits.commit(cursor, position(start + res.commit_index - 1))
            return False
        return True

    def _wait_retry(self) -> None:
        deadline = time.monotonic() + self._retry_delay
        while True:  # the pipe is read at least once: a stop ends the retries
            self.control.poll()
            self.fire_timers(False)
            if time.monotonic() >= deadline:
                return
            time.sleep(min(0.05, self._retry_delay))

    # -- timers -------------------------------------------------------------------------------------
    def _postpone_timers(self, fed: list[Slot]) -> None:
        now = time.monotonic()
        for slot in fed:
            if slot.next_timer is not None:
                slot.next_timer = now + slot.plugin.ticker_interval

    def fire_timers(self, shutdown: bool) -> None:
        """The timer_events due on the wall clock (all of them at shutdown, on data time)."""
        now = time.monotonic()
        for slot in self.slots:
            if not slot.alive:
                continue
            if not shutdown and (slot.next_timer is None or now < slot.next_timer):
                continue
            data_secs = slot.sandbox.data_now()
            if shutdown and data_secs:
                ns = data_secs * 1_000_000_000
            else:
                ns = time.time_ns() // 1_000_000_000 * 1_000_000_000
            started = time.perf_counter_ns()
            try:
                slot.sandbox.run_timer(ns, shutdown, slot.timer_inject_limit)
            except PluginError as e:
                slot.alive = False
                self._terminated(slot, str(e))
                continue
            timings = slot.host.stats.timings
            timings.call(timings.timer, time.perf_counter_ns() - started, 1)
            if slot.next_timer is not None:
                slot.next_timer = now + slot.plugin.ticker_interval

    def _finish(self) -> None:
        self.fire_timers(True)
        for slot in self.slots:
            for delivery in slot.deliveries():
                err = delivery.wait()
                if err and delivery.interrupted:
                    # a stop request cut the retries short: not a failure, the messages stay queued
                    slot.host.log(4, f"stopped with documents not confirmed by the server: {err}")
                elif err and slot.alive:
                    slot.alive = False
                    self._terminated(slot, f"timer_event() {err}")
        self.commits.settle()
        self.control.send_checkpoints()

    def _decode(self, raw: bytes) -> Any:
        try:
            return hmsg.decode(raw, fields=self._need_fields, payload=self._need_payload)
        except hmsg.DecodeError:
            return None


__all__ = ["Commits", "Control", "Delivery", "QueueCursor", "ReadLoop", "Slot"]
