#!/usr/bin/env bash
# The GPU suite of issue 16: the compiled UNet on full-size architectures, in under 8 minutes on
# one H200, its tables written to OUTDIR.
#
#   bench/gpu_suite.sh OUTDIR            # on the GPU machine, from the repository root
#   bench/gpu_suite.sh --smoke OUTDIR    # anywhere (CPU): tiny sizes and steps, proves the script runs
#
# What it runs (bench/bench_compile.py, in-process, random weights and conditioning, fp16):
#   SD1.5 512 px 25 steps and SDXL 1024 px 30 steps; eager vs compiled (torch.compile,
#   reduce-overhead: inductor + CUDA graphs); 1 and 8 requests stepped together; First Block
#   Cache off and at a FIXED pattern skipping 13 of every 25 steps (random weights do not predict
#   real skip rates); the cost of one computed vs one cached step against the head's FLOP share;
#   compile time from an empty inductor cache (SD1.5 also from the filled cache in a new process).
#   Targets are printed beside the figures: SDXL <= 1.3 s/image compiled cache off and
#   <= 0.75 s/image at the cache's skip rate; SD1.5 one request >= 2x eager images/s.
#
# Nothing is downloaded: the machine needs a Python with CUDA torch, diffusers, transformers,
# peft, matplotlib, tqdm and pydantic (the project's requirements). It uses $PYTHON if set, else
# .venv/bin/python, else python3, and stops at once if torch sees no GPU (unless --smoke). What
# that Python lacks travels as wheels in .whl/ (ignored by git), installed into /tmp first. The
# lent H200's image (Python 3.12, torch with CUDA) lacks diffusers and pydantic; fetch them here:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 importlib_metadata
#
# and run it there with .whl carried: command "bench/gpu_suite.sh $OUT", carry [".whl"]. RESULTS.md sections are written in this copy of the repository (three runs each) and
# copied to OUTDIR with the plots, for the lead to bring back.
set -euo pipefail

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; shift; fi
OUTDIR="${1:?usage: bench/gpu_suite.sh [--smoke] OUTDIR}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then :; elif [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/raydiance-site .whl/*.whl
  export PYTHONPATH="/tmp/raydiance-site${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PYTHON" - "$SMOKE" <<'EOF' | tee "$OUTDIR/environment.txt"
import sys, torch, diffusers
smoke = sys.argv[1] == "1"
print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, CUDA available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(torch.cuda.get_device_name())
elif not smoke:
    sys.exit("gpu_suite.sh: torch sees no GPU (use --smoke to try the script on a CPU)")
EOF

START=$SECONDS
log() { echo "[gpu_suite +$((SECONDS - START))s] $*" | tee -a "$OUTDIR/log.txt"; }

# run NAME LIMIT_S ARGS...: one bench_compile run under a time limit, its output kept; a failure
# or a timeout is logged and the suite goes on
run() {
  local name="$1" limit="$2"; shift 2
  log "start $name (limit ${limit}s): $*"
  if timeout "$limit" "$PYTHON" -m bench.bench_compile --out "$OUTDIR" "$@" >"$OUTDIR/$name.log" 2>&1; then
    log "done $name"
  else
    log "FAILED $name (see $name.log)"; tail -20 "$OUTDIR/$name.log" | tee -a "$OUTDIR/log.txt"
  fi
}

if [[ $SMOKE == 1 ]]; then
  # tiny models (a full-size UNet takes many minutes to compile on a CPU): the built-in model
  # and SDXL's block layout at tiny widths, 64 px, 4 steps, one run each, nothing recorded
  run sd15 400 --arch builtin --steps 4 --requests 1,2 --caches off,fixed --repeats 1 --no-record --restart
  run sdxl 400 --arch tiny-sdxl --steps 4 --requests 1,2 --caches off,fixed --repeats 1 --no-record
else
  # GPU_SUITE_REPEATS (3: what RESULTS.md records), GPU_SUITE_MODE (torch.compile mode; absent:
  # reduce-overhead), GPU_SUITE_RESTART=0 to skip SD1.5's compile from the cache in a new process.
  # SDXL first: its targets matter most; the limits keep the whole suite under 8 minutes.
  REPEATS="${GPU_SUITE_REPEATS:-3}"
  MODE=(); [[ -n "${GPU_SUITE_MODE:-}" ]] && MODE=(--mode "$GPU_SUITE_MODE")
  RESTART=(--restart); [[ "${GPU_SUITE_RESTART:-1}" == 0 ]] && RESTART=()
  run sdxl 290 --arch sdxl --size 1024 --steps 30 --requests 1,8 --caches off,fixed --repeats "$REPEATS" "${MODE[@]}"
  LEFT=$((450 - SECONDS + START)); (( LEFT < 120 )) && LEFT=120  # timeout 0 would mean no limit
  run sd15 "$LEFT" --arch sd15 --size 512 --steps 25 --requests 1,8 --caches off,fixed \
    --repeats "$REPEATS" "${RESTART[@]}" "${MODE[@]}"
fi

cp bench/RESULTS.md "$OUTDIR/RESULTS.md" 2>/dev/null || true
cp bench/out/compile-*.png bench/out/trial/compile-*.png "$OUTDIR/" 2>/dev/null || true
log "all done in $((SECONDS - START)) s; tables: $OUTDIR/compile-*.md"
cat "$OUTDIR"/compile-*.md 2>/dev/null || true
