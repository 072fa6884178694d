#!/usr/bin/env bash
# Every measurement of BENCHMARKS.md, in one sitting, each a JSON file in
# OUTPUT_DIR, with the machine and versions in OUTPUT_DIR/versions.txt and
# every command's diagnostics in OUTPUT_DIR/log: the buses against their
# ceilings, registrations against the Argon2 ceiling and against the
# Python peer (bench/peer). Needs a release build (cargo build --release),
# RabbitMQ with rabbitmqctl, and python3. It makes a RabbitMQ virtual host
# of its own and deletes it at the end, interrupted or not; the first
# failing step stops it with an error.
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: bench/all.sh OUTPUT_DIR}
mkdir -p "$out"
log="$out/log"
: > "$log"
herald=./target/release/herald
[ -x "$herald" ] || { echo "build first: cargo build --release" >&2; exit 2; }

vhost="herald-bench-$$"
peer=""
cleanup() {
    if [ -n "$peer" ] && kill -0 "$peer" 2>/dev/null; then
        kill -TERM "$peer" && wait "$peer" || true
    fi
    rabbitmqctl delete_vhost "$vhost" >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rabbitmqctl add_vhost "$vhost" >/dev/null
rabbitmqctl set_permissions -p "$vhost" guest '.*' '.*' '.*' >/dev/null
amqp="amqp://guest:guest@127.0.0.1:5672/$vhost"

{
    date -u
    uname -srm
    nproc
    grep -m1 'model name' /proc/cpuinfo || true
    rustc --version
    "$herald" --version
    rabbitmqctl version
    python3 --version
} > "$out/versions.txt" 2>&1

# Runs one measurement into OUTPUT_DIR/NAME.json, diagnostics to the log.
measure() {
    local name=$1
    shift
    echo "$name" >&2
    echo "== $name: $*" >> "$log"
    if ! "$@" --json > "$out/$name.json" 2>> "$log"; then
        echo "bench/all.sh: $name failed; see $log" >&2
        exit 1
    fi
}

for i in 1 2 3; do
    measure "bus-embedded-$i" "$herald" bench bus --events 20000 \
        --compare-instrumentation
    measure "bus-embedded-p64-$i" "$herald" bench bus --events 20000 \
        --publishers 64 --concurrency 256
    measure "bus-amqp-$i" "$herald" bench bus --events 10000 --broker "$amqp"
done
for i in 1 2 3; do
    measure "register-sat-$i" "$herald" bench register --duration-secs 10 \
        --ceiling-secs 3
done
measure register-rate30 "$herald" bench register --rate 30 \
    --duration-secs 15 --ceiling-secs 0
measure register-rate55 "$herald" bench register --rate 55 \
    --duration-secs 15 --ceiling-secs 0

# The Python peer, on ports of its own, driven the same way.
PEER_AMQP_URL="$amqp" PEER_PORT=5177 PEER_SMTP_PORT=5178 \
    bench/peer/run.sh > "$out/peer.out" 2>&1 &
peer=$!
for _ in $(seq 1 180); do
    grep -q "peer mail" "$out/peer.out" && break
    kill -0 "$peer" 2>/dev/null || break
    sleep 1
done
mail=$(awk '/peer mail/ {print $3}' "$out/peer.out")
if [ -z "$mail" ]; then
    echo "bench/all.sh: the peer did not start; see $out/peer.out" >&2
    exit 1
fi
for i in 1 2 3; do
    measure "peer-sat-$i" "$herald" bench register \
        --target http://127.0.0.1:5177 --mail-dir "$mail" \
        --duration-secs 10 --ceiling-secs 3
done
measure peer-rate30 "$herald" bench register \
    --target http://127.0.0.1:5177 --mail-dir "$mail" \
    --rate 30 --duration-secs 15 --ceiling-secs 0
bench/peer/rss.sh "$(dirname "$mail")" > "$out/peer-rss.txt" 2>&1

echo "results in $out"
