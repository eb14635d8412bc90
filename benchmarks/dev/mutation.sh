#!/usr/bin/env bash
# Mutation testing of the trust-critical server code with mutmut (docs/mutation.md); not part of the default test run.
#
#   pip install -e ".[dev]"                          # mutmut, once
#   bash benchmarks/dev/mutation.sh                      # every module, one after another
#   bash benchmarks/dev/mutation.sh privacy report       # some of them: the names of [tool.mutmut]'s only_mutate
#   MUTMUT_CHILDREN=1 bash benchmarks/dev/mutation.sh    # fewer parallel workers (default 2)
#   MUTATION_SAMPLE=120 bash benchmarks/dev/mutation.sh  # a seeded random sample of 120 mutants a module (docs/mutation.md's)
#
# What is mutated and which tests run is [tool.mutmut] in pyproject.toml: the fast tests that cover these modules (unit
# tests and short in-process runs). mutmut keeps its results in mutants/: a second run re-tests only what changed
# (rm -rf mutants/ to start over). CPU heavy: it runs at low priority. Prints the per-module table of
# benchmarks/dev/mutation_scores.py at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python}
modules=("$@")
[[ ${#modules[@]} -gt 0 ]] || modules=(strategy sampling aggregation options privacy report traffic weights selection checkpoint
  screening)
for module in "${modules[@]}"; do
  [[ -f "server_app/$module.py" ]] || { echo "benchmarks/dev/mutation.sh: no server_app/$module.py" >&2; exit 2; }
done
if [[ -n ${MUTATION_SAMPLE:-} ]]; then
  # mutmut has no make-only command: asked for a mutant that does not exist, it makes the mutants and collects which tests
  # cover them, then stops on finding nothing to run
  nice -n 10 "$python" -m mutmut run "server_app.no_such_mutant" > /dev/null 2>&1 || true
  compgen -G "mutants/server_app/*.py.meta" > /dev/null || { echo "mutmut made no mutants: run it without MUTATION_SAMPLE to see why" >&2; exit 1; }
  mapfile -t names < <("$python" -m benchmarks.dev.mutation_scores --pick "$MUTATION_SAMPLE" "${modules[@]}")
  nice -n 10 "$python" -m mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "${names[@]}"
  "$python" -m benchmarks.dev.mutation_scores --sample "$MUTATION_SAMPLE"
  exit
fi
for module in "${modules[@]}"; do
  nice -n 10 "$python" -m mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "server_app.$module.*"
done
"$python" -m benchmarks.dev.mutation_scores
