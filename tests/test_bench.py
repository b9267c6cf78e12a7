"""``nodejob bench --quick --json`` runs end to end and reports every figure.

Speed is not asserted here (never a wall-clock threshold in a test): only that each figure was
measured and is a positive number, or, for the strategies that may be unavailable on this
machine, null with the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nodejob.bench import FIGURES, OPTIONAL_GROUPS


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodejob", "bench", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_quick_json_reports_every_figure() -> None:
    done = run_bench("--quick", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for key, group, _ in FIGURES:
        value = report[key]
        if value is None and group in OPTIONAL_GROUPS:
            assert report["notes"][key], f"{key} is null without a reason"
            continue
        assert isinstance(value, int | float), (key, value)
        assert not isinstance(value, bool), key
        assert value > 0, (key, value)
    ratio = report["stream_msgs_per_s"] / report["raw_ws_msgs_per_s"]
    assert report["stream_vs_raw_ws"] == pytest.approx(ratio, rel=0.01)
    assert report["quick"] is True
    assert report["machine"]["cpus"] >= 1


def test_only_runs_the_named_benchmarks() -> None:
    done = run_bench("--quick", "--json", "--only", "trivial,replay_10k_s")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    measured = {key for key, _, _ in FIGURES if key in report}
    assert measured == {"trivial_job_ms_p50", "replay_10k_s"}
    assert report["trivial_job_ms_p50"] > 0
    assert report["replay_10k_s"] > 0


def test_unknown_benchmark_is_a_usage_error() -> None:
    done = run_bench("--only", "nonsense")
    assert done.returncode == 2
    assert "unknown benchmark" in done.stderr
