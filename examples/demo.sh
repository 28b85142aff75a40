#!/usr/bin/env bash
# The main job, end to end on the embedded default (SQLite, the supervised container registry,
# local executor, bubblewrap runtime): start `htc server`, log in with its admin key, create a
# project, build a small busybox image offline and push it to the project's registry with
# `htc image push`, submit the parameter sweep in examples/pi-sweep.yaml with a progress bar,
# show every job's result and the combined answer, and stop the server.
#
#   make demo                  # installs into .venv, then runs this script
#   make demo PORT=8090        # another port (default 8080; a free one if 8080 is taken)
#   bash examples/demo.sh      # with `htc` on PATH or in .venv/
#
# Environment: PORT, DATA_DIR (default .htc-demo; an earlier demo's is wiped at start, and it is
# kept afterwards for a look at server.log), HTC (the htc executable), PY (a python with
# openhtc installed), SWEEP (the job file, default examples/pi-sweep.yaml).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [ -z "${HTC:-}" ]; then
    if [ -x .venv/bin/htc ]; then HTC=.venv/bin/htc; else HTC=$(command -v htc || true); fi
fi
if [ -z "$HTC" ]; then
    echo "demo: no htc executable; run \`make demo\` (it installs openhtc into .venv)" >&2
    exit 1
fi
PY=${PY:-$(dirname "$HTC")/python}
[ -x "$PY" ] || PY=python3
DATA_DIR=${DATA_DIR:-.htc-demo}
SWEEP=${SWEEP:-examples/pi-sweep.yaml}

