import os
from pathlib import Path

import pytest

from hindsight_py.checkpoint import CheckpointError, load_checkpoints, render_checkpoints, save_checkpoints

# What Hindsight itself writes: %.17g numbers, escaped strings, positions "<id>:<offset>".
UPSTREAM_TEXT = (
    "_G['input->analysis0'] = '3:1048576'\n"
    "_G['input.file'] = 123456789\n"
    "_G['input.ratio'] = 0.10000000000000001\n"
    "_G['analysis'] = '0:77'\n"
    "_G['input.quoted'] = 'a\\\"b\\\\c\\nd\\re'\n"
)


def test_missing_file_is_empty(tmp_path: Path) -> None:
    assert load_checkpoints(tmp_path / "hindsight.cp") == {}


def test_upstream_text_loads(tmp_path: Path) -> None:
    cp = tmp_path / "hindsight.cp"
    cp.write_text(UPSTREAM_TEXT)
    assert load_checkpoints(cp) == {
        "input->analysis0": "3:1048576",
        "input.file": 123456789.0,
        "input.ratio": 0.1,
        "analysis": "0:77",
        "input.quoted": 'a"b\\c\nd\re',
    }


def test_render_matches_upstream_bytes() -> None:
    values = {
        "input->analysis0": "3:1048576",
        "input.file": 123456789,
        "input.ratio": 0.1,
        "analysis": "0:77",
        "input.quoted": 'a"b\\c\nd\re',
    }
    assert render_checkpoints(values) == UPSTREAM_TEXT


def test_round_trip(tmp_path: Path) -> None:
    cp = tmp_path / "hindsight.cp"
    values: dict[str, str | float] = {
        "input.file": 1.0 / 3.0,
        "input.big": 2.0**53 + 2,
        "input.negative": -12.5,
        "output->elasticsearch": "12:345",
        "input.s3": "key with 'single' quotes, \"double\", \\ and\nnewline\r\x00nul \x01 ünïcode",
        "weird 'key'": "x",
        "input.inf": float("inf"),
        "input.ninf": float("-inf"),
    }
    save_checkpoints(cp, values)
    assert load_checkpoints(cp) == values
    save_checkpoints(cp, {"input.nan": float("nan")})
    loaded = load_checkpoints(cp)["input.nan"]
    assert isinstance(loaded, float) and loaded != loaded


def test_single_quote_differs_from_upstream_only_where_upstream_breaks() -> None:
    # Upstream writes the ' raw, which ends the Lua string early; we escape it.
    assert render_checkpoints({"k": "it's"}) == "_G['k'] = 'it\\'s'\n"
    assert render_checkpoints({"k": "its"}) == "_G['k'] = 'its'\n"


def test_upstream_single_quote_hazard_is_an_error_naming_the_file(tmp_path: Path) -> None:
    cp = tmp_path / "hindsight.cp"
    cp.write_text("_G['input.x'] = 'it's'\n")
    with pytest.raises(CheckpointError) as info:
        load_checkpoints(cp)
    assert str(info.value).startswith(f"loading {cp} failed: {cp}:1:")
    assert info.value.path == str(cp)


def test_bad_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    cp = tmp_path / "hindsight.cp"
    cp.write_text("_G['a'] = '1:2'\n_G['b'] = \n")
    with pytest.raises(CheckpointError, match=rf"^loading {cp} failed: {cp}:3: unexpected symbol"):
        load_checkpoints(cp)


def test_runaway_file_is_an_error(tmp_path: Path) -> None:
    cp = tmp_path / "hindsight.cp"
    cp.write_text("while true do end\n")
    with pytest.raises(CheckpointError, match="instruction limit exceeded"):
        load_checkpoints(cp)


def test_bare_state_has_only_g(tmp_path: Path) -> None:
    cp = tmp_path / "hindsight.cp"
    cp.write_text("_G['a'] = print\n")
    assert load_checkpoints(cp) == {}
    cp.write_text("_G['a'] = string.format('%d', 1)\n")
    with pytest.raises(CheckpointError, match="attempt to index global 'string'"):
        load_checkpoints(cp)


def test_non_checkpoint_values_are_ignored(tmp_path: Path) -> None:
    cp = tmp_path / "hindsight.cp"
    cp.write_text("_G['t'] = {}\n_G[1] = 'x'\n_G['b'] = true\n_G['ok'] = '1:1'\n")
    assert load_checkpoints(cp) == {"ok": "1:1"}


def test_save_replaces_atomically_and_leaves_no_tmp(tmp_path: Path) -> None:
    cp = tmp_path / "hindsight.cp"
    save_checkpoints(cp, {"a": "1:1"})
    inode = cp.stat().st_ino
    save_checkpoints(cp, {"a": "2:2", "b": 5})
    assert load_checkpoints(cp) == {"a": "2:2", "b": 5.0}
    assert cp.stat().st_ino != inode  # a new file renamed over the old, not a rewrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hindsight.cp"]


def test_failed_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cp = tmp_path / "hindsight.cp"
    save_checkpoints(cp, {"a": "1:1"})
    before = cp.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        save_checkpoints(cp, {"a": "9:9"})
    assert cp.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hindsight.cp"]


def test_bad_value_type_writes_nothing(tmp_path: Path) -> None:
    cp = tmp_path / "hindsight.cp"
    save_checkpoints(cp, {"a": "1:1"})
    with pytest.raises(TypeError, match="'b' must be a str or a number"):
        save_checkpoints(cp, {"a": "2:2", "b": None})  # type: ignore[dict-item]
    assert load_checkpoints(cp) == {"a": "1:1"}
    assert not (tmp_path / "hindsight.cp.tmp").exists()
