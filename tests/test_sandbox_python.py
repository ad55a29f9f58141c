"""Python plugins (hindsight_py/plugin.py + sandbox/python.py): the same API, return codes and error
texts as Lua plugins, driven through PythonSandbox with the fake host of tests/sandbox_fakes.py.
Cost: well under a second.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sandbox_fakes import OUTPUT_RETURN_CODE_CASES, FakeHost

from hindsight_py import message as hmsg
from hindsight_py import message_dict, peek
from hindsight_py import plugin as api
from hindsight_py.sandbox.base import PluginError
from hindsight_py.sandbox.python import PythonSandbox

HEADER = "from hindsight_py.plugin import *\n"


def py_sandbox(tmp_path: Path, source: str, kind: str = "analysis", host: FakeHost | None = None,
               **kw: Any) -> tuple[PythonSandbox, FakeHost]:
    n = len(list(tmp_path.glob("p*.py")))
    f = tmp_path / f"p{n}.py"
    f.write_text(HEADER + textwrap.dedent(source))
    values = {**kw.pop("cfg", {}), "Logger": "test.plugin"}  # what read_config() answers
    plugin = SimpleNamespace(
        name=f"{kind}.p{n}", type=kind, source_path=f, runtime_values=lambda: dict(values), restricted_headers=kw.pop("restricted", kind == "analysis"),
        output_limit=kw.pop("output_limit", 65536), async_buffer_size=kw.pop("async_buffer_size", 0),
        preserve_data=kw.pop("preserve_data", False), refused_messages=kw.pop("refused_messages", "dead_letter"),
    )
    hs = SimpleNamespace(hostname="test.host", max_message_size=kw.pop("max_message_size", 65536),
                         output_dir=tmp_path)
    host = host or FakeHost()
    sb = PythonSandbox(plugin, hs, host, log_level=7, pid=0)
    sb.load()
    return sb, host


def raw_message(**kw: Any) -> bytes:
    d = {"Uuid": bytes(range(16)), "Timestamp": 1_000_000_000, **kw}
    return hmsg.encode(message_dict.from_dict(d, restricted=False, logger="l", hostname="h", pid=1, now_ns=0))


def test_api_outside_a_plugin_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="running plugin"):
        api.read_config("x")


def test_input_inject_forms_and_checkpoints(tmp_path: Path) -> None:
    sb, host = py_sandbox(tmp_path, """
        def process_message(cp):
            assert cp is None
            assert read_config("user") == "v" and read_config("Logger") == "test.plugin"
            inject_message({"Type": "dict", "Payload": "p"}, 1)
            inject_message(encode_raw, "two")
            inject_message(None, 3)
            for bad, text in ((b"\\0", "invalid protobuf string"), (None, "cannot be nil without a checkpoint"),
                              ({}, "unsupported checkpoint type: list")):
                try:
                    inject_message(bad, None if bad is not None or text.startswith("cannot") else 1) \\
                        if not text.startswith("unsupported") else inject_message(bad, [])
                except Exception as e:
                    assert text in str(e), e
                else:
                    raise AssertionError(text)
            assert is_running()
            return 0, "done"
    """.replace("encode_raw", repr(raw_message(Type="raw"))), "input", cfg={"user": "v"})
    assert sb.run_input(None) == (0, "done")
    assert [m.type for m in host.messages()] == ["dict", "raw"]
    assert host.messages()[0].logger == "input.p0" and host.checkpoints[-1] == 3


@pytest.mark.parametrize("refused_messages", ["drop", "dead_letter"])
def test_input_inject_lines(tmp_path: Path, refused_messages: str) -> None:
    long_line = "x" * 70000
    sb, host = py_sandbox(tmp_path, f"""
        def process_message(cp):
            block = b"a\\n\\nb\\n{long_line}\\nc\\nnot yet"
            try:
                inject_lines(block, 1)
            except ValueError as e:
                assert "line at byte 5 (70000 bytes) exceeds max_message_size" in str(e), e
            else:
                raise AssertionError("no error")
            too_long = []
            n = inject_lines(block, 2, end=len(block) - 7, type="t", too_long=lambda l, at: too_long.append((len(l), at)))
            assert (n, too_long) == (4, [(70000, 5)]), (n, too_long)
            assert inject_lines(b"last", 3) == 1
            return 0
    """, "input", refused_messages=refused_messages)
    assert sb.run_input(None) == (0, None)
    payloads = [peek.payload_of(hmsg.encode(m)) for m in host.messages()]
    if refused_messages == "drop":  # the failed call queued nothing (upstream's way): the messages above
        assert payloads == [b"a", b"", b"b", b"c", b"last"]
        assert [m.type for m in host.messages()] == ["t"] * 4 + [None]
    else:  # the host kept the long line and queued the others, with the checkpoint, before the error
        assert payloads == [b"a", b"", b"b", b"c", b"not yet", b"a", b"", b"b", b"c", b"last"]
        [(reason, message, offset, next_offset)] = host.refusals
        assert message == {"Payload": long_line.encode()} and (offset, next_offset) == (None, 1)
        assert "the line at byte 5 (70000 bytes) exceeds max_message_size (65536)" in reason
    assert {m.logger for m in host.messages()} == {"input.p0"}
    assert host.checkpoints[-1] == 3


def test_input_stop_at_the_sync_point(tmp_path: Path) -> None:
    sb, host = py_sandbox(tmp_path, """
        def process_message(cp):
            n = 0
            while True:
                n += 1
                inject_message(None, n)
    """, "input", FakeHost(running=False))
    assert sb.run_input(None) == (0, None)
    assert host.checkpoints == [1]


def test_analysis_read_message_payload_and_limits(tmp_path: Path) -> None:
    sb, host = py_sandbox(tmp_path, """
        def process_message():
            assert read_message("Type") == "t" and read_message("Fields[s]", 0, 1) == "b"
            assert read_message("Fields[s]", 1) is None and read_message("Severity") == 7
            assert read_message("size") == len(read_message("raw"))
            try:
                read_message("Bogus")
            except ValueError as e:
                assert str(e) == "heka_read_message() field: 'Bogus' not supported/recognized"
            else:
                raise AssertionError
            inject_message({"Type": "x"})
            return 0

        def timer_event(ns, shutdown):
            add_to_payload(1, " ", 1.5, " ", 3e10, " ", True, " ", None)
            inject_payload("txt", "name", "!")
    """)
    res = sb.run_batch([raw_message(Type="t", Fields={"s": ["a", "b"]})], 0)
    assert res.status == "terminate" and res.error.endswith("inject_message() failed: injection limit exceeded")
    sb.run_timer(0, False, 10)
    (m,) = host.messages()
    assert m.type == "inject_payload" and m.payload == "1 1.5 30000000000 true nil!"
    assert (m.field_value("payload_type"), m.field_value("payload_name")) == ("txt", "name")


OUTPUT_RC = """
    def process_message(seq):
        rc = int(read_message("Payload"))
        if rc == -5:
            update_checkpoint(seq, 2)
        if rc == 9:
            update_checkpoint()
            return -4
        return (rc, "failed") if rc == -1 else rc

    def timer_event(ns, shutdown):
        update_checkpoint()
