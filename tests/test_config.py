import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from upstream_files import HINDSIGHT, read_text

from hindsight_py._lupa import LuaRuntime
from hindsight_py.config import (
    ConfigError,
    HindsightConfig,
    discover_plugin_configs,
    load_hindsight_config,
    load_plugin_config,
    previous_analysis_thread,
    write_runtime_cfg,
)

BASE_CFG = """\
output_path        = "output"
sandbox_run_path   = "run"
analysis_lua_path  = "alua/?.lua"
analysis_lua_cpath = "alua/?.so"
io_lua_path        = "iolua/?.lua"
io_lua_cpath       = "iolua/?.so"
"""


def defaults(input: str = "{}", analysis: str = "{}", output: str = "{}") -> str:
    return f"input_defaults = {input}\nanalysis_defaults = {analysis}\noutput_defaults = {output}\n"


EMPTY_DEFAULTS = defaults()


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hindsight working directory; relative cfg paths resolve against it, as in production."""
    monkeypatch.chdir(tmp_path)
    for sub in ("input", "analysis", "output"):
        (tmp_path / "run" / sub).mkdir(parents=True)
    return tmp_path


def write_hs(root: Path, body: str, name: str = "hindsight.cfg") -> str:
    (root / name).write_text(body)
    return name


def load_hs(root: Path, extra: str = "", tables: str = EMPTY_DEFAULTS) -> HindsightConfig:
    return load_hindsight_config(write_hs(root, BASE_CFG + tables + extra))


def hs_error(root: Path, body: str) -> ConfigError:
    write_hs(root, body)
    with pytest.raises(ConfigError) as info:
        load_hindsight_config("hindsight.cfg")
    return info.value


def write_plugin(root: Path, plugin_type: str, name: str, body: str, source: str | None = "x.lua") -> str:
    directory = root / "run" / plugin_type
    (directory / f"{name}.cfg").write_text(body)
    if source:
        (directory / source).write_text("")
    return f"run/{plugin_type}/{name}.cfg"


def bare_eval(text: str) -> dict[str, Any]:
    """Evaluate `text` the way the sandbox evaluates a .rtc: a fresh state with an empty global table."""
    lua = LuaRuntime(register_eval=False)
    run = lua.eval(
        "function(text) local f = assert(loadstring(text)); local env = {}; setfenv(f, env); f(); return env end"
    )
    return {k: to_py(v) for k, v in run(text).items()}


def to_py(v: Any) -> Any:
    if hasattr(v, "items"):
        d = {k: to_py(x) for k, x in v.items()}
        if d and set(d) == set(range(1, len(d) + 1)):
            return [d[i] for i in range(1, len(d) + 1)]
        return d
    return v


# --------------------------------------------------------------------------- hindsight.cfg


def test_minimal_config_gets_upstream_defaults(root: Path) -> None:
    hs = load_hs(root)
    assert hs.output_path == "output"
    assert hs.output_size == 64 * 1024 * 1024
    assert hs.sandbox_load_path == ""
    assert hs.sandbox_install_path == "/usr/share/luasandbox/sandboxes/heka"
    assert hs.analysis_threads == 1
    assert hs.analysis_utilization_limit == 95
    assert hs.max_message_size == 64 * 1024
    assert (hs.backpressure, hs.backpressure_disk_free) == (0, 4)
    assert hs.hostname and len(hs.hostname.encode()) <= 64
    assert hs.input_defaults == {
        "output_limit": 65536,
        "memory_limit": 8388608,
        "instruction_limit": 1000000,
        "ticker_interval": 0,
        "preserve_data": False,
        "restricted_headers": False,
        "shutdown_on_terminate": False,
        "refused_messages": "dead_letter",  # hindsight-py's
    }
    assert hs.analysis_defaults["restricted_headers"] is True
    assert hs.analysis_defaults["process_message_inject_limit"] == 0
    assert hs.analysis_defaults["timer_event_inject_limit"] == 10
    assert hs.output_defaults["restricted_headers"] is False
    assert hs.output_defaults["read_queue"] == "both"
    assert hs.output_defaults["remove_checkpoints_on_terminate"] is False
    assert hs.path == Path("hindsight.cfg")
    assert hs.base_dir == root
    assert hs.output_dir == root / "output"
    assert hs.run_dir == root / "run"


def test_lua_expressions_locals_and_earlier_globals(root: Path) -> None:
    hs = load_hs(
        root,
        """
local base = "/opt/lua"
analysis_lua_path = base .. "/?.lua"
io_lua_path = analysis_lua_path .. ";" .. base .. "/io/?.lua"
output_size = 8 * 1024 * 1024
max_message_size = 1e6
backpressure = 10.9  -- fractions truncate
hostname = 42        -- numbers coerce to strings
""",
    )
    assert hs.analysis_lua_path == "/opt/lua/?.lua"
    assert hs.io_lua_path == "/opt/lua/?.lua;/opt/lua/io/?.lua"
    assert hs.output_size == 8388608
    assert hs.max_message_size == 1000000
    assert hs.backpressure == 10
    assert hs.hostname == "42"


def test_defaults_tables(root: Path) -> None:
    hs = load_hs(
        root,
        tables="""
