#!/usr/bin/env bash
# Every measurement of BENCHMARKS.md, in one sitting, each a JSON file in
# OUTPUT_DIR: the buses against their ceilings, registrations against the
# Argon2 ceiling and against the Python peer (bench/peer). Needs a release
# build (cargo build --release), RabbitMQ with rabbitmqctl, and python3.
# It makes a RabbitMQ virtual host of its own and deletes it at the end.
set -u
cd "$(dirname "$0")/.."
H=./target/release/herald
out=${1:?usage: bench/all.sh OUTPUT_DIR}
mkdir -p "$out"
vhost=herald-bench-$$
rabbitmqctl add_vhost $vhost >/dev/null && rabbitmqctl set_permissions -p $vhost guest '.*' '.*' '.*' >/dev/null
AMQP="amqp://guest:guest@127.0.0.1:5672/$vhost"
for i in 1 2 3; do
  $H bench bus --events 20000 --compare-instrumentation --json > $out/bus-embedded-$i.json 2>/dev/null
  $H bench bus --events 20000 --publishers 64 --concurrency 256 --json > $out/bus-embedded-p64-$i.json 2>/dev/null
  $H bench bus --events 10000 --broker "$AMQP" --json > $out/bus-amqp-$i.json 2>/dev/null
done
for i in 1 2 3; do
  $H bench register --duration-secs 10 --ceiling-secs 3 --json > $out/register-sat-$i.json 2>/dev/null
done
$H bench register --rate 30 --duration-secs 15 --ceiling-secs 0 --json > $out/register-rate30.json 2>/dev/null
$H bench register --rate 55 --duration-secs 15 --ceiling-secs 0 --json > $out/register-rate55.json 2>/dev/null
# The peer
PEER_AMQP_URL="$AMQP" PEER_PORT=5177 bench/peer/run.sh > $out/peer.out 2>&1 &
peer=$!
for _ in $(seq 1 120); do grep -q "peer mail" $out/peer.out && break; sleep 1; done
mail=$(awk '/peer mail/ {print $3}' $out/peer.out)
data=$(dirname "$mail")
for i in 1 2 3; do
  $H bench register --target http://127.0.0.1:5177 --mail-dir "$mail" --duration-secs 10 --ceiling-secs 3 --json > $out/peer-sat-$i.json 2>/dev/null
done
$H bench register --target http://127.0.0.1:5177 --mail-dir "$mail" --rate 30 --duration-secs 15 --ceiling-secs 0 --json > $out/peer-rate30.json 2>/dev/null
bench/peer/rss.sh "$data" > $out/peer-rss.txt 2>&1
kill -TERM $peer; wait $peer
rabbitmqctl delete_vhost $vhost >/dev/null
echo "results in $out"
