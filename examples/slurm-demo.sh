#!/usr/bin/env bash
# The demo sweep on Slurm pilots (docs/allocation.md, "Try it on one machine"): a private Slurm
# (`python -m openhtc.testing.slurm up`), an `htc server` with no executor of its own, an allocation
# queue (`htc alloc add slurm`), the parameter sweep of examples/pi-sweep.yaml run by the pilots'
# agents, then the proof that every pilot has gone: `squeue` empty and `htc alloc ls` showing no live
# pilot. Then the server and the private Slurm stop. Needs root, slurm-wlm and munge.
#
#   make slurm-demo                  # installs into .venv, then runs this script
#   bash examples/slurm-demo.sh      # with `htc` on PATH or in .venv/
#
# Environment: SLURM_DEMO_DIR (default .htc-slurm-demo; an earlier demo's is wiped at start), HTC,
# PY, SWEEP (default examples/pi-sweep.yaml), JOBS (the sweep's batch size, default 16), PILOTS
# (--max-pilots, default 2), IDLE (--idle-timeout, default 10s).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ -z "${HTC:-}" ]; then
    if [ -x .venv/bin/htc ]; then HTC=.venv/bin/htc; else HTC=$(command -v htc || true); fi
fi
[ -n "$HTC" ] || { echo "slurm-demo: no htc executable; run \`make slurm-demo\`" >&2; exit 1; }
HTC=$(cd "$(dirname "$HTC")" && pwd)/$(basename "$HTC")  # the pilots run it from Slurm's work dir
PY=${PY:-$(dirname "$HTC")/python}
[ -x "$PY" ] || PY=python3
[ "$(id -u)" = 0 ] || { echo "slurm-demo: the private Slurm's daemons run as root; run it as root" >&2; exit 1; }
DIR=${SLURM_DEMO_DIR:-.htc-slurm-demo}
SWEEP=${SWEEP:-examples/pi-sweep.yaml}
JOBS=${JOBS:-16}
PILOTS=${PILOTS:-2}
IDLE=${IDLE:-10s}

if [ -t 1 ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD="" PLAIN=""; fi
step() { printf '\n%s==> %s%s\n' "$BOLD" "$*" "$PLAIN"; }
json_field() { "$PY" -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

unset OPENHTC_DATABASE_URL OPENHTC_URL OPENHTC_API_KEY OPENHTC_PROJECT OPENHTC_TASK OPENHTC_DATA_DIR
# Wipe only a directory an earlier demo made (it holds the marker file), never other data.
if [ -e "$DIR" ] && [ ! -e "$DIR/.openhtc-slurm-demo" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; then
    echo "slurm-demo: $DIR exists and was not made by the demo; remove it or set SLURM_DEMO_DIR" >&2
    exit 1
fi
[ -e "$DIR" ] && "$PY" -m openhtc.testing.slurm down --dir "$DIR/slurm" >/dev/null 2>&1 || true
rm -rf "$DIR"
mkdir -p "$DIR/server"
touch "$DIR/.openhtc-slurm-demo"
DIR=$(cd "$DIR" && pwd)

step "python -m openhtc.testing.slurm up --dir $DIR/slurm   (munged, slurmctld, slurmd)"
"$PY" -m openhtc.testing.slurm up --dir "$DIR/slurm"
export SLURM_CONF="$DIR/slurm/slurm/slurm.conf"
export PATH="/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

SERVER_PID=""
finish() {
    local status=$?
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    step "python -m openhtc.testing.slurm down --dir $DIR/slurm"
    "$PY" -m openhtc.testing.slurm down --dir "$DIR/slurm" || true
    if [ "$status" -ne 0 ]; then
        echo "slurm-demo: failed (exit $status); the end of $DIR/server/server.log:" >&2
        tail -n 30 "$DIR/server/server.log" >&2 || true
    fi
    exit "$status"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export OPENHTC_URL="http://127.0.0.1:$PORT"
step "htc server --no-executor on $OPENHTC_URL (every job runs on a pilot; log in $DIR/server/server.log)"
# the pilots' agents run jobs as host processes (so no image needs pushing): OPENHTC_RUNTIME=process
OPENHTC_ALLOC_PERIOD_SECONDS=1 OPENHTC_ALLOC_AGENT_COMMAND="$HTC agent --runtime process" OPENHTC_RUNTIME=process \
    "$HTC" server --no-executor --data-dir "$DIR/server" --port "$PORT" >"$DIR/server/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 150); do
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "slurm-demo: the server exited during start-up" >&2; exit 1; }
    "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
        "$OPENHTC_URL/health" 2>/dev/null && break
    sleep 0.2
done
OPENHTC_API_KEY=$(cat "$DIR/server/admin-api-key")
export OPENHTC_API_KEY

step "htc alloc add slurm --region AWS_US_EAST_1 --time-limit 30m --max-pilots $PILOTS --pilot-vcpus 2 --idle-timeout $IDLE"
"$HTC" alloc add slurm --region AWS_US_EAST_1 --time-limit 30m --max-pilots "$PILOTS" --pilot-vcpus 2 \
    --idle-timeout "$IDLE"

step "htc submit -f $SWEEP -n $JOBS --wait   (pilots appear in squeue and run it)"
PROJECT=$("$HTC" projects create "pi on Slurm pilots" -d "Monte Carlo estimate of pi" --json | json_field projectId)
TASK=$("$HTC" tasks create "pi-sweep" -p "$PROJECT" --json | json_field taskId)
# --wait returns once every job ended; it exits 1 (ending the demo) if any failed
"$HTC" submit -p "$PROJECT" -t "$TASK" -f "$SWEEP" -n "$JOBS" --wait --poll 0.5
squeue
"$HTC" alloc ls

step "Waiting for the pilots to leave (each exits after $IDLE with nothing to run)"
for _ in $(seq 1 600); do
    [ -z "$(squeue -h -o %i)" ] && break
    sleep 0.5
done
step "squeue   (empty: no pilot remains)"
squeue
[ -z "$(squeue -h -o %i)" ] || { echo "slurm-demo: pilots are still in squeue" >&2; exit 1; }
step "htc alloc ls   (no live pilot)"
# the server notices a pilot left within a round (a second): ask until it shows none alive
for _ in $(seq 1 30); do
    LS=$("$HTC" alloc ls)
    case "$LS" in *" 0 pilots alive, "*) break ;; esac
    sleep 1
done
printf '%s\n' "$LS"
case "$LS" in *" 0 pilots alive, "*) ;; *) echo "slurm-demo: htc alloc ls still shows live pilots" >&2; exit 1 ;; esac
step "Done"
