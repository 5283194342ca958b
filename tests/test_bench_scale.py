"""The scaling benchmark's synthetic cities and one tiny run of each formulation."""

import numpy as np
import pytest

from experiments import bench_scale


def test_synthetic_city_is_sparse_and_distance_decaying():
  n = 2500
  origin, destination, counts = bench_scale.synthetic_city(n, seed=0)
  per_origin = np.bincount(origin, minlength=n)
  assert 5 <= per_origin.mean() <= 10 and per_origin.min() >= 1
  side = int(np.ceil(np.sqrt(n)))
  distance = np.hypot(origin // side - destination // side, origin % side - destination % side)
  # Short trips dominate: most within 5 grid steps, few beyond 15.
  assert np.mean(distance <= 5) > 0.6 and np.mean(distance > 15) < 0.05
  assert np.all(counts >= 1) and len(np.unique(origin * n + destination)) == len(origin)


@pytest.mark.parametrize("n", [1000, 20000])
def test_synthetic_city_has_no_hub_on_a_partly_filled_grid(n):
  # 1000 and 20000 are not squares: the grid's last row is partly filled (or
  # the last grid row empty), and no region may collect the trips heading there.
  origin, destination, _ = bench_scale.synthetic_city(n, seed=0)
  assert origin.max() < n and destination.max() < n
  in_degree = np.bincount(destination, minlength=n)
  assert in_degree.max() <= 40  # XA and CD: 30 and 36


@pytest.mark.parametrize("direct,remat", [(False, False), (False, True), (True, False)])
def test_one_step_runs_and_reports(direct, remat):
  row = bench_scale.child(200, direct, repeats=1, max_run_gb=16.0, remat=remat)
  assert row["ran"] and row["finite"]
  assert row["compiled_gb"] > 0 and row["step_ms"] > 0 and row["peak_rss_gb"] > 0


def test_a_step_over_the_budget_is_not_run():
  row = bench_scale.child(200, True, repeats=1, max_run_gb=1e-6, remat=False)
  assert row == {**row, "ran": False}


def test_a_failed_size_is_reported_by_its_error_line():
  # JAX closes a filtered traceback with a note of its own: the reason shown
  # must be the error above it.
  stderr = (
    "Traceback (most recent call last):\n  File 'x.py', line 1\n"
    "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating\n"
    "--------------------\n"
    "For simplicity, JAX has removed its internal frames from the traceback of the following "
    "exception. Set JAX_TRACEBACK_FILTERING=off to include these.\n"
  )
  assert bench_scale._failure_reason(stderr).startswith("jaxlib.xla_extension.XlaRuntimeError: ")
  assert bench_scale._failure_reason("just a line\n") == "just a line"
  assert bench_scale._failure_reason("") == "(no message)"


def test_compile_only_prints_the_estimates_of_both_formulations(capsys):
  # The parent passes --compile-only on to each child process, which runs no step.
  assert bench_scale.main(["--sizes", "200", "--compile-only", "--no-kernels"]) == 0
  rows = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("200")]
  assert len(rows) == 2 and all("compiled only" in row for row in rows), rows


def test_a_failing_kernel_benchmark_fails_the_run(monkeypatch, capsys):
  # The attention benchmark returns 1 when the kernel itself failed, for a
  # calling script to see; on a GPU this run calls both kernel benchmarks.
  import jax

  from kernels import biased_attention, row_lse

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(row_lse, "main", lambda argv: 0)
  monkeypatch.setattr(biased_attention, "main", lambda argv: 1)
  assert bench_scale.main(["--sizes", "200", "--compile-only"]) == 1
  assert "failed: the biased attention kernel benchmark" in capsys.readouterr().err
