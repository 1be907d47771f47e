"""`dsf bench compress`: the three runs on a tiny model, the time fit and the schedule simulation."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsf_runtime.benchmarks.compress import cubic_size, fit_time_model, makespan, simulate

pytest.importorskip("ray", reason="Ray is not installed (pip install 'dsf-runtime[ray]')")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.01, 100), min_size=1, max_size=40), st.integers(1, 70))
def test_makespan_bounds(times, workers):
    span = makespan(times, workers)
    assert span >= max(times) - 1e-9 and span >= sum(times) / workers - 1e-9
    assert span <= sum(times) / workers + max(times) + 1e-9  # LPT (a list schedule) is within one task of the mean


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.01, 100), min_size=7, max_size=7), st.integers(1, 80), st.sampled_from([1, 8, 64]))
def test_parallel_schedule_never_slower(times, layers, gpus):
    seq, _ = simulate(times, layers, gpus, "sequential")
    par, _ = simulate(times, layers, gpus, "parallel")
    assert par <= seq + 1e-6
    if gpus == 1:
        assert par == pytest.approx(seq) == pytest.approx(layers * sum(times))


def test_time_fit_recovers_a_cubic():
    points = [(n, n, 0.5 + 2e-9 * n**3) for n in (576, 1536, 4096)] + [(1536, 576, 0.5 + 2e-9 * cubic_size(1536, 576))]
    a, b = fit_time_model(points)
    assert a == pytest.approx(0.5, rel=1e-6) and b == pytest.approx(2e-9, rel=1e-6)


def test_bench_runs_three_ways_and_writes_results(tiny_model_dir, tmp_path):
    from dsf_runtime.benchmarks.compress import run_compress_bench

    payload = run_compress_bench(
        str(tiny_model_dir),
        preset_name="fast",
        workers=2,
        sides=(16, 32),
        out_dir=str(tmp_path / "results"),
        work_dir=str(tmp_path / "work"),
        eval_tokens=256,
        progress=False,
        nsamples=4,
        seqlen=32,
    )
    runs = payload["runs"]
    assert [r["variant"] for r in runs] == [
        "dense",
        "in-process, sequential",
        "Ray 2 workers, sequential",
        "Ray 2 workers, parallel",
    ]
    assert runs[1]["overhead_per_matrix_s"] == 0 and runs[1]["executor"] == "in-process"
    for r in runs[1:]:
        assert r["matrices"] == 14 and r["seconds"] > 0 and r["perplexity"] > 1
    assert all(r["executor"].startswith("ray") and r["overhead_per_matrix_s"] >= 0 for r in runs[2:])
    assert len(payload["simulation"]) == 12 and payload["fit"]["b_s_per_cubic"] != 0
    written = json.loads((tmp_path / "results" / "compress.json").read_text())
    assert (
        written["environment"]["cpu"]
        and "Ray 2 workers, parallel" in (tmp_path / "results" / "compress.md").read_text()
    )
