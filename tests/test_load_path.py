"""load_path.LoadDir without processes: which files of load/ are handed over, when, in which order.

With inotify (the default, as upstream) a file is ready once its writer closed it or it was moved
in; without it (and for files there before the watch started) once it stayed unchanged between
two scans."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hindsight_py.load_path import LoadDir, run_path_of


def names(ready) -> list[tuple[str, str]]:
    return [(d.plugin_type, d.path.name) for d in ready]


def test_without_inotify_a_file_is_handed_over_once_it_stayed_unchanged_between_two_scans(tmp_path: Path) -> None:
    for kind in ("input", "analysis", "output"):
        (tmp_path / kind).mkdir()
    load = LoadDir(tmp_path, watch=False)
    cfg = tmp_path / "output" / "es.cfg"
    cfg.write_text("filename = ")
    assert load.scan() == ([], [])  # first seen: maybe still being written
    cfg.write_text("filename = 'x.lua'\n")
    os.utime(cfg, ns=(1, 1))
    assert load.scan() == ([], [])  # changed since: not yet
    ready, _ = load.scan()
    assert names(ready) == [("output", "es.cfg")]
    assert ready[0].plugin_name == "output.es" and ready[0].kind == "cfg"
    assert run_path_of(ready[0], tmp_path / "run", ".err") == tmp_path / "run" / "output" / "es.err"


def test_code_comes_before_cfgs_and_stops_last_and_other_files_are_reported_once(tmp_path: Path) -> None:
    for kind in ("input", "analysis", "output"):
        (tmp_path / kind).mkdir()
    for rel in ("output/z.off", "output/a.cfg", "analysis/c.cfg", "analysis/c.lua", "input/g.py",
                "input/notes.txt", "input/.hidden.cfg"):
        (tmp_path / rel).write_text("x")
    load = LoadDir(tmp_path)
    _, ignored = load.scan()
    assert sorted(p.name for p in ignored) == [".hidden.cfg", "notes.txt"]
    ready, ignored = load.scan()
    assert ignored == []
    assert names(ready) == [("input", "g.py"), ("analysis", "c.lua"), ("analysis", "c.cfg"), ("output", "a.cfg"),
                            ("output", "z.off")]
    assert [d.kind for d in ready] == ["source", "source", "cfg", "cfg", "off"]


@pytest.mark.parametrize("watch", [True, False], ids=["inotify", "two scans"])
def test_a_kept_file_is_not_handed_over_again_until_it_changes(tmp_path: Path, watch: bool) -> None:
    (tmp_path / "input").mkdir()
    bad = tmp_path / "input" / "bad.cfg"
    bad.write_text("filename =")
    load = LoadDir(tmp_path, watch=watch)  # there before the watch: the two-scan rule either way
    assert load.watched == watch
    load.scan()
    (ready, _) = load.scan()
    assert names(ready) == [("input", "bad.cfg")]
    load.keep(bad)
    assert load.scan() == ([], [])
    bad.write_text("filename = 'fixed.lua'\n")
    if not watch:
        assert load.scan() == ([], [])  # changed: one more look
    assert names(load.scan()[0]) == [("input", "bad.cfg")]
    load.close()


def test_with_inotify_a_file_is_ready_once_its_writer_closed_it_or_it_was_moved_in(tmp_path: Path) -> None:
    for kind in ("input", "analysis", "output"):
        (tmp_path / kind).mkdir()
    load = LoadDir(tmp_path)
    assert load.watched
    cfg = tmp_path / "output" / "es.cfg"
    with open(cfg, "w") as fh:
        fh.write("filename = ")
        fh.flush()
        assert load.scan() == ([], [])  # still open for writing: never read half-way
        assert load.scan() == ([], []) and load.settling == []  # however long that takes
        fh.write("'x.lua'\n")
    assert names(load.scan()[0]) == [("output", "es.cfg")]  # closed: at the next scan
    cfg.unlink()

    staged = tmp_path / "es.cfg.new"
    staged.write_text("filename = 'y.lua'\n")
    os.replace(staged, tmp_path / "input" / "gen.cfg")
    assert names(load.scan()[0]) == [("input", "gen.cfg")]
    (tmp_path / "input" / "gen.cfg").unlink()

    # a file rewritten again and again is handed over at each close (as upstream's events)
    off = tmp_path / "input" / "gen.off"
    for _ in range(2):
        off.write_text("")
        assert names(load.scan()[0]) == [("input", "gen.off")]
        off.unlink()
    assert load.scan() == ([], [])
    load.close()