if [ -t 1 ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD="" PLAIN=""; fi
step() { printf '\n%s==> %s%s\n' "$BOLD" "$*" "$PLAIN"; }
json_field() { "$PY" -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
port_free() {
    "$PY" - "$1" <<'EOF'
import socket, sys
with socket.socket() as s:
    # As the server binds: connections of a previous run in TIME_WAIT do not make it "in use".
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", int(sys.argv[1])))
    except OSError:
        sys.exit(1)
EOF
}

# -- a port ---------------------------------------------------------------------------------
if [ -n "${PORT:-}" ]; then
    port_free "$PORT" || { echo "demo: port $PORT is in use; choose another with PORT=…" >&2; exit 1; }
else
    PORT=8080
    if ! port_free "$PORT"; then
        PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        echo "demo: port 8080 is in use; using port $PORT instead"
    fi
fi
URL="http://127.0.0.1:$PORT"

# -- the server -----------------------------------------------------------------------------
# The demo runs on the embedded default whatever the caller's environment says.
unset OPENHTC_DATABASE_URL OPENHTC_HOST OPENHTC_PORT OPENHTC_DATA_DIR OPENHTC_EXECUTOR \
    OPENHTC_RUNTIME OPENHTC_PROJECT OPENHTC_TASK OPENHTC_URL OPENHTC_API_KEY

step "Starting htc server on $URL (data in $DATA_DIR/, log in $DATA_DIR/server.log)"
# Wipe only a directory an earlier demo made (it holds the marker file), never other data.
if [ -e "$DATA_DIR" ] && [ ! -e "$DATA_DIR/.openhtc-demo" ] && [ -n "$(ls -A "$DATA_DIR" 2>/dev/null)" ]; then
    echo "demo: $DATA_DIR exists and was not made by the demo; remove it or set DATA_DIR" >&2
    exit 1
fi
rm -rf "$DATA_DIR"
mkdir -p "$DATA_DIR"
touch "$DATA_DIR/.openhtc-demo"
"$HTC" server --data-dir "$DATA_DIR" --port "$PORT" >"$DATA_DIR/server.log" 2>&1 &
SERVER_PID=$!

stop_server() {
    local status=$?
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        echo "demo: server stopped"
    fi
    if [ "$status" -ne 0 ] && [ "$status" -ne 130 ] && [ "$status" -ne 143 ] && [ -f "$DATA_DIR/server.log" ]; then
        echo "demo: failed (exit $status); the end of $DATA_DIR/server.log:" >&2
        tail -n 30 "$DATA_DIR/server.log" >&2
    fi
    exit "$status"
}
trap stop_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for _ in $(seq 1 150); do
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "demo: the server exited during start-up" >&2; exit 1; }
    if "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
        "$URL/health" 2>/dev/null; then
        break
    fi
    sleep 0.2
done
"$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$URL/health" \
    || { echo "demo: the server did not answer $URL/health within 30 s" >&2; exit 1; }
grep -m1 -o 'executor runtime: .*' "$DATA_DIR/server.log" || true
echo "ready."

# -- credentials ----------------------------------------------------------------------------
# The first start wrote the admin API key to DATA_DIR/admin-api-key (mode 0600). The demo
# passes it through the environment; `htc login` would store it in ~/.config/openhtc instead.
export OPENHTC_URL="$URL"
OPENHTC_API_KEY=$(cat "$DATA_DIR/admin-api-key")
export OPENHTC_API_KEY
step "htc whoami"
"$HTC" whoami

# -- project, task, sweep -------------------------------------------------------------------
step "htc projects create / htc tasks create"
PROJECT=$("$HTC" projects create "pi demo" -d "Monte Carlo estimate of pi" --json | json_field projectId)
TASK=$("$HTC" tasks create "pi-sweep" -p "$PROJECT" --json | json_field taskId)
echo "project $PROJECT"
echo "task    $TASK"

# -- the image ------------------------------------------------------------------------------
# No internet registry is needed: the image is a root filesystem holding the host's static
# busybox (Debian package busybox-static), imported into podman. Any image you have locally
# (podman build, podman pull) is pushed the same way.
step "podman import a busybox image; htc image push localhost/pi-demo:1"
ROOTFS="$DATA_DIR/pi-demo-rootfs"
mkdir -p "$ROOTFS/bin" "$ROOTFS/etc" "$ROOTFS/tmp" "$ROOTFS/proc" "$ROOTFS/dev" "$ROOTFS/sys"
cp /bin/busybox "$ROOTFS/bin/busybox"
for applet in sh awk echo cat; do ln -sf busybox "$ROOTFS/bin/$applet"; done
tar -C "$ROOTFS" -cf "$DATA_DIR/pi-demo.tar" .
podman import --change 'CMD ["/bin/sh"]' "$DATA_DIR/pi-demo.tar" localhost/pi-demo:1 >/dev/null
"$HTC" image push localhost/pi-demo:1 -p "$PROJECT"

step "htc submit -p \$PROJECT -t \$TASK -f $SWEEP --wait"
"$HTC" submit -p "$PROJECT" -t "$TASK" -f "$SWEEP" --wait --poll 0.5

# -- results --------------------------------------------------------------------------------
step "htc jobs -p \$PROJECT -t \$TASK"
"$HTC" jobs -p "$PROJECT" -t "$TASK" --limit 0

step "htc logs JOB_ID, for every job of the sweep"
JOB_IDS=$("$HTC" jobs -p "$PROJECT" -t "$TASK" --limit 0 --json | "$PY" -c '
import json, sys
jobs = json.load(sys.stdin)
for job_id in sorted((j["jobUUID"] for j in jobs), key=lambda i: int(i.rpartition(":")[2])):
    print(job_id)')
RESULTS=""
for job_id in $JOB_IDS; do
    line=$("$HTC" logs "$job_id" -p "$PROJECT" -t "$TASK" | tail -n 1)
    printf '%-40s %s\n' "$job_id" "$line"
    RESULTS+="$line"$'\n'
done

step "Combined answer"
printf '%s' "$RESULTS" | awk '
    {
        for (i = 1; i <= NF; i++) {
            split($i, kv, "=")
            if (kv[1] == "samples") samples += kv[2]
            if (kv[1] == "inside") inside += kv[2]
        }
        jobs++
    }
    END {
        if (samples == 0) { print "no results"; exit 1 }
        pi = 4 * inside / samples
        err = pi - 3.14159265358979
        if (err < 0) err = -err
        printf "%d jobs, %d samples: pi ~ %.6f (off by %.6f)\n", jobs, samples, pi, err
    }'

step "Done"
echo "The server stops now; its data stays in $DATA_DIR/ until the next \`make demo\`."
echo "To keep one running: $HTC server   (README.md and docs/quickstart-cli.md tell the rest);"
echo "its dashboard is then at http://127.0.0.1:8080/ui/ (sign in with the admin key; docs/dashboard.md)"
