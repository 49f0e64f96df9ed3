#!/usr/bin/env bash
# Write-path cost of pgtier's invalidation triggers: pgbench TPC-B (default
# script) straight against Postgres, alternating rounds without and with the
# triggers installed, while a pgtier listener is connected (as in production:
# notifications have a listener to deliver to).
#
#   benches/trigger_cost.sh [--rounds 3] [--duration 20] [--clients 8] [--threads 2] [--scale 10]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
rounds=3 duration=20 clients=8 threads=2 scale=10
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift ;;
    --duration) duration=$2; shift ;;
    --clients) clients=$2; shift ;;
    --threads) threads=$2; shift ;;
    --scale) scale=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
pg_isready -h 127.0.0.1 -p 5432 -q || { echo "Postgres is not running on 127.0.0.1:5432" >&2; exit 1; }
cargo build --release --quiet --manifest-path "$here/Cargo.toml"
bin="$here/target/release/pgtier"
db=pgtier_tpcb
control="postgres://postgres@127.0.0.1:5432/$db"

psql -h 127.0.0.1 -U postgres -d postgres -qAtc "select 1 from pg_database where datname='$db'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -d postgres -qc "create database $db"
"$bin" uninstall-triggers --control-url "$control" >/dev/null
pgbench -h 127.0.0.1 -U postgres -i -q -s "$scale" "$db" >/dev/null 2>&1

work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin" --listen "127.0.0.1:$port" --upstream 127.0.0.1:5432 --admin-listen "" --control-url "$control" \
  --pid-file "$work/pid" --upgrade-sock "$work/sock" --log-level warn >"$work/log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; "$bin" uninstall-triggers --control-url "$control" >/dev/null 2>&1 || true' EXIT

tps() {
  pgbench -h 127.0.0.1 -U postgres -n -c "$clients" -j "$threads" -T "$duration" "$db" 2>&1 | awk '/^tps = /{print int($3)}'
}

# Tables pgtier caches reads of are "watched": their writes are announced.
watch_all() {
  psql -h 127.0.0.1 -U postgres -d "$db" -qAtc \
    "select setval(('pgtier.w' || c.oid)::regclass, 2) from pg_class c join pg_trigger t on t.tgrelid = c.oid where t.tgname = 'pgtier_notify'" >/dev/null
}

echo "TPC-B, scale $scale, $clients clients, $threads threads, ${duration}s runs, $rounds rounds (alternating)"
without=0 idle=0 watched=0
for r in $(seq "$rounds"); do
  "$bin" uninstall-triggers --control-url "$control" >/dev/null
  a=$(tps)
  "$bin" install-triggers --control-url "$control" >/dev/null
  b=$(tps)
  watch_all
  c=$(tps)
  echo "  round $r: without triggers $a tps | triggers, tables not cached $b tps | triggers, tables cached (watched) $c tps"
  without=$((without + a)) idle=$((idle + b)) watched=$((watched + c))
done
without=$((without / rounds)) idle=$((idle / rounds)) watched=$((watched / rounds))
printf "average: without %d tps; with triggers on tables pgtier does not cache %d tps (cost %.1f%%); on tables it caches %d tps (cost %.1f%%)\n" \
  "$without" "$idle" "$(echo "(1 - $idle / $without) * 100" | bc -l)" "$watched" "$(echo "(1 - $watched / $without) * 100" | bc -l)"
