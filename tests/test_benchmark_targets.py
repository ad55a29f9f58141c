"""benchmarks/run.py --targets: issue 17's targets judged from a pass's rows (check_targets)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest
from conftest import REPO_ROOT


def load() -> ModuleType:
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # run.py imports build_hindsight beside it
    try:
        spec = importlib.util.spec_from_file_location("benchmark_run", REPO_ROOT / "benchmarks" / "run.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    return module


run = load()
LINES = run.TARGET_LINES


def row(name: str, docs_per_s: float, cpu_per_100k: float, *, rss: float = 60.0, rc: int = 0,
        docs: int = LINES) -> dict:
    return {"name": name, "wall": docs / docs_per_s, "cpu": cpu_per_100k * docs / 100_000, "rss": rss, "rc": rc,
            "docs": docs}


def fake_pass(**change: dict) -> list[dict]:
    """A pass on the fake endpoint that meets every target, with `change` applied to named rows."""
    rows = {
        run.HINDSIGHT_ROW: row(run.HINDSIGHT_ROW, 25_000, 1.6, docs=LINES - 6),  # Hindsight may lose a few
        "upstream": row("upstream", 110_000, 1.2),
        "lua": row("lua", 160_000, 0.9),
        "native": row("native", 310_000, 0.45),
        "s3tree": row("s3tree", 160_000, 0.6),
    }
    for name, fields in change.items():
        rows[name].update(fields)
    return list(rows.values())


def real_pass(native: float = 9_000) -> list[dict]:
    return [row("parallel_bulk", 8_000, 1.0), row("native", native, 0.5), row("lua", 7_800, 1.0),
            row("upstream", 7_500, 1.3)]


def memory_pass(native_rss: float = 70.0) -> list[dict]:
    return [row(name, 100_000, 1.0, rss=native_rss if name == "native" else 65.0, docs=run.MEMORY_LINES)
            for name in run.TARGET_PIPELINES]


def test_every_target_met(capsys: pytest.CaptureFixture[str]) -> None:
    assert run.check_targets(fake_pass(), real_pass(), memory_pass()) is True
    out = capsys.readouterr().out
    assert "NOT MET" not in out
    assert out.rstrip().endswith("met")


@pytest.mark.parametrize(("fake", "real", "memory", "target"), [
    ({"native": {"wall": LINES / 280_000}}, None, None, "native >= 12x hindsight (C)"),
    ({"upstream": {"cpu": 1.7 * LINES / 100_000}}, None, None, "upstream: less CPU per document"),
    ({"s3tree": {"cpu": 0.7 * LINES / 100_000}}, None, None, "s3tree CPU per document <= 1.5x native's"),
    ({"lua": {"docs": LINES - 1}}, None, None, "every pipeline delivers every line"),
    ({"lua": {"rc": 8}}, None, None, "every pipeline delivers every line"),
    ({}, real_pass(native=7_900), None, "real server: native >= 1x parallel_bulk"),
    ({}, None, memory_pass(native_rss=120.0), "native: peak PSS flat"),
    ({}, [], None, "real server (--es URL)"),
])
def test_a_target_missed_fails_the_check(capsys: pytest.CaptureFixture[str], fake: dict, real: list[dict] | None,
                                         memory: list[dict] | None, target: str) -> None:
    assert run.check_targets(fake_pass(**fake), real_pass() if real is None else real,
                             memory_pass() if memory is None else memory) is False
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if target in line]
    assert line.rstrip().endswith("NOT MET"), out
    assert out.rstrip().endswith("NOT MET")