input_defaults = { output_limit = 1024, preserve_data = true, ticker_interval = 5 }
analysis_defaults = { restricted_headers = false, process_message_inject_limit = 3, timer_event_inject_limit = 0 }
output_defaults = { read_queue = "analysis", remove_checkpoints_on_terminate = true, shutdown_on_terminate = true }
""",
    )
    assert hs.input_defaults["output_limit"] == 1024
    assert hs.input_defaults["preserve_data"] is True
    assert hs.input_defaults["ticker_interval"] == 5
    assert hs.input_defaults["memory_limit"] == 8388608
    assert hs.analysis_defaults["restricted_headers"] is False
    assert hs.analysis_defaults["process_message_inject_limit"] == 3
    assert hs.analysis_defaults["timer_event_inject_limit"] == 0
    assert hs.output_defaults["read_queue"] == "analysis"
    assert hs.output_defaults["remove_checkpoints_on_terminate"] is True
    assert hs.output_defaults["shutdown_on_terminate"] is True


def test_syntax_error_names_file_and_line(root: Path) -> None:
    err = hs_error(root, BASE_CFG + EMPTY_DEFAULTS + "output_size = = 3\n")
    assert str(err) == "loading hindsight.cfg failed: hindsight.cfg:10: unexpected symbol near '='"
    assert "\n" not in str(err)
    assert err.file == "hindsight.cfg"


def test_long_paths_are_not_shortened_in_messages(root: Path) -> None:
    deep = root / ("d" * 80)
    deep.mkdir()
    (deep / "hindsight.cfg").write_text("x = = 1\n")
    with pytest.raises(ConfigError) as info:
        load_hindsight_config(deep / "hindsight.cfg")
    assert str(info.value) == f"loading {deep}/hindsight.cfg failed: {deep}/hindsight.cfg:1: unexpected symbol near '='"


def test_runtime_error_and_bare_state(root: Path) -> None:
    err = hs_error(root, BASE_CFG + EMPTY_DEFAULTS + "hostname = string.format('%s', 'x')\n")
    assert str(err) == "loading hindsight.cfg failed: hindsight.cfg:10: attempt to index global 'string' (a nil value)"
    for expr in ("print", "_G", "os", "tostring", "require"):
        err = hs_error(root, BASE_CFG + EMPTY_DEFAULTS + f"hostname = {expr}(1)\n")
        assert f"attempt to call global '{expr}' (a nil value)" in str(err)
    # No string metatable either: methods on strings are unavailable, as in Hindsight's bare state.
    err = hs_error(root, BASE_CFG + EMPTY_DEFAULTS + "hostname = ('x'):upper()\n")
    assert "attempt to index a string value" in str(err)


def test_infinite_loop_is_an_error_not_a_hang(root: Path) -> None:
    err = hs_error(root, BASE_CFG + EMPTY_DEFAULTS + "while true do end\n")
    assert str(err) == "loading hindsight.cfg failed: hindsight.cfg:10: instruction limit exceeded"


def test_memory_bomb_is_an_error(root: Path) -> None:
    err = hs_error(root, BASE_CFG + EMPTY_DEFAULTS + "s = 'x' for i = 1, 40 do s = s .. s end\n")
    assert "not enough memory" in str(err)


def test_missing_file(root: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_hindsight_config("nope.cfg")
    assert str(info.value) == "loading nope.cfg failed: cannot open nope.cfg: No such file or directory"


def test_unknown_global(root: Path) -> None:
    err = hs_error(root, BASE_CFG + EMPTY_DEFAULTS + "extra = true\n")
    assert str(err) == "loading hindsight.cfg failed: invalid option: 'extra'"
    assert err.key == "extra"


def test_unknown_key_in_defaults(root: Path) -> None:
    err = hs_error(root, BASE_CFG + "input_defaults = {foo = 1}\nanalysis_defaults = {}\noutput_defaults = {}\n")
    assert str(err) == "loading hindsight.cfg failed: invalid option: 'input_defaults.foo'"
    assert err.key == "input_defaults.foo"


def test_non_string_key_in_defaults(root: Path) -> None:
    err = hs_error(root, BASE_CFG + "input_defaults = {}\nanalysis_defaults = {1}\noutput_defaults = {}\n")
    assert str(err) == "loading hindsight.cfg failed: non string key in 'analysis_defaults'"


@pytest.mark.parametrize("key", ["message_matcher", "thread", "filename", "async_buffer_size"])
@pytest.mark.parametrize("table", ["input_defaults", "analysis_defaults", "output_defaults"])
def test_per_plugin_keys_are_not_defaults(root: Path, key: str, table: str) -> None:
    tables = {t: "{}" for t in ("input_defaults", "analysis_defaults", "output_defaults")}
    tables[table] = f"{{ {key} = '1' }}"
    err = hs_error(root, BASE_CFG + "".join(f"{t} = {v}\n" for t, v in tables.items()))
    assert str(err) == f"loading hindsight.cfg failed: invalid option: '{table}.{key}'"


@pytest.mark.parametrize(
    ("table", "key"),
    [("analysis_defaults", "read_queue"), ("input_defaults", "read_queue"), ("output_defaults", "thread")],
)
def test_type_specific_default_keys(root: Path, table: str, key: str) -> None:
    tables = {t: "{}" for t in ("input_defaults", "analysis_defaults", "output_defaults")}
    tables[table] = f"{{ {key} = 'both' }}"
    err = hs_error(root, BASE_CFG + "".join(f"{t} = {v}\n" for t, v in tables.items()))
    assert str(err) == f"loading hindsight.cfg failed: invalid option: '{table}.{key}'"


@pytest.mark.parametrize(
    ("line", "key", "reason"),
    [
        ("output_size = 'big'", "output_size", "output_size must be set to a number"),
        ("output_size = -1", "output_size", "output_size must be an unsigned int"),
        ("output_size = 2^32", "output_size", "output_size must be an unsigned int"),
        ("output_size = 0/0", "output_size", "output_size must be an unsigned int"),
        ("backpressure = true", "backpressure", "backpressure must be set to a number"),
        ("backpressure_disk_free = {}", "backpressure_disk_free", "backpressure_disk_free must be set to a number"),
        ("max_message_size = 1023", "max_message_size", "max_message_size must be > 1023"),
        ("max_message_size = '2000'", "max_message_size", "max_message_size must be set to a number"),
        ("analysis_threads = 0", "analysis_threads", "analysis_threads must be 1-64"),
        ("analysis_threads = 65", "analysis_threads", "analysis_threads must be 1-64"),
        ("analysis_threads = 256", "analysis_threads", "analysis_threads must be a uint8_t"),
        ("analysis_utilization_limit = 101", "analysis_utilization_limit", "analysis_utilization_limit must be 0-100"),
        ("output_path = true", "output_path", "output_path must be set to a string"),
        ("sandbox_load_path = false", "sandbox_load_path", "sandbox_load_path must be set to a string"),
        ("hostname = {}", "hostname", "hostname must be set to a string"),
    ],
)
def test_wrong_types_and_ranges(root: Path, line: str, key: str, reason: str) -> None:
    err = hs_error(root, BASE_CFG + EMPTY_DEFAULTS + line + "\n")
    assert str(err) == f"loading hindsight.cfg failed: {reason}"
    assert err.key == key
    assert err.reason == reason


@pytest.mark.parametrize(
    ("line", "key", "reason"),
    [
        ("input_defaults = {preserve_data = 1}", "input_defaults.preserve_data", "preserve_data must be set to a bool"),
        # Upstream would say "preserve_data must be set to a bool" for these: we name the real key.
        (
            "analysis_defaults = {restricted_headers = 'yes'}",
            "analysis_defaults.restricted_headers",
            "restricted_headers must be set to a bool",
        ),
        (
            "output_defaults = {remove_checkpoints_on_terminate = 0}",
            "output_defaults.remove_checkpoints_on_terminate",
            "remove_checkpoints_on_terminate must be set to a bool",
        ),
        (
            "output_defaults = {read_queue = 'neither'}",
            "output_defaults.read_queue",
            "read_queue invalid option neither",
        ),
        ("output_defaults = {read_queue = 1}", "output_defaults.read_queue", "read_queue must be set to a string"),
        (
            "analysis_defaults = {refused_messages = 'lose'}",
            "analysis_defaults.refused_messages",
            'analysis_defaults.refused_messages must be "dead_letter" or "drop", not "lose"',
        ),
        (
            "input_defaults = {memory_limit = -5}",
            "input_defaults.memory_limit",
            "memory_limit must be an unsigned int",
        ),
        ("analysis_defaults = 7", "analysis_defaults", "analysis_defaults must be a table"),
        (
            "input_defaults = {output_limit = 64 * 1024 + 1}",
            "max_message_size",
            "max_message_size must be greater than or equal to the sandbox output_limit",
        ),
    ],
)
def test_defaults_errors(root: Path, line: str, key: str, reason: str) -> None:
    tables = {t: f"{t} = {{}}" for t in ("input_defaults", "analysis_defaults", "output_defaults")}
    tables[line.split(" ", 1)[0]] = line
    err = hs_error(root, BASE_CFG + "\n".join(tables.values()) + "\n")
    assert str(err) == f"loading hindsight.cfg failed: {reason}"
    assert err.key == key


@pytest.mark.parametrize(
    "key", ["output_path", "sandbox_run_path", "io_lua_path", "io_lua_cpath", "analysis_lua_path", "analysis_lua_cpath"]
)
def test_required_strings(root: Path, key: str) -> None:
    body = "".join(line + "\n" for line in BASE_CFG.splitlines() if not line.startswith(key + " "))
    err = hs_error(root, body + EMPTY_DEFAULTS)
    assert str(err) == f"loading hindsight.cfg failed: {key} must be set to a string"
    assert err.key == key


@pytest.mark.parametrize("table", ["input_defaults", "analysis_defaults", "output_defaults"])
def test_required_defaults_tables(root: Path, table: str) -> None:
    body = "".join(line + "\n" for line in EMPTY_DEFAULTS.splitlines() if not line.startswith(table))
    err = hs_error(root, BASE_CFG + body)
    assert str(err) == f"loading hindsight.cfg failed: {table} must be a table"


def test_missing_run_subdir(root: Path) -> None:
    (root / "run" / "analysis").rmdir()
    err = hs_error(root, BASE_CFG + EMPTY_DEFAULTS)
    assert str(err) == "loading hindsight.cfg failed: sandbox_run_path: run/analysis: directory does not exist"
    assert err.key == "sandbox_run_path"


def test_load_path_subdirs_must_exist_when_set(root: Path) -> None:
    (root / "load" / "input").mkdir(parents=True)
    (root / "load" / "analysis").mkdir()
    err = hs_error(root, BASE_CFG + EMPTY_DEFAULTS + "sandbox_load_path = 'load'\n")
    assert str(err) == "loading hindsight.cfg failed: sandbox_load_path: load/output: directory does not exist"
    assert err.key == "sandbox_load_path"
    (root / "load" / "output").mkdir()
    load_hindsight_config("hindsight.cfg")  # accepted now that the directory exists


def test_hostname_is_truncated_with_a_warning(root: Path) -> None:
    hs = load_hs(root, "hostname = '" + "h" * 70 + "'\n")
    assert hs.hostname == "h" * 64
    assert hs.warnings == ("the configured hostname was truncated to: " + "h" * 64,)


def test_config_pickles(root: Path) -> None:
    hs = load_hs(root)
    assert pickle.loads(pickle.dumps(hs)) == hs


@pytest.mark.upstream
def test_stock_upstream_hindsight_cfg_loads(root: Path) -> None:
    for sub in ("input", "analysis", "output"):
        (root / "load" / sub).mkdir(parents=True)
    hs = load_hindsight_config(write_hs(root, read_text(HINDSIGHT, "hindsight.cfg")))
    assert hs.output_path == "output"
    assert hs.sandbox_load_path == "load"
    assert hs.io_lua_path == "/usr/lib/luasandbox/modules/?.lua;/usr/lib/luasandbox/io_modules/?.lua"
    assert hs.io_lua_cpath == "/usr/lib/luasandbox/modules/?.so;/usr/lib/luasandbox/io_modules/?.so"
    assert hs.output_size == 64 * 1024 * 1024
    assert hs.max_message_size == 64 * 1024


@pytest.mark.upstream
def test_upstream_unit_test_cfgs(root: Path) -> None:
    for sub in ("input", "analysis", "output"):
        (root / "load" / sub).mkdir(parents=True)
    hs = load_hindsight_config(write_hs(root, read_text(HINDSIGHT, "src/test/cfg/valid.cfg")))
    assert (hs.output_size, hs.backpressure) == (1024, 10)
    assert hs.input_defaults["output_limit"] == 1023
    assert hs.input_defaults["memory_limit"] == 32767
    assert hs.input_defaults["instruction_limit"] == 1000
    assert hs.input_defaults["preserve_data"] is True
    assert hs.output_defaults["remove_checkpoints_on_terminate"] is True
    hs = load_hindsight_config(write_hs(root, read_text(HINDSIGHT, "src/test/cfg/default.cfg")))
    assert hs.output_path == "output_path"
    assert hs.input_defaults["instruction_limit"] == 1000000
    for name, reason in [
        ("extra", "invalid option: 'extra'"),
        ("output_too_large", "max_message_size must be greater than or equal to the sandbox output_limit"),
    ]:
        write_hs(root, read_text(HINDSIGHT, f"src/test/cfg/{name}.cfg"), f"{name}.cfg")
        with pytest.raises(ConfigError) as info:
            load_hindsight_config(f"{name}.cfg")
        assert info.value.reason == reason


# --------------------------------------------------------------------------- plugin cfgs


def test_input_plugin_merges_defaults(root: Path) -> None:
    hs = load_hs(root, tables=defaults(input="{memory_limit = 1000, preserve_data = true}"))
    cfg = write_plugin(root, "input", "file", 'filename = "x.lua"\ninstruction_limit = 5\nticker_interval = 60\n')
    p = load_plugin_config(cfg, "input", hs, pid=77)
    assert p.name == "input.file"
    assert p.type == "input"
    assert p.cfg_path == root / "run" / "input" / "file.cfg"
    assert p.filename == "x.lua"
    assert p.source_path == root / "run" / "input" / "x.lua"
    assert p.language == "lua"
    assert p.memory_limit == 1000  # from input_defaults
    assert p.instruction_limit == 5  # from the plugin cfg
    assert p.output_limit == 65536  # built in
    assert p.ticker_interval == 60
    assert p.preserve_data is True
    assert p.restricted_headers is False
    assert p.shutdown_on_terminate is False
    assert p.message_matcher is None
    assert p.thread is None
    assert p.values == {"filename": "x.lua", "instruction_limit": 5, "ticker_interval": 60}
    assert p.warnings == []


def test_plugin_values_conversion_and_dropped_functions(root: Path) -> None:
    hs = load_hs(root)
    cfg = write_plugin(
        root,
        "input",
        "conv",
        """
