#!/usr/bin/env bash
# Runs the Python peer of herald's reference system on 127.0.0.1: an SMTP
# sink filing mail in a Maildir, a Celery worker sending the welcome
# emails, and the Flask users service under gunicorn. Prints the URL and
# the Maildir once /healthz answers, then serves until Ctrl-C or SIGTERM,
# when it stops all three by PID.
#
#   bench/peer/run.sh
#
# Environment (all optional):
#   PEER_AMQP_URL   RabbitMQ URL with its virtual host. Without it, the
#                   script uses a virtual host `herald-peer` on the local
#                   RabbitMQ as guest, creating it with rabbitmqctl (and
#                   deleting it on exit) when it does not exist.
#   PEER_PORT       HTTP port, 5100.
#   PEER_SMTP_PORT  the SMTP sink's port, 5125.
#   PEER_WORKERS    gunicorn sync workers, 5 (see gunicorn.conf.py).
#   PEER_CONCURRENCY  Celery prefork processes, 2 (one per core).
#   PEER_DATA_DIR   where the database, Maildir and logs go. Without it,
#                   a fresh temporary directory, removed on exit.
#   PEER_VENV       the virtualenv, bench/peer/.venv; created and filled
#                   from requirements.txt on first use.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

port=${PEER_PORT:-5100}
smtp_port=${PEER_SMTP_PORT:-5125}
concurrency=${PEER_CONCURRENCY:-2}
venv=${PEER_VENV:-$here/.venv}
vhost_created=
pids=()

if [[ -n ${PEER_DATA_DIR:-} ]]; then
    data=$PEER_DATA_DIR
    data_is_temporary=
    mkdir -p "$data"
else
    data=$(mktemp -d -t herald-peer.XXXXXX)
    data_is_temporary=1
fi
data=$(cd "$data" && pwd)

# Stops what this script started, newest first, each by its PID; a
# process still there after 10 seconds is killed.
stop_all() {
    local pid
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill -TERM "${pids[i]}" 2>/dev/null || true
    done
    for _ in $(seq 1 100); do
        local alive=
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        [[ -z $alive ]] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    pids=()
    if [[ -n $vhost_created ]]; then
        rabbitmqctl -q delete_vhost "$vhost_created" >/dev/null || true
    fi
    if [[ -n $data_is_temporary ]]; then
        rm -rf "$data"
    fi
}
trap stop_all EXIT
trap 'exit 0' INT TERM

# Shows a log's end and stops everything: for start-up failures.
fail() {
    echo "run.sh: $1" >&2
    [[ -n ${2:-} && -f $2 ]] && tail -n 30 "$2" >&2
    exit 1
}

# Waits up to $2 seconds for the command line "$1" to succeed, trying
# every tenth of a second.
wait_until() {
    local deadline=$((SECONDS + $2))
    for _ in $(seq 1 $(($2 * 10))); do
        eval "$1" && return 0
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
    return 1
}

# The virtualenv, filled again whenever requirements.txt changes.
if ! cmp -s requirements.txt "$venv/requirements.installed"; then
    echo "installing the peer's requirements into $venv" >&2
    [[ -x $venv/bin/python ]] || python3 -m venv "$venv"
    timeout 600 "$venv/bin/pip" install --quiet --disable-pip-version-check \
        --timeout 60 -r requirements.txt
    cp requirements.txt "$venv/requirements.installed"
fi

# The broker: as given, or a virtual host of the peer's own.
if [[ -z ${PEER_AMQP_URL:-} ]]; then
    if ! command -v rabbitmqctl >/dev/null; then
        fail "set PEER_AMQP_URL (no rabbitmqctl to create a virtual host)"
    fi
    vhost=herald-peer
    if ! rabbitmqctl -q list_vhosts | grep -qx "$vhost"; then
        rabbitmqctl -q add_vhost "$vhost" >/dev/null
        vhost_created=$vhost
    fi
    rabbitmqctl -q set_permissions -p "$vhost" guest '.*' '.*' '.*' >/dev/null
    PEER_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/$vhost"
fi

mkdir -p "$data/mail/new" "$data/mail/cur" "$data/mail/tmp" "$data/logs"
export PEER_AMQP_URL PEER_PORT=$port PEER_SMTP_PORT=$smtp_port
export PEER_SMTP_HOST=127.0.0.1 PEER_DATABASE=$data/peer.db
export PYTHONPATH=$here PYTHONUNBUFFERED=1
logs=$data/logs

# 1. The SMTP sink, so that the first email has somewhere to go.
"$venv/bin/python" smtp_sink.py --port "$smtp_port" \
    --maildir "$data/mail" >"$logs/smtp.log" 2>&1 &
pids+=($!)
wait_until "grep -q listening '$logs/smtp.log'" 10 ||
    fail "the SMTP sink did not start within 10 s" "$logs/smtp.log"

# 2. The Celery worker: prefork, one process per core by default.
"$venv/bin/celery" -A tasks worker --pool prefork \
    --concurrency "$concurrency" --loglevel INFO \
    --hostname "peer@%h" >"$logs/celery.log" 2>&1 &
pids+=($!)
wait_until "grep -q ' ready\.' '$logs/celery.log'" 30 ||
    fail "the Celery worker was not ready within 30 s" "$logs/celery.log"

# 3. The users service.
"$venv/bin/gunicorn" -c gunicorn.conf.py 'app:create_app()' \
    >"$logs/gunicorn.log" 2>&1 &
pids+=($!)
url=http://127.0.0.1:$port
wait_until "curl -sf -m 1 -o /dev/null '$url/healthz'" 30 ||
    fail "gunicorn did not answer /healthz within 30 s" "$logs/gunicorn.log"

printf '%s\n' "${pids[@]}" >"$data/pids"
echo "peer users  $url  POST /user/register, GET /healthz"
echo "peer mail   $data/mail"
echo "peer logs   $logs"
echo "peer memory bench/peer/rss.sh $data"

# Serve until a signal, or until one of the three exits by itself.
set +e
wait -n "${pids[@]}"
status=$?
echo "run.sh: a peer process exited (status $status); stopping" >&2
exit 1