"""


@pytest.mark.parametrize(("codes", "status", "processed", "commit", "failures", "batching"), OUTPUT_RETURN_CODE_CASES)
def test_output_return_codes(tmp_path: Path, codes: list[int], status: str, processed: int, commit: int,
                             failures: int, batching: bool) -> None:
    sb, host = py_sandbox(tmp_path, OUTPUT_RC, "output")
    res = sb.run_batch([raw_message(Payload=str(c)) for c in codes])
    assert (res.status, res.processed, res.commit_index, res.failures, res.batching) == (
        status, processed, commit, failures, batching)
    if -1 in codes:
        assert (4, "received: -1 msg: failed") in host.logs


def test_output_async_acks_and_batch_commit_from_timer(tmp_path: Path) -> None:
    sb, _ = py_sandbox(tmp_path, OUTPUT_RC, "output")
    res = sb.run_batch([raw_message(Payload="-5")])
    assert (res.status, res.error) == ("terminate", "cannot use async checkpointing without a configured buffer")
    sb, host = py_sandbox(tmp_path, OUTPUT_RC, "output", async_buffer_size=4)
    res = sb.run_batch([raw_message(Payload="-5"), raw_message(Payload="-5")])
    assert (res.commit_index, res.failures) == (0, 4) and sb.take_acks() == [1, 2]
    assert sb.run_batch([raw_message(Payload="-4")]).batching
    sb.run_timer(0, False)
    assert host.commits == 1


def test_output_encode_matcher_and_input_injection(tmp_path: Path) -> None:
    sb, host = py_sandbox(tmp_path, """
        m = create_message_matcher("Type == 'a'")
        def process_message(seq):
            framed = encode_message({"Type": "e"}, True)
            assert framed[0] == 0x1E
            inject_message({"Type": "back"})
            return 0 if m.eval() else -2
    """, "output")
    assert sb.run_batch([raw_message(Type="a"), raw_message(Type="b")]).commit_index == 2
    assert [hmsg.decode(r).type for r in host.input_injected] == ["back", "back"]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("raise ValueError('boom')", "process_message() ValueError: boom"),
        ("return 'x'", "process_message() must return a numeric status code"),
        ("return 0, 1", "process_message() must return a nil or string error message"),
    ],
)
def test_failures_terminate(tmp_path: Path, body: str, error: str) -> None:
    sb, _ = py_sandbox(tmp_path, f"def process_message():\n    {body}\n")
    res = sb.run_batch([raw_message()])
    assert (res.status, res.error) == ("terminate", error)
    with pytest.raises(PluginError, match=r"^timer_event\(\) function was not found$"):
        sb.run_timer(0, True)


def test_missing_process_message(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match=r"^process_message\(\) function was not found$"):
        py_sandbox(tmp_path, "x = 1\n")


def test_preserve_data(tmp_path: Path) -> None:
    source = """
        total = 0
        def process_message():
            global total
            total += 1
            return 0
        def save_state():
            return {"total": total}
        def restore_state(value):
            global total
            total = value["total"]
    """
    sb, _ = py_sandbox(tmp_path, source, preserve_data=True)
    sb.run_batch([raw_message()] * 3)
    sb.save_state()
    state = tmp_path / "analysis.p0.data"
    assert state.read_text() == '{"total": 3}'
    state.rename(tmp_path / "analysis.p1.data")
    sb, _ = py_sandbox(tmp_path, source, preserve_data=True)
    assert sb._module.total == 3


def test_a_helper_thread_logs_as_the_plugin_that_started_it(tmp_path: Path) -> None:
    """Two Python plugins in one analysis process: a thread plugin A started logs while plugin B
    runs. Bound with bind() it is charged to A; unbound it has no plugin (never B's)."""
    sb_a, host_a = py_sandbox(tmp_path, """
        import threading
        go, done, errors = threading.Event(), threading.Semaphore(0), []

        def work():
            go.wait(5)
            log(6, "from a helper of A")
            done.release()

        def unbound():
            go.wait(5)
            try:
                log(6, "unbound")
            except RuntimeError as e:
                errors.append(str(e))
            done.release()

        def process_message():
            threading.Thread(target=bind(work)).start()
            threading.Thread(target=unbound).start()
            return 0
    """)
    sb_b, host_b = py_sandbox(tmp_path, """
        def process_message():
            other.go.set()  # A's helpers log now, while B is being called
            assert other.done.acquire(timeout=5) and other.done.acquire(timeout=5)
            log(6, "from B")
            return 0
    """)
    sb_b._module.other = sb_a._module
    assert sb_a.run_batch([raw_message()], -1).status == "ok"
    assert sb_b.run_batch([raw_message()], -1).status == "ok"
    assert (6, "from a helper of A") in host_a.logs and (6, "from B") in host_b.logs
    assert not any("helper" in text or "unbound" in text for _, text in host_b.logs)
    assert len(sb_a._module.errors) == 1 and "running plugin" in sb_a._module.errors[0]