filename = "x.lua"
array = {"string", 99, false, true}
hash = { string = "string", number = 99.5, ["false"] = false, [7] = "seven" }
nested = { array = {1, {2, 3}}, empty = {}, fn = function() end }
callback = function() return 1 end
""",
    )
    p = load_plugin_config(cfg, "input", hs)
    assert p.values == {
        "filename": "x.lua",
        "array": ["string", 99, False, True],
        "hash": {"string": "string", "number": 99.5, "false": False, 7: "seven"},
        "nested": {"array": [1, [2, 3]], "empty": {}},
    }
    assert sorted(p.warnings) == [
        "callback: dropped a function value (only strings, numbers, booleans and tables are kept)",
        "nested.fn: dropped a function value (only strings, numbers, booleans and tables are kept)",
    ]


def test_plugin_wrong_type_names_file_and_key(root: Path) -> None:
    hs = load_hs(root)
    cfg = write_plugin(root, "input", "file", 'filename = "x.lua"\ninstruction_limit = "lots"\n')
    with pytest.raises(ConfigError) as info:
        load_plugin_config(cfg, "input", hs)
    assert str(info.value) == "loading run/input/file.cfg failed: instruction_limit must be set to a number"
    assert info.value.key == "instruction_limit"
    assert info.value.file == "run/input/file.cfg"


def test_refused_messages_per_plugin_over_the_type_default(root: Path) -> None:
    hs = load_hs(root, tables=defaults(input='{refused_messages = "drop"}'))
    assert hs.input_defaults["refused_messages"] == "drop" and hs.output_defaults["refused_messages"] == "dead_letter"
    drop = load_plugin_config(write_plugin(root, "input", "a", 'filename = "x.lua"\n'), "input", hs)
    keep = load_plugin_config(write_plugin(root, "input", "b", 'filename = "x.lua"\nrefused_messages = "dead_letter"\n'),
                              "input", hs)
    assert (drop.refused_messages, keep.refused_messages) == ("drop", "dead_letter")


@pytest.mark.parametrize(
    ("body", "key", "reason"),
    [
        ("output_limit = -1", "output_limit", "output_limit must be an unsigned int"),
        ("memory_limit = 2^32", "memory_limit", "memory_limit must be an unsigned int"),
        ("ticker_interval = {}", "ticker_interval", "ticker_interval must be set to a number"),
        ("preserve_data = 'true'", "preserve_data", "preserve_data must be set to a bool"),
        # Upstream reports "preserve_data must be set to a bool" for these two.
        ("restricted_headers = 1", "restricted_headers", "restricted_headers must be set to a bool"),
        ("shutdown_on_terminate = 'no'", "shutdown_on_terminate", "shutdown_on_terminate must be set to a bool"),
        ("refused_messages = 'keep'", "refused_messages", 'refused_messages must be "dead_letter" or "drop", not "keep"'),
        ("refused_messages = false", "refused_messages", 'refused_messages must be "dead_letter" or "drop", not a boolean'),
    ],
)
def test_plugin_type_errors(root: Path, body: str, key: str, reason: str) -> None:
    hs = load_hs(root)
    cfg = write_plugin(root, "input", "p", f'filename = "x.lua"\n{body}\n')
    with pytest.raises(ConfigError) as info:
        load_plugin_config(cfg, "input", hs)
    assert str(info.value) == f"loading {cfg} failed: {reason}"
    assert info.value.key == key


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("", "filename must be set to a string"),
        ("filename = true", "filename must be set to a string"),
        ('filename = "/tmp/x.lua"', "filename must not contain a path component"),
        ('filename = "sub\\\\x.lua"', "filename must not contain a path component"),
        ('filename = "x.foo"', "filename must have a .lua or .py extension: x.foo"),
        ('filename = ".lua"', "filename must have a .lua or .py extension: .lua"),
        ('filename = "nope.lua"', "input.p failed to find the specified filename: nope.lua"),
    ],
)
def test_plugin_filename_errors(root: Path, body: str, reason: str) -> None:
    hs = load_hs(root)
    cfg = write_plugin(root, "input", "p", body + "\n")
    with pytest.raises(ConfigError) as info:
        load_plugin_config(cfg, "input", hs)
    assert str(info.value) == f"loading {cfg} failed: {reason}"
    assert info.value.key == "filename"


def test_plugin_syntax_error(root: Path) -> None:
    hs = load_hs(root)
    cfg = write_plugin(root, "input", "p", 'filename = "x.lua"\nfoo = {\n')
    with pytest.raises(ConfigError) as info:
        load_plugin_config(cfg, "input", hs)
    assert str(info.value) == "loading run/input/p.cfg failed: run/input/p.cfg:3: unexpected symbol near '<eof>'"


def test_plugin_cfg_ending_in_return_is_rejected(root: Path) -> None:
    hs = load_hs(root)
    cfg = write_plugin(root, "input", "p", 'filename = "x.lua"\nreturn\n')
    with pytest.raises(ConfigError) as info:
        load_plugin_config(cfg, "input", hs)
    assert "the runtime cfg does not compile" in str(info.value)
    assert str(info.value).startswith("loading run/input/p.cfg failed: ")


def test_source_lookup_order(root: Path) -> None:
    install = root / "install"
    (install / "output").mkdir(parents=True)
    hs = load_hs(root, f"sandbox_install_path = '{install}'\n")
    (install / "output" / "both.lua").write_text("")
    (install / "output" / "installed.lua").write_text("")
    (root / "run" / "output" / "both.lua").write_text("")
    here = write_plugin(root, "output", "a", 'filename = "both.lua"\nmessage_matcher = "TRUE"\n', None)
    there = write_plugin(root, "output", "b", 'filename = "installed.lua"\nmessage_matcher = "TRUE"\n', None)
    assert load_plugin_config(here, "output", hs).source_path == root / "run" / "output" / "both.lua"
    assert load_plugin_config(there, "output", hs).source_path == install / "output" / "installed.lua"


def test_bundled_plugins_are_found(root: Path) -> None:
    import hindsight_py.config as config

    bundled = config._bundled_plugins_dir()
    assert (bundled / "__init__.py").is_file()
    hs = load_hs(root)
    probe = bundled / "_test_probe_plugin.py"
    probe.write_text("")
    try:
        cfg = write_plugin(root, "input", "py", 'filename = "_test_probe_plugin.py"\n', None)
        p = load_plugin_config(cfg, "input", hs)
    finally:
        probe.unlink()
    assert p.source_path == probe
    assert p.language == "python"


def test_python_plugin(root: Path) -> None:
    hs = load_hs(root)
    cfg = write_plugin(root, "input", "py", 'filename = "reader.py"\n', "reader.py")
    p = load_plugin_config(cfg, "input", hs)
    assert p.language == "python"
    assert p.source_path == root / "run" / "input" / "reader.py"


def test_analysis_plugin(root: Path) -> None:
    hs = load_hs(root, "analysis_threads = 2\n")
    cfg = write_plugin(
        root,
        "analysis",
        "counter",
        """filename = "x.lua"
