#!/usr/bin/env bash
# No test may depend on another: the suite in file order, in reverse order, in random orders (pytest-randomly
# seeds), and every test file alone. Prints one line per run; exits non-zero if any run failed.
# Usage: bash tests/order_check.sh [SEED ...]    (default seeds: 1 2 3; about 7 suite runs of time)
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
seeds=("${@:-1 2 3}")
status=0
run() {  # label, pytest arguments...
    local label=$1; shift
    local summary
    summary=$("$py" -m pytest -q "$@" 2>&1 | tail -1)
    echo "$label: $summary"
    [[ $summary == *failed* || $summary == *error* ]] && status=1
}
run "file order" -p no:randomly
run "reverse order" -p no:randomly --reverse
for seed in ${seeds[*]}; do run "random order, --randomly-seed=$seed" -p randomly --randomly-seed="$seed"; done
for file in tests/test_*.py; do run "alone: $file" -p no:randomly "$file"; done
exit $status
