#!/usr/bin/env bash
# Mutation testing of the trust-critical server code with mutmut (docs/mutation.md); not part of the default test run.
#
#   pip install -e ".[dev]"                          # mutmut, once
#   bash benchmarks/mutation.sh                      # the five modules, one after another
#   bash benchmarks/mutation.sh privacy report       # some of them: strategy privacy report checkpoint screening
#   MUTMUT_CHILDREN=1 bash benchmarks/mutation.sh    # fewer parallel workers (default 2)
#
# What is mutated and which tests run is [tool.mutmut] in pyproject.toml: the fast tests that cover these modules (unit
# tests and short in-process runs). mutmut keeps its results in mutants/: a second run re-tests only what changed
# (rm -rf mutants/ to start over). CPU heavy: it runs at low priority. Prints the per-module table of
# benchmarks/mutation_scores.py at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
modules=("$@")
[[ ${#modules[@]} -gt 0 ]] || modules=(strategy privacy report checkpoint screening)
for module in "${modules[@]}"; do
  [[ -f "server_app/$module.py" ]] || { echo "benchmarks/mutation.sh: no server_app/$module.py" >&2; exit 2; }
  nice -n 10 "$python" -m mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "server_app.$module.*"
done
"$python" -m benchmarks.mutation_scores