message_matcher = "Type == 'foo'"
thread = 3
process_message_inject_limit = 2
""",
    )
    p = load_plugin_config(cfg, "analysis", hs)
    assert p.name == "analysis.counter"
    assert p.message_matcher == "Type == 'foo'"
    assert p.thread == 3
    assert p.thread_id == 1  # 3 % analysis_threads
    assert p.process_message_inject_limit == 2
    assert p.timer_event_inject_limit == 10
    assert p.restricted_headers is True


def test_output_plugin(root: Path) -> None:
    hs = load_hs(root, tables=defaults(output="{read_queue = 'analysis'}"))
    cfg = write_plugin(
        root,
        "output",
        "es",
        """filename = "x.lua"
message_matcher = "TRUE"
async_buffer_size = 999
remove_checkpoints_on_terminate = true
""",
    )
    p = load_plugin_config(cfg, "output", hs)
    assert p.async_buffer_size == 999
    assert p.remove_checkpoints_on_terminate is True
    assert p.read_queue == "analysis"  # from output_defaults
    cfg = write_plugin(root, "output", "es2", 'filename = "x.lua"\nmessage_matcher = "TRUE"\nread_queue = "input"\n')
    assert load_plugin_config(cfg, "output", hs).read_queue == "input"


@pytest.mark.parametrize(
    ("plugin_type", "body", "key", "reason"),
    [
        ("analysis", "", "message_matcher", "message_matcher must be set to a string"),
        ("output", "message_matcher = false", "message_matcher", "message_matcher must be set to a string"),
        ("analysis", "message_matcher = 'TRUE'\nthread = 'one'", "thread", "thread must be set to a number"),
        (
            "analysis",
            "message_matcher = 'TRUE'\ntimer_event_inject_limit = -1",
            "timer_event_inject_limit",
            "timer_event_inject_limit must be an unsigned int",
        ),
        ("output", "message_matcher = 'TRUE'\nread_queue = 'all'", "read_queue", "read_queue invalid option all"),
        (
            "output",
            "message_matcher = 'TRUE'\nasync_buffer_size = 'x'",
            "async_buffer_size",
            "async_buffer_size must be set to a number",
        ),
        (
            "output",
            "message_matcher = 'TRUE'\nremove_checkpoints_on_terminate = 1",
            "remove_checkpoints_on_terminate",
            "remove_checkpoints_on_terminate must be set to a bool",
        ),
    ],
)
def test_analysis_and_output_errors(root: Path, plugin_type: str, body: str, key: str, reason: str) -> None:
    hs = load_hs(root)
    cfg = write_plugin(root, plugin_type, "p", f'filename = "x.lua"\n{body}\n')
    with pytest.raises(ConfigError) as info:
        load_plugin_config(cfg, plugin_type, hs)
    assert str(info.value) == f"loading {cfg} failed: {reason}"
    assert info.value.key == key


def test_bad_matcher_names_key_and_expression(root: Path) -> None:
    hs = load_hs(root)
    cfg = write_plugin(root, "analysis", "p", 'filename = "x.lua"\nmessage_matcher = "Type =="\n')
    with pytest.raises(ConfigError) as info:
        load_plugin_config(cfg, "analysis", hs)
    assert info.value.key == "message_matcher"
    assert str(info.value).startswith("loading run/analysis/p.cfg failed: invalid message_matcher: Type == (expected")
    assert "\n" not in str(info.value)


def test_input_keys_of_other_types_are_user_config(root: Path) -> None:
    hs = load_hs(root)
    cfg = write_plugin(root, "input", "p", 'filename = "x.lua"\nmessage_matcher = 5\nthread = "x"\nread_queue = 1\n')
    p = load_plugin_config(cfg, "input", hs)
    assert p.message_matcher is None and p.thread is None and p.read_queue == "both"
    assert p.values["thread"] == "x"


def test_plugin_config_pickles(root: Path) -> None:
    hs = load_hs(root)
    p = load_plugin_config(write_plugin(root, "input", "p", 'filename = "x.lua"\nt = {1, {a = 2}}\n'), "input", hs)
    assert pickle.loads(pickle.dumps(p)) == p


def test_unknown_plugin_type(root: Path) -> None:
    hs = load_hs(root)
    with pytest.raises(ValueError):
        load_plugin_config(write_plugin(root, "input", "p", 'filename = "x.lua"\n'), "inputs", hs)


# --------------------------------------------------------------------------- runtime cfg


def test_input_runtime_cfg_reevaluates(root: Path) -> None:
    hs = load_hs(
        root,
        'hostname = "host]]name"\nio_lua_path = "a]=]b[[c]==]d"\nio_lua_cpath = "\\nlead]"\n'
        'sandbox_install_path = "x]"\n',
        tables=defaults(input="{output_limit = 1024, shutdown_on_terminate = true}"),
    )
    cfg = write_plugin(
        root,
        "input",
        "file",
        'filename = "x.lua"\nfoo = {bar = "baz", list = {1, 2}}\ncrlf = "a\\r\\nb"\n'
        'output_path = "ignored"  -- appended values win\n',
    )
    p = load_plugin_config(cfg, "input", hs, log_level=7, pid=4242)
    text = p.runtime_cfg
    assert text.startswith("-- original configuration\n" + p.cfg_text + "\n-- Hindsight defaults and overrides\n")
    assert text.endswith("-- end Hindsight configuration\n")
    assert bare_eval(text) == {
        "filename": "x.lua",
        "foo": {"bar": "baz", "list": [1, 2]},
        "crlf": "a\r\nb",
        "Hostname": "host]]name",
        "Pid": 4242,
        "log_level": 7,
        "path": "a]=]b[[c]==]d",
        "cpath": "\nlead]",
        "output_path": "output",
        "output_size": 67108864,
        "max_message_size": 65536,
        "sandbox_load_path": "",
        "sandbox_run_path": "run",
        "sandbox_install_path": "x]",
        "Logger": "input.file",
        "output_limit": 1024,
        "memory_limit": 8388608,
        "instruction_limit": 1000000,
        "ticker_interval": 0,
        "preserve_data": False,
        "restricted_headers": False,
        "shutdown_on_terminate": True,
    }


def test_runtime_cfg_uses_upstream_line_format(root: Path) -> None:
    hs = load_hs(root, 'hostname = "h"\n')
    p = load_plugin_config(write_plugin(root, "input", "p", 'filename = "x.lua"'), "input", hs, pid=9)
    appended = p.runtime_cfg.split("-- Hindsight defaults and overrides\n", 1)[1]
    assert appended == (
        "Hostname = [[h]]\nPid = 9\nlog_level = 6\npath = [[iolua/?.lua]]\ncpath = [[iolua/?.so]]\n"
        "output_path = [[output]]\noutput_size = 67108864\nmax_message_size = 65536\n"
        "sandbox_load_path = [[]]\nsandbox_run_path = [[run]]\n"
        "sandbox_install_path = [[/usr/share/luasandbox/sandboxes/heka]]\n"
        "\n-- Sandbox defaults and overrides\nLogger = [[input.p]]\noutput_limit = 65536\n"
        "memory_limit = 8388608\ninstruction_limit = 1000000\nticker_interval = 0\npreserve_data = false\n"
        "restricted_headers = false\nshutdown_on_terminate = false\n-- end Hindsight configuration\n"
    )


def test_analysis_and_output_runtime_cfg(root: Path) -> None:
    hs = load_hs(root, "analysis_threads = 4\n", tables=defaults(analysis="{timer_event_inject_limit = 3}"))
    a = load_plugin_config(
        write_plugin(root, "analysis", "a", 'filename = "x.lua"\nmessage_matcher = "TRUE"\n'), "analysis", hs, pid=1
    )
    env = bare_eval(a.runtime_cfg)
    assert env["thread"] == 4294967295  # upstream's "not assigned"
    a.assigned_thread = 2
    env = bare_eval(a.runtime_cfg)
    assert (env["path"], env["cpath"]) == ("alua/?.lua", "alua/?.so")
    assert "output_path" not in env and "max_message_size" not in env
    assert env["thread"] == 2
    assert env["timer_event_inject_limit"] == 3
    assert env["process_message_inject_limit"] == 0
    assert env["restricted_headers"] is True
    assert env["message_matcher"] == "TRUE"

    o = load_plugin_config(
        write_plugin(root, "output", "o", 'filename = "x.lua"\nmessage_matcher = "TRUE"\nread_queue = "input"\n'),
        "output",
        hs,
    )
    env = bare_eval(o.runtime_cfg)
    assert env["read_queue"] == "input"
    assert env["async_buffer_size"] == 0
    assert env["remove_checkpoints_on_terminate"] is False
    assert 'read_queue = "input"\n' in o.runtime_cfg
    assert "thread" not in env


def test_write_runtime_cfg_and_previous_thread(root: Path) -> None:
    hs = load_hs(root, "analysis_threads = 4\n")
    (root / "output").mkdir()
    a = load_plugin_config(
        write_plugin(root, "analysis", "a", 'filename = "x.lua"\nmessage_matcher = "TRUE"\n'), "analysis", hs
    )
    assert previous_analysis_thread(hs, a.name) is None
    written = write_runtime_cfg(a, hs.output_path)
    assert written == Path("output/analysis.a.rtc")
    assert written.read_text() == a.runtime_cfg
    assert previous_analysis_thread(hs, a.name) is None  # written before a thread was assigned
    a.assigned_thread = 3
    write_runtime_cfg(a, hs.output_dir)
    assert previous_analysis_thread(hs, "analysis.a") == 3
    assert sorted(os.listdir(root / "output")) == ["analysis.a.rtc"]


def test_write_runtime_cfg_input(root: Path) -> None:
    hs = load_hs(root)
    (root / "output").mkdir()
    p = load_plugin_config(write_plugin(root, "input", "p", 'filename = "x.lua"\n'), "input", hs)
    path = write_runtime_cfg(p, hs.output_dir)
    assert path == root / "output" / "input.p.rtc" == p.rtc_path
    assert bare_eval(path.read_text())["Logger"] == "input.p"


# --------------------------------------------------------------------------- discovery


def test_discover_plugin_configs(root: Path) -> None:
    hs = load_hs(root)
    for rel in (
        "input/b.cfg",
        "input/a.cfg",
        "input/c.off",
        "input/d.err",
        "input/e.lua",
        "input/.cfg",
        "input/f.cfg.bak",
        "analysis/z.cfg",
        "output/m.cfg",
    ):
        (root / "run" / rel).write_text("")
    (root / "run" / "output" / "dir.cfg").mkdir()
    assert discover_plugin_configs(hs) == [
        root / "run" / "input" / "a.cfg",
        root / "run" / "input" / "b.cfg",
        root / "run" / "analysis" / "z.cfg",
        root / "run" / "output" / "m.cfg",
    ]


def test_discover_missing_run_dir(root: Path) -> None:
    hs = load_hs(root)
    (root / "run" / "output").rmdir()
    with pytest.raises(ConfigError) as info:
        discover_plugin_configs(hs)
    assert info.value.key == "sandbox_run_path"
    assert "run/output" in str(info.value)


@pytest.mark.upstream
def test_upstream_sandbox_cfgs(root: Path) -> None:
    hs = load_hs(root, "analysis_threads = 2\n")
    for name, lua in (("analysis", "analysis.lua"), ("output", "output.lua"), ("input", "input.lua")):
        write_plugin(root, name, name, read_text(HINDSIGHT, f"src/test/sandbox/{name}.cfg"), lua)
    a = load_plugin_config("run/analysis/analysis.cfg", "analysis", hs)
    assert (a.name, a.filename, a.message_matcher) == ("analysis.analysis", "analysis.lua", "TRUE")
    assert (a.output_limit, a.memory_limit, a.instruction_limit, a.ticker_interval) == (77777, 88888, 99999, 17)
    assert a.preserve_data is True and a.thread == 1
    assert a.values["nested"] == {
        "array": ["string", 99, False, True],
        "hash": {"string": "string", "number": 99, "false": False, "true": True},
    }
    assert bare_eval(a.runtime_cfg)["nested"] == a.values["nested"]
    o = load_plugin_config("run/output/output.cfg", "output", hs)
    assert (o.async_buffer_size, o.remove_checkpoints_on_terminate, o.read_queue) == (999, True, "input")
    i = load_plugin_config("run/input/input.cfg", "input", hs)
    assert (i.message_matcher, i.thread, i.async_buffer_size) == (None, None, 0)
    for name, reason in (
        ("invalid_fn_ext", "filename must have a .lua or .py extension: analysis.foo"),
        ("path_in_fn", "filename must not contain a path component"),
    ):
        write_plugin(root, "analysis", name, read_text(HINDSIGHT, f"src/test/sandbox/{name}.cfg"), None)
        with pytest.raises(ConfigError) as info:
            load_plugin_config(f"run/analysis/{name}.cfg", "analysis", hs)
        assert info.value.reason == reason


def same_typed(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (True == 1 and 1 == 1.0 do not pass)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_typed(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_typed(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (a != a and b != b)  # NaN is NaN


EVERY_KIND = (
    'filename = "x.lua"\nmessage_matcher = "TRUE"\n'
    's = "plain"\nodd = "a]]b\\r\\nc\\0d"\nutf = "h\\195\\169"\nempty = ""\n'
    "i = 42\nneg = -7\nf = 0.5\nbig = 1e300\nwhole = 3.0\nnan = 0/0\ninf = 1/0\n"
    "yes = true\nno = false\nnothing = nil\n"
    'list = {1, "two", false, {3}}\nhash = {a = 1, b = {c = "d"}}\nmixed = {1, 2, x = "y"}\nholes = {[1] = 1, [3] = 3}\n'
    'emptyt = {}\nnumkeys = {[2.5] = "f", [10] = "t"}\n'
    'output_path = "ignored"\nLogger = {"replaced"}\noutput_limit = 1024.75\n'
)


@pytest.mark.parametrize("plugin_type", ["input", "analysis", "output"])
def test_runtime_values_are_what_the_runtime_cfg_evaluates_to(root: Path, plugin_type: str) -> None:
    """A Python plugin's config is handed over as data; it must be exactly what evaluating the
    `.rtc` (a Lua plugin's config) gives: the same keys, values and types."""
    hs = load_hs(root, "analysis_threads = 2\n", tables=defaults(output="{read_queue = 'input'}"))
    body = EVERY_KIND if plugin_type != "input" else EVERY_KIND.replace('message_matcher = "TRUE"\n', "")
    p = load_plugin_config(write_plugin(root, plugin_type, "p", body), plugin_type, hs, log_level=7, pid=99)
    if plugin_type == "analysis":
        p.assigned_thread = 1
    values = p.runtime_values()
    assert same_typed(values, bare_eval(p.runtime_cfg))
    assert "nothing" not in values
    assert values["Logger"] == f"{plugin_type}.p" and values["output_limit"] == 1024
    assert same_typed(values["whole"], 3) and same_typed(values["f"], 0.5) and values["yes"] is True
    assert values["odd"] == "a]]b\r\nc\0d" and values["utf"] == "h\u00e9"
    assert values["list"] == [1, "two", False, [3]] and values["hash"] == {"a": 1, "b": {"c": "d"}}
    assert values["mixed"] == {1: 1, 2: 2, "x": "y"} and values["holes"] == {1: 1, 3: 3}
    assert values["numkeys"] == {2.5: "f", 10: "t"} and values["emptyt"] == {}
    values["hash"]["a"] = 2  # each call gets its own copy
    assert p.runtime_values()["hash"]["a"] == 1
