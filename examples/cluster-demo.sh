#!/usr/bin/env bash
# The demo sweep on a local cluster: `htc cluster up` (a private PostgreSQL, two API servers,
# AGENTS `htc agent` processes each in its own network namespace), the parameter sweep of
# examples/pi-sweep.yaml through it, every job's result, then `htc cluster down`.
# Needs root (network namespaces and veth pairs; docs/cluster.md).
#
#   make cluster-demo                 # installs into .venv, then runs this script
#   make cluster-demo AGENTS=5
#   bash examples/cluster-demo.sh     # with `htc` on PATH or in .venv/
#
# Environment: AGENTS (default 3), CLUSTER_DIR (default .htc-cluster), HTC, PY, SWEEP,
# KEEP_CLUSTER=1 (leave it running; stop it later with `htc cluster down --dir CLUSTER_DIR`).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ -z "${HTC:-}" ]; then
    if [ -x .venv/bin/htc ]; then HTC=.venv/bin/htc; else HTC=$(command -v htc || true); fi
fi
[ -n "$HTC" ] || { echo "cluster-demo: no htc executable; run \`make cluster-demo\`" >&2; exit 1; }
PY=${PY:-$(dirname "$HTC")/python}
[ -x "$PY" ] || PY=python3
[ "$(id -u)" = 0 ] || { echo "cluster-demo: network namespaces need root; run it as root" >&2; exit 1; }
AGENTS=${AGENTS:-3}
DIR=${CLUSTER_DIR:-.htc-cluster}
SWEEP=${SWEEP:-examples/pi-sweep.yaml}

if [ -t 1 ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD="" PLAIN=""; fi
step() { printf '\n%s==> %s%s\n' "$BOLD" "$*" "$PLAIN"; }
json_field() { "$PY" -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

unset OPENHTC_DATABASE_URL OPENHTC_URL OPENHTC_API_KEY OPENHTC_PROJECT OPENHTC_TASK

step "htc cluster up --agents $AGENTS --servers 2 --dir $DIR"
"$HTC" cluster up --agents "$AGENTS" --servers 2 --dir "$DIR"
down() {
    local status=$?
    if [ "${KEEP_CLUSTER:-0}" != 1 ]; then
        step "htc cluster down --dir $DIR"
        "$HTC" cluster down --dir "$DIR" || true
    fi
    if [ "$status" -ne 0 ]; then
        echo "cluster-demo: failed (exit $status); the logs are in $DIR/" >&2
    fi
    exit "$status"
}
trap down EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$HTC" cluster status --dir "$DIR"
STATUS=$("$HTC" cluster status --dir "$DIR" --json)
export OPENHTC_URL
OPENHTC_URL=$(printf '%s' "$STATUS" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["servers"][0]["url"])')
OPENHTC_API_KEY=$(cat "$DIR/server-0/admin-api-key")
export OPENHTC_API_KEY

step "htc projects create / htc tasks create (through server 0)"
PROJECT=$("$HTC" projects create "pi on a cluster" -d "Monte Carlo estimate of pi" --json | json_field projectId)
TASK=$("$HTC" tasks create "pi-sweep" -p "$PROJECT" --json | json_field taskId)

step "htc submit -f $SWEEP --wait (the agents run it, in their namespaces)"
"$HTC" submit -p "$PROJECT" -t "$TASK" -f "$SWEEP" --wait --poll 0.5

step "htc jobs, read through server 1"
OPENHTC_URL=$(printf '%s' "$STATUS" | "$PY" -c 'import json, sys; s = json.load(sys.stdin)["servers"]; print(s[-1]["url"])')
"$HTC" jobs -p "$PROJECT" -t "$TASK" --limit 0
JOBS=$("$HTC" jobs -p "$PROJECT" -t "$TASK" --limit 0 --json)
printf '%s' "$JOBS" | "$PY" -c '
import collections, json, sys
jobs = json.load(sys.stdin)
counts = collections.Counter(j.get("status") for j in jobs)
print(f"{len(jobs)} jobs: {dict(counts)}")
sys.exit(0 if set(counts) == {"SUCCEEDED"} else 1)'

step "htc logs, the last line of every job"
for job_id in $(printf '%s' "$JOBS" | "$PY" -c 'import json, sys; [print(j["jobUUID"]) for j in json.load(sys.stdin)]'); do
    printf '%-40s %s\n' "$job_id" "$("$HTC" logs "$job_id" -p "$PROJECT" -t "$TASK" | tail -n 1)"
done
step "Done"
