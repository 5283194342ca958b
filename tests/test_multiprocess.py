"""Two processes joined by `jax.distributed` train as one multi-host run.

Each child process has 2 simulated CPU devices; `jax.distributed.initialize`
on this host joins them into one 4-device mesh (CPU collectives over gloo),
which is how ``--distributed`` runs on several hosts. Seeds split over both
processes, and one city pair split by regions, must give the single-process
embeddings on every process; a rerun on the same work directory resumes from
the checkpoint the processes wrote together.
"""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

from experiments.bench_scale import synthetic_city_graph
from jaxurban.core import train

# name -> CoreConfig settings besides the shared tiny ones below.
# "two-stage" with split seeds covers both stages: the second trains on the
# first one's embeddings, which are then themselves split over the processes.
RUNS = {
  "seeds": dict(seeds=4, shard_seeds=True, variant="two-stage"),
  "regions": dict(seeds=2, shard_regions=True),
}
TINY = dict(epochs=3, log_every=3, n_anchors=32, features=16, heads=2, plot=False)


def _graphs():
  return [synthetic_city_graph(n, seed) for seed, n in ((0, 150), (1, 170))]


CHILD = textwrap.dedent(
  """
  import sys
  import jax
  import numpy as np

  process_id, port, workdir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
  assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
  from jaxurban.core import train
  from tests.test_multiprocess import RUNS, TINY, _graphs

  graphs = _graphs()
  arrays = {}
  for name, settings in RUNS.items():
    config = train.CoreConfig(**TINY, **settings)
    z_x, z_y, _ = train.train_embeddings(config, f"{workdir}/{name}", *graphs)
    # The rerun restores the checkpoint both processes wrote, trains nothing.
    again_x, again_y, log = train.train_embeddings(config, f"{workdir}/{name}", *graphs)
    assert log["embed"]["resumed_from"] == config.epochs, log
    np.testing.assert_array_equal(again_x, z_x)
    np.testing.assert_array_equal(again_y, z_y)
    arrays[f"{name}_x"], arrays[f"{name}_y"] = z_x, z_y
  np.savez(out, **arrays)
  print("PROCESS-OK", process_id)
  """
)


def _two_processes(code: str, arguments) -> list[tuple[str, str]]:
  """Runs `code` as processes 0 and 1 (2 CPU devices each), each given its
  id, a shared free port and `arguments(id)`; (stdout, stderr) of each,
  after checking that both exited 0."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  port = _free_port()
  children = [
    subprocess.Popen(
      [sys.executable, "-c", code, str(i), str(port), *arguments(i)],
      cwd=repo,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outputs = [child.communicate(timeout=600) for child in children]
  finally:
    for child in children:
      child.kill()
  for i, (child, (_, stderr)) in enumerate(zip(children, outputs)):
    assert child.returncode == 0, f"process {i}:\n{stderr[-3000:]}"
  return outputs


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_as_one_process(tmp_path):
  outputs = _two_processes(CHILD, lambda i: [str(tmp_path / "run"), str(tmp_path / f"{i}")])
  for i, (stdout, _) in enumerate(outputs):
    assert f"PROCESS-OK {i}" in stdout

  graphs = _graphs()
  for name, settings in RUNS.items():
    single = dict(settings, shard_seeds=False, shard_regions=False)
    z_x, z_y, _ = train.train_embeddings(
      train.CoreConfig(**TINY, **single), tmp_path / f"single-{name}", *graphs
    )
    for i in range(2):
      with np.load(tmp_path / f"{i}.npz") as got:
        # Every process holds the whole result, equal to one process's.
        np.testing.assert_allclose(got[f"{name}_x"], z_x, rtol=2e-5, atol=1e-5)
        np.testing.assert_allclose(got[f"{name}_y"], z_y, rtol=2e-5, atol=1e-5)


CLI_CHILD = textwrap.dedent(
  """
  import sys
  import jax
  from experiments import core_align

  process_id, port, root, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
  code = core_align.main([
    "--pair", "AA-BB", "--data-root", root, "--seeds", "4", "--shard-seeds", "--epochs", "2",
    "--log-every", "1", "--anchors", "8", "--no-plot", "--out", out, "--distributed",
    "--coordinator-address", f"localhost:{port}", "--num-processes", "2",
    "--process-id", str(process_id),
  ])
  assert code == 0, code
  print("CLI-OK", process_id, jax.device_count())
  """
)


def test_the_command_runs_as_one_run_over_two_processes(tmp_path):
  # What a user runs on each host: the command itself, not the library call
  # (which the test above drives). Both processes must join one 4-device
  # run, and only process 0 may write the outputs.
  from tests.test_data import make_city

  root = make_city(make_city(tmp_path / "data", "aa"), "bb")
  outputs = _two_processes(CLI_CHILD, lambda i: [str(root), str(tmp_path / "out")])
  for i, (stdout, _) in enumerate(outputs):
    assert f"CLI-OK {i} 4" in stdout
  assert "process 1: outputs written by process 0" in outputs[1][0]
  assert "process 1: outputs written by process 0" not in outputs[0][0]
  import json

  metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
  assert len(metrics["devices"]) == 4 and metrics["seeds"] == [0, 1, 2, 3]
