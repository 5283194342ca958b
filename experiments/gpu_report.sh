#!/usr/bin/env bash
# Every GPU figure of BUILD_NOTES.md in one run, on one GPU, in under 9
# minutes (the parts' limits add up to 530 s, 590 s with every kill margin):
#
#   bash experiments/gpu_report.sh OUTDIR [PYTHON]
#
# 1. the environment (GPU, driver, jax and whether tokamax is importable);
# 2. the kernels' tests compiled for the GPU (the *Compiled test classes and
#    the fused normaliser inside CoRE's loss), against float64 references;
# 3. the spatially biased attention kernel against the best unbiased flash
#    attention reachable from JAX and against attention with a materialised
#    [H, N, N] bias (tokamax's Mosaic or Triton kernel when installed, else cuDNN / XLA);
# 4. CoRE's training step at 10^6 regions per city (linear memory only);
# 5. the fused row log-sum-exp kernel against its XLA reference;
# 6. CoRE's step at 10^3 and 10^5 regions per city (the direct N x N
#    formulation at 10^3 only).
#
# Each part runs under its own time limit (a part that hangs cannot eat the
# others' time), writes its whole output to OUTDIR/<part>.log, and the
# summary printed last gives each part's exit status, time and last lines.
set -u
out=${1:?usage: bash experiments/gpu_report.sh OUTDIR [PYTHON]}
py=${2:-python3}
# OUTDIR is taken relative to where the script was called from. Checked
# first: each part below would otherwise fail on its own, one after another.
if ! mkdir -p "$out" 2>/dev/null || ! out=$(cd "$out" 2>/dev/null && pwd); then
  echo "error: OUTDIR $out: cannot make or enter that folder" >&2
  exit 2
fi
if ! command -v "$py" >/dev/null; then
  echo "error: PYTHON $py: no such command" >&2
  exit 2
fi
# A path to the interpreter is taken from where the script was called from
# too, before the cd below makes a relative one point elsewhere.
case $py in
*/*) py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" ;;
esac
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
summary="$out/summary.txt"
: >"$summary"
failed=0

part() { # name limit_seconds tail_lines command...
  local name=$1 limit=$2 lines=$3
  shift 3
  local started=$SECONDS
  echo "== $name (limit ${limit} s)" | tee -a "$summary"
  echo "\$ $*" >"$out/$name.log"
  # timeout signals its whole process group, so the benchmarks' child
  # processes end with the part.
  timeout -k 10 "$limit" "$@" >>"$out/$name.log" 2>&1
  local status=$?
  [ "$status" -eq 0 ] || failed=$((failed + 1))
  local note=""
  [ "$status" -eq 124 ] || [ "$status" -eq 137 ] && note=" (time limit)"
  echo "   exit $status$note after $((SECONDS - started)) s" | tee -a "$summary"
  tail -n "$lines" "$out/$name.log" | sed 's/^/   /' >>"$summary"
}

# Most needed first: a part cut short by the call's own limit is then a late one.
part environment 30 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv; $py -c '
import jax, jaxlib
print(\"jax\", jax.__version__, \"jaxlib\", jaxlib.__version__, jax.devices())
try:
  import tokamax
  print(\"tokamax\", getattr(tokamax, \"__version__\", \"(version unknown)\"))
except Exception as e:
  print(\"tokamax not importable:\", type(e).__name__, e)
import importlib.util, sys
needed = (\"flax\", \"optax\", \"jraph\", \"chex\", \"orbax.checkpoint\", \"pytest\")
missing = [m for m in needed if importlib.util.find_spec(m.split(\".\")[0]) is None]
if missing:
  # Every later part imports these: said once here rather than as a traceback in each.
  sys.exit(\"missing packages the parts below import: \" + \", \".join(missing)
           + \" (pip install -e . in this repository, or their wheels)\")
'"
# A file that fails to import (a missing package) must not take the others' tests with it.
part kernel_tests 140 15 "$py" -m pytest -q -p no:cacheprovider --continue-on-collection-errors \
  tests/test_kernel_row_lse.py tests/test_kernel_biased_attention.py tests/test_core_losses.py \
  -k "Compiled or fused_kernel"
part biased_attention 110 20 "$py" -m kernels.biased_attention --sizes 4096 16384 32768 \
  --head-dims 64 128 --dtypes bfloat16 --repeats 10
part scale_million 140 10 "$py" -m experiments.bench_scale --sizes 1000000 --repeats 2 \
  --max-run-gb 120 --direct-up-to 100000 --no-kernels
# Three of the kernel's four GPU sizes: each needs eight compilations
# (forward and backward of the kernel and of the reference).
part row_lse 50 20 "$py" -m kernels.row_lse --repeats 5 \
  --sizes 16384,16384,128 16384,262144,128 16384,1048576,128
# The direct form only at 10^3: at 10^5 its estimate (416 GiB on the CPU) is
# over any GPU's memory, and compiling it only to skip it could cost the
# linear row before it its time.
part scale 60 10 "$py" -m experiments.bench_scale --sizes 1000 100000 --repeats 3 \
  --max-run-gb 120 --direct-up-to 1000 --no-kernels

echo
cat "$summary"
# Non-zero when a part failed, so that a caller sees it without reading.
if [ "$failed" -gt 0 ]; then
  echo "$failed part(s) did not finish with exit status 0" >&2
  exit 1
fi
