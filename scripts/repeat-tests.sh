#!/usr/bin/env bash
# Runs the whole test suite (without schemathesis) N times in a row, to find flaky tests:
# prints one line per run (passed, failed, which tests failed) and keeps each run's output
# in $OUT (default target/repeat-tests/run-<i>.log). Exits non-zero if any run failed.
#
# Usage: scripts/repeat-tests.sh [N (default 5)] [test name filter]
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
filter=${2:-}
OUT=${OUT:-target/repeat-tests}
mkdir -p "$OUT"
status=0
for i in $(seq 1 "$runs"); do
  start=$SECONDS
  # An empty filter matches every test and keeps scripts/test.sh from running schemathesis.
  scripts/test.sh "$filter" >"$OUT/run-$i.log" 2>&1 || status=1
  passed=$(grep -E '^test result' "$OUT/run-$i.log" | awk '{p += $4} END {print p + 0}')
  failed=$(grep -E '^test result' "$OUT/run-$i.log" | awk '{f += $6} END {print f + 0}')
  names=$(grep -E '^test .* FAILED$' "$OUT/run-$i.log" | awk '{print $2}' | tr '\n' ' ')
  echo "run $i of $runs: $passed passed, $failed failed, $((SECONDS - start)) s${names:+; failed: $names}"
done
exit $status
