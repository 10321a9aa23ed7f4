#!/usr/bin/env bash
# The GitHub Action's gate step (action.yml). Inputs arrive as INPUT_* environment variables, never
# spliced into the script text (no injection through a path or an argument). Fits the model first
# where `normal` is given and the model file is missing, scores, sets the step's outputs, and exits
# with `vae-anomaly score`'s exit code (0 passed, 1 gate failed, 2 usage, 3 unreadable inputs).
set -uo pipefail

report="${INPUT_REPORT:-vae-anomaly-report.json}"
junit="${report%.json}.junit.xml"
rm -f -- "$report" "$junit"  # never read a previous run's report as this one's

args=()
model="${INPUT_MODEL:-}"
if [[ -n "${INPUT_NORMAL:-}" ]]; then
    model="${model:-model.vae}"
    if [[ ! -f "$model" ]]; then
        echo "vae-anomaly: no $model yet, fitting it on ${INPUT_NORMAL}" >&2
        vae-anomaly fit "$INPUT_NORMAL" -o "$model" || {
            code=$?
            { echo "exit-code=$code"; echo "flagged="; echo "unreadable="; echo "report="; } >> "$GITHUB_OUTPUT"
            exit "$code"
        }
    fi
fi
[[ -n "$model" ]] && args+=(--model "$model")
[[ -n "${INPUT_GATE:-}" ]] && args+=(--gate "$INPUT_GATE")
[[ -n "${INPUT_FPR:-}" ]] && args+=(--fpr "$INPUT_FPR")
[[ -n "${INPUT_FDR:-}" ]] && args+=(--fdr "$INPUT_FDR")
[[ -n "${INPUT_BASELINE:-}" ]] && args+=(--baseline "$INPUT_BASELINE")
: "${INPUT_PATH:?the action needs a path input: the images to score}"
if [[ "$INPUT_PATH" == *$'\n'* ]]; then
    mapfile -t paths < <(printf '%s\n' "$INPUT_PATH" | sed '/^[[:space:]]*$/d')  # one a line: spaces kept
else
    read -r -a paths <<< "$INPUT_PATH"
fi
read -r -a extra <<< "${INPUT_ARGS:-}"

vae-anomaly score "${paths[@]}" "${args[@]}" "${extra[@]}" --format json --output "$report" --junit "$junit"
code=$?

{
    echo "exit-code=$code"
    python - "$report" <<'PY'
import json
import sys

try:
    with open(sys.argv[1], encoding="utf-8") as f:
        summary = json.load(f)["summary"]
    print(f"flagged={summary['flagged']}\nunreadable={summary['unreadable']}\nreport={sys.argv[1]}")
except (OSError, ValueError, KeyError):  # no report: a usage error stopped the run before scoring
    print("flagged=\nunreadable=\nreport=")
PY
} >> "$GITHUB_OUTPUT"
exit "$code"
