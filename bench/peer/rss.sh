#!/usr/bin/env bash
# How much memory the running peer holds: every process run.sh started
# (SMTP sink, Celery worker, gunicorn master) and all their descendants
# (Celery's pool processes, gunicorn's workers), summed.
#
#   bench/peer/rss.sh DATA_DIR
#
# DATA_DIR is the one run.sh printed (it holds the `pids` file). Prints,
# per process and in total:
#   peak  VmHWM, the most each process has held resident since it began.
#         Summed, it is an upper bound on the peer's peak: the processes
#         need not peak together, and pages shared after fork are counted
#         in each. herald reports VmHWM of its single process.
#   now   VmRSS, resident now, shared pages counted in each process.
#   pss   resident now with each shared page split among its sharers,
#         so the total is what the peer really occupies at this moment.
set -euo pipefail

data=${1:?usage: rss.sh DATA_DIR (printed by run.sh)}
pid_file=$data/pids
[[ -r $pid_file ]] || { echo "rss.sh: no $pid_file" >&2; exit 1; }

# The process and its descendants, depth first; bounded by the process
# tree, which is finite.
with_descendants() {
    local pid=$1 child
    echo "$pid"
    for child in $(cat /proc/"$pid"/task/*/children 2>/dev/null); do
        with_descendants "$child"
    done
}

# The value in KiB of field $2 in /proc file $1, or 0.
kib() {
    awk -v field="$2:" '$1 == field { print $2; found = 1 }
        END { if (!found) print 0 }' "$1" 2>/dev/null || echo 0
}

printf '%8s %-40s %10s %10s %10s\n' pid command 'peak KiB' 'now KiB' 'pss KiB'
total_peak=0 total_now=0 total_pss=0
while read -r main; do
    for pid in $(with_descendants "$main"); do
        [[ -r /proc/$pid/status ]] || continue
        # The command line without directories, to fit the column.
        command=$(tr '\0' ' ' </proc/"$pid"/cmdline |
            sed 's#[^ ]*/##g' | cut -c1-40)
        peak=$(kib /proc/"$pid"/status VmHWM)
        now=$(kib /proc/"$pid"/status VmRSS)
        pss=$(kib /proc/"$pid"/smaps_rollup Pss)
        printf '%8s %-40s %10s %10s %10s\n' \
            "$pid" "$command" "$peak" "$now" "$pss"
        total_peak=$((total_peak + peak))
        total_now=$((total_now + now))
        total_pss=$((total_pss + pss))
    done
done <"$pid_file"

mib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }
echo "total: peak (sum of VmHWM) $(mib $total_peak)," \
    "now (VmRSS) $(mib $total_now), now (Pss) $(mib $total_pss)"
