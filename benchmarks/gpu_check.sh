#!/usr/bin/env bash
# The GPU checks of issue 13 in one call (see benchmarks/gpu_check.py --help for the sections).
#
#   bash benchmarks/gpu_check.sh                                   # on the GPU machine, from the repo root
#   bash benchmarks/gpu_check.sh --inception /path/default_1.pt    # any gpu_check.py option passes through
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --device cpu --quick
#
# The markdown goes to $OUT/gpu_check.md when $OUT is set (the device machine's return folder),
# else to benchmarks/results/gpu_check_<date>.md; beside it the JSON of every number and the log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

py="${PYTHON:-python}"
command -v "$py" >/dev/null 2>&1 || py=python3

if [[ -n "${OUT:-}" ]]; then
    dest="$OUT/gpu_check.md"
else
    dest="benchmarks/results/gpu_check_$(date +%Y-%m-%d).md"
fi
mkdir -p "$(dirname "$dest")"
base="${dest%.md}"

# stdout (the markdown, row by row) is teed to the report; stderr (progress) to the log
status=0
"$py" benchmarks/gpu_check.py --json "$base.json" "$@" 2> >(tee "$base.log" >&2) | tee "$dest" || status=$?
wait || true  # the log's tee, so the log is complete when the machine hands $OUT back
exit "$status"
