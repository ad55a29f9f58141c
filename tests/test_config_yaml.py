"""YAML configurations: the same keys, defaults and validation as the Lua cfgs, `hindsight-py convert`
between the two, and the project's run/ shipping into Elasticsearch 8 from YAML files only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from delivery_helpers import SUMMARY, Index, LineFile, hindsight_cli, project_workdir

from hindsight_py.config import ConfigError, load_hindsight_config, load_plugin_config
from hindsight_py.config_yaml import lua_string, yaml_to_lua
from hindsight_py.convert import convert

REPO = Path(__file__).resolve().parent.parent
HINDSIGHT_YAML = """output_path: output
sandbox_run_path: run
analysis_lua_path: "?.lua"
analysis_lua_cpath: "?.so"
io_lua_path: "?.lua"
io_lua_cpath: "?.so"
input_defaults: {}
analysis_defaults: {}
output_defaults: {ticker_interval: 5}
"""


def convert_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hindsight_py", "convert", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def setup_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for kind in ("input", "analysis", "output"):
        (tmp_path / "run" / kind).mkdir(parents=True)
    (tmp_path / "hindsight.yaml").write_text(HINDSIGHT_YAML)
    return tmp_path


def test_lua_strings_escape_what_lua_would_read_otherwise() -> None:
    assert lua_string('a"b\\c\nd\x01é') == '"a\\"b\\\\c\\nd\\001é"'
    assert yaml_to_lua("a: [1, 2.5, true, x]\nb: {c: 1, 'not a name': 2, 3: 4}\nc:\n", "f") == (
        'a = {1, 2.5, true, "x"}\nb = {c = 1, ["not a name"] = 2, [3] = 4}\n')


def test_a_yaml_hindsight_cfg_gets_the_lua_defaults(setup_dir: Path) -> None:
    hs = load_hindsight_config("hindsight.yaml")
    assert hs.output_path == "output" and hs.analysis_threads == 1 and hs.max_message_size == 64 * 1024
    assert hs.output_defaults["ticker_interval"] == 5
    (setup_dir / "run/output/out.yaml").write_text("filename: out.lua\nmessage_matcher: 'TRUE'\nmy_key: [a, b]\n")
    (setup_dir / "run/output/out.lua").write_text("function process_message() return 0 end\n")
    plugin = load_plugin_config("run/output/out.yaml", "output", hs)
    assert plugin.name == "output.out" and plugin.ticker_interval == 5 and plugin.memory_limit == 8 * 1024 * 1024
    assert plugin.values["my_key"] == ["a", "b"]
    assert 'my_key = {"a", "b"}' in plugin.runtime_cfg  # the .rtc stays Lua


@pytest.mark.parametrize(("text", "message"), [
    ("output_path: [unclosed\n", "line 2"),
    ("- a list\n", "must be a mapping"),
    ("not a name: 1\n", "is not a configuration key"),
    (HINDSIGHT_YAML + "unknown_key: 1\n", "invalid option: 'unknown_key'"),
    # YAML reads an unquoted TRUE (or yes, on) as a boolean: where a number is due, Lua's error
    (HINDSIGHT_YAML + "max_message_size: TRUE\n", "max_message_size"),
    (HINDSIGHT_YAML + "analysis_threads: many\n", "analysis_threads"),
])
def test_yaml_mistakes_are_config_errors(setup_dir: Path, text: str, message: str) -> None:
    (setup_dir / "hindsight.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_hindsight_config("hindsight.yaml")


def test_a_plugin_in_both_forms_is_refused(setup_dir: Path) -> None:
    from hindsight_py.config import discover_plugin_configs

    (setup_dir / "run/input/x.cfg").write_text('filename = "x.lua"\n')
    (setup_dir / "run/input/x.yaml").write_text("filename: x.lua\n")
    with pytest.raises(ConfigError, match="input.x has two configurations: x.cfg and x.yaml"):
        discover_plugin_configs(load_hindsight_config("hindsight.yaml"))


def test_every_cfg_of_the_project_and_upstream_converts_and_loads_the_same(setup_dir: Path) -> None:
    hs = load_hindsight_config("hindsight.yaml")
    cfgs = sorted((REPO / "run").glob("*/*.cfg"))
    assert len(cfgs) >= 4
    for cfg in cfgs:
        kind = cfg.parent.name
        (setup_dir / "run" / kind / "plugin.cfg").write_text(cfg.read_text())
        (setup_dir / "run" / kind / "plugin.yaml").write_text(convert(cfg))
        for source in (REPO / "run" / kind).glob("*.lua"):
            (setup_dir / "run" / kind / source.name).write_text(source.read_text())
        from_lua = load_plugin_config(f"run/{kind}/plugin.cfg", kind, hs)
        from_yaml = load_plugin_config(f"run/{kind}/plugin.yaml", kind, hs)
        assert from_yaml.values == from_lua.values, cfg
        assert (from_yaml.ticker_interval, from_yaml.message_matcher) == (from_lua.ticker_interval,
                                                                          from_lua.message_matcher)
        # and back: the YAML made into Lua again evaluates to the same values
        (setup_dir / "run" / kind / "again.cfg").write_text(convert(setup_dir / "run" / kind / "plugin.yaml"))
        assert load_plugin_config(f"run/{kind}/again.cfg", kind, hs).values == from_lua.values
        for name in ("plugin.cfg", "plugin.yaml", "again.cfg"):
            (setup_dir / "run" / kind / name).unlink()
    converted = convert(REPO / "run" / "hindsight.cfg")
    assert converted.startswith("output_path: ")  # the cfg's own order


def test_convert_writes_a_new_file_and_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "a.cfg").write_text('filename = "a.lua"\nticker_interval = 60 -- seconds\n')
    result = convert_cli("a.cfg", "a.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "a.yaml").read_text() == "filename: a.lua\nticker_interval: 60\n"
    again = convert_cli("a.cfg", "a.yaml", cwd=tmp_path)
    assert again.returncode == 1 and "a.yaml exists" in again.stderr
    to_lua = convert_cli("a.yaml", cwd=tmp_path)
    assert to_lua.stdout == 'filename = "a.lua"\nticker_interval = 60\n'
    broken = convert_cli("missing.cfg", cwd=tmp_path)
    assert broken.returncode == 1 and "missing.cfg" in broken.stderr


@pytest.mark.servers
def test_the_project_run_ships_from_yaml_files_only(tmp_path: Path, es8_url: str, scratch_index) -> None:
    lines = LineFile.write(tmp_path / "lines.json", 2_000)
    index = Index(es8_url, scratch_index(es8_url))
    wd = project_workdir(tmp_path / "w", lines.path, es8_url, index.name)
    for cfg in [wd.path / "hindsight.cfg", *(wd.path / "run").glob("*/*.cfg")]:
        cfg.with_suffix(".yaml").write_text(convert(cfg))
        cfg.unlink()
    result = subprocess.run([hindsight_cli(), "hindsight.yaml"], cwd=wd.path, capture_output=True, text=True,
                            timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = SUMMARY.search(result.stderr)
    assert summary and int(summary["delivered"]) == lines.count
    assert index.refreshed_count() == lines.count
