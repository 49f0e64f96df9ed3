#!/usr/bin/env bash
# How many write transactions per second Postgres commits when each one sends
# a NOTIFY, against the same writes without: the ceiling of announced writes on
# this machine, whatever pgtier does. Postgres serialises the commits of
# notifying transactions (a database-wide lock held through the commit record's
# flush), so they cannot share a WAL flush the way plain commits do.
#
#   benches/notify_ceiling.sh                  # scale 10, 8 clients, 10 s runs, 2 rounds
#   options: --scale N --clients N --threads N --duration S --rounds N
#
# Prints TPS per round for: single-row UPDATEs of pgbench_accounts (plain), the
# same with a NOTIFY in the transaction (notify), and the ratio.
# Needs the local Postgres on 127.0.0.1:5432 (see README).
set -euo pipefail
clients=8 threads=2 duration=10 rounds=2 scale=10
while [ $# -gt 0 ]; do
  case "$1" in
    --scale) scale=$2; shift ;;
    --clients) clients=$2; shift ;;
    --threads) threads=$2; shift ;;
    --duration) duration=$2; shift ;;
    --rounds) rounds=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[[ "$scale" =~ ^[1-9][0-9]*$ ]] || { echo "--scale must be a positive integer" >&2; exit 2; }
pg_isready -h 127.0.0.1 -p 5432 -q || { echo "Postgres is not running on 127.0.0.1:5432" >&2; exit 1; }
db=pgtier_notify_ceiling
sql() { psql -h 127.0.0.1 -U postgres -d "$1" -qAtX -c "$2"; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sql postgres "select 1 from pg_database where datname='$db'" | grep -q 1 || sql postgres "create database $db"
if [ "$(sql "$db" "select count(*) from pgbench_branches" 2>/dev/null || echo 0)" != "$scale" ]; then
  pgbench -h 127.0.0.1 -U postgres -i -q -s "$scale" "$db" >"$work/init.log" 2>&1 \
    || { cat "$work/init.log" >&2; exit 1; }
fi
n=$((100000 * scale))
printf '\\set aid random(1, %d)\nUPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n' "$n" >"$work/plain.sql"
printf '\\set aid random(1, %d)\nBEGIN;\nUPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\nSELECT pg_notify(%s, %s);\nCOMMIT;\n' \
  "$n" "'pgtier_notify_ceiling'" "'k'" >"$work/notify.sql"
tps() {
  pgbench -h 127.0.0.1 -U postgres -n -M prepared -c "$clients" -j "$threads" -T "$duration" \
    -f "$work/$1.sql" "$db" >"$work/out" 2>&1 || { cat "$work/out" >&2; return 1; }
  awk '/^tps = /{print int($3)}' "$work/out"
}
echo "single-row updates, $clients clients, ${duration}s per run;" \
  "synchronous_commit=$(sql postgres 'show synchronous_commit'), wal_sync_method=$(sql postgres 'show wal_sync_method')"
printf "%6s %10s %10s %7s\n" round plain notify ratio
for r in $(seq "$rounds"); do
  p=$(tps plain)
  q=$(tps notify)
  printf "%6d %10d %10d %7s\n" "$r" "$p" "$q" "$(awk "BEGIN{printf \"%.2f\", $q / $p}")"
done
