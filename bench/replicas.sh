#!/usr/bin/env bash
# Registrations per second with one users replica against two, on RabbitMQ
# and PostgreSQL, in one run: each round starts a mailer and N users
# replicas on a fresh database, drives them at saturation with
# `herald bench register`, and stops them. Rounds alternate 1, 2, 1, 2...
#
#   bench/replicas.sh [rounds] [seconds]
#
# Needs a release build, RabbitMQ with rabbitmqctl on this machine, and
# PostgreSQL (BENCH_POSTGRES_URL: a server where the user may create
# databases). Each round runs on a RabbitMQ virtual host and a database of
# its own, both deleted afterwards, so nothing else on the servers is
# touched. BENCH_AMQP_SERVER names the broker, without a virtual host.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-2}
seconds=${2:-15}
server=${BENCH_AMQP_SERVER:-amqp://guest:guest@127.0.0.1:5672}
amqp_user=${BENCH_AMQP_USER:-guest}
admin=${BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
herald=./target/release/herald
work=$(mktemp -d)
pids=()

stop_all() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    pids=()
}
trap 'stop_all; rm -rf "$work"' EXIT

# Waits for a process's start-up line in its log.
wait_for() {
    for _ in $(seq 1 100); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "no '$2' in $1:" >&2; cat "$1" >&2; exit 1
}

round() {
    local replicas=$1 name="herald_bench_$RANDOM$RANDOM"
    psql "$admin" -X -q -c "CREATE DATABASE $name"
    local database="${admin%/*}/$name" dir="$work/$name"
    mkdir -p "$dir"
    rabbitmqctl -q add_vhost "$name" >/dev/null
    rabbitmqctl -q set_permissions -p "$name" "$amqp_user" '.*' '.*' '.*' >/dev/null
    export HERALD_BROKER="$server/$name" HERALD_DATABASE="$database" HERALD_LOG=warn

    "$herald" serve mailer --data-dir "$dir/mailer" --mail-dir "$dir/mail" \
        >"$dir/mailer.log" 2>&1 &
    pids+=($!)
    wait_for "$dir/mailer.log" '^mailer '
    local targets=()
    for i in $(seq 1 "$replicas"); do
        "$herald" serve users --data-dir "$dir/users-$i" --listen 127.0.0.1:0 \
            >"$dir/users-$i.log" 2>&1 &
        pids+=($!)
        wait_for "$dir/users-$i.log" '^users '
        targets+=(--target "$(grep -o 'http://[0-9.:]*' "$dir/users-$i.log")")
    done

    "$herald" bench register "${targets[@]}" --mail-dir "$dir/mail" \
        --duration-secs "$seconds" --concurrency 16 --ceiling-secs 5 --json \
        >"$dir/result.json"
    python3 - "$replicas" "$dir/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
reg, mail = r["registrations"], r["register_to_email"]
print(f"replicas {sys.argv[1]}: {reg['per_second']:6.1f} registrations/s, "
      f"Argon2 ceiling {r['argon2_ceiling_per_second']:6.1f}/s "
      f"(ratio {r['ratio_to_ceiling']:.2f}), http p99 "
      f"{reg['http']['p99_ms']:.0f} ms, emails {mail['found']}/"
      f"{reg['accepted']} (missing {mail['missing']})", flush=True)
PY
    stop_all
    psql "$admin" -X -q -c "DROP DATABASE $name WITH (FORCE)"
    rabbitmqctl -q delete_vhost "$name" >/dev/null
}

for _ in $(seq 1 "$rounds"); do
    round 1
    round 2
done
