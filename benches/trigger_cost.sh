#!/usr/bin/env bash
# Write-path cost of pgtier's invalidation triggers: pgbench TPC-B (default
# script) straight against Postgres, alternating rounds without and with the
# triggers installed, while a pgtier listener is connected (as in production:
# notifications have a listener to deliver to).
#
#   benches/trigger_cost.sh [--rounds 3] [--duration 20] [--clients 8] [--threads 2] [--scale 10]
#
# Scenarios: no triggers; triggers on tables pgtier does not cache; tables pgtier
# caches (watched by reading them through pgtier), with writes only and with a
# light read load through pgtier; and every write announced (the cost of a
# notification per transaction, which unwatch_on_write avoids); and with
# key-level invalidation (`--key-level`, issue 14), where the reads by key keep
# pgbench_accounts and pgbench_branches cached and their writes report keys
# through the key triggers (compare with "cached, reads through pgtier", the
# table-level announcements of the same load).
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
printf '[invalidation]\nunwatch_on_write = false\n' >"$work/announce-all.toml"
pid=""
start_pgtier() { # [extra args]
  "$bin" --listen "127.0.0.1:$port" --upstream 127.0.0.1:5432 --admin-listen "" --control-url "$control" \
    --pid-file "$work/pid" --upgrade-sock "$work/sock" --log-level warn "$@" >>"$work/log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
}
stop_pgtier() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
start_pgtier
trap 'stop_pgtier; "$bin" uninstall-triggers --control-url "$control" >/dev/null 2>&1 || true' EXIT

tps() { # [extra pgbench args]
  pgbench -h 127.0.0.1 -U postgres -n -c "$clients" -j "$threads" -T "$duration" "$@" "$db" 2>&1 | awk '/^tps = /{print int($3)}'
}

# A light read load through pgtier on the tables TPC-B writes (1 client, at
# most 500 reads/s): as in production, reads keep asking pgtier to cache the
# tables while writers change them.
reads=$(mktemp)
cat >"$reads" <<'SQL'
\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SELECT bbalance FROM pgbench_branches WHERE bid = :bid;
SQL
with_reads() { # command...
  pgbench -h 127.0.0.1 -p "$port" -U postgres -n -c 1 -R 500 -T "$((duration + 2))" -f "$reads" "$db" >"$work/reads.log" 2>&1 &
  local r=$!
  "$@"
  wait "$r" || { echo "read load through pgtier failed:" >&2; cat "$work/reads.log" >&2; exit 1; }
  grep -q "failed transactions: 0 " "$work/reads.log" || { cat "$work/reads.log" >&2; exit 1; }
}

# pgtier watches a table once it wants to cache a read of it: read each through
# pgtier until its watch sequence says its writes are announced.
watch_by_reading() {
  for t in pgbench_accounts pgbench_branches pgbench_tellers pgbench_history; do
    for _ in $(seq 200); do
      psql -h 127.0.0.1 -p "$port" -U postgres -d "$db" -qAtc "select count(*) from (select 1 from $t limit 1) s" >/dev/null
      on=$(psql -h 127.0.0.1 -U postgres -d "$db" -qAtc "select pg_sequence_last_value(('pgtier.w' || '$t'::regclass::oid)::regclass)")
      [ "$on" = 2 ] && break
      sleep 0.01
    done
    [ "$on" = 2 ] || { echo "pgtier never watched $t" >&2; exit 1; }
  done
}

# Every write announced, as when unwatch_on_write = false and reads keep the
# tables cached (run by a pgtier so configured).
announce_all() {
  psql -h 127.0.0.1 -U postgres -d "$db" -qAtc \
    "select setval(('pgtier.w' || c.oid)::regclass, 2) from pg_class c join pg_trigger t on t.tgrelid = c.oid where t.tgname = 'pgtier_notify'" >/dev/null
}

pct() { echo "(1 - $1 / $2) * 100" | bc -l; }

echo "TPC-B, scale $scale, $clients clients, $threads threads, ${duration}s runs, $rounds rounds (alternating)"
a=0 b=0 c=0 d=0 e=0 f=0 k=0
for r in $(seq "$rounds"); do
  "$bin" uninstall-triggers --control-url "$control" >/dev/null
  ra=$(tps)
  rd=$(with_reads tps)
  "$bin" install-triggers --control-url "$control" >/dev/null
  rb=$(tps)
  watch_by_reading
  rc=$(tps)
  re=$(with_reads tps)
  stop_pgtier
  start_pgtier --config "$work/announce-all.toml"
  announce_all
  rf=$(tps)
  stop_pgtier
  # Key-level: a first run of reads registers the key columns (and leaves the
  # key triggers in place), the second is measured.
  start_pgtier --key-level
  with_reads tps >/dev/null
  rk=$(with_reads tps)
  stop_pgtier
  start_pgtier
  echo "  round $r: no triggers $ra | triggers, not cached $rb | cached, writes only $rc | every write announced $rf | with reads through pgtier: no triggers $rd, cached $re, key-level $rk"
  a=$((a + ra)) b=$((b + rb)) c=$((c + rc)) d=$((d + rd)) e=$((e + re)) f=$((f + rf)) k=$((k + rk))
done
a=$((a / rounds)) b=$((b / rounds)) c=$((c / rounds)) d=$((d / rounds)) e=$((e / rounds)) f=$((f / rounds)) k=$((k / rounds))
echo "average TPS (cost against the same load without triggers):"
printf "  triggers, tables not cached:          %6d vs %6d  cost %5.1f%%\n" "$b" "$a" "$(pct "$b" "$a")"
printf "  tables cached, writes only:           %6d vs %6d  cost %5.1f%%\n" "$c" "$a" "$(pct "$c" "$a")"
printf "  tables cached, reads through pgtier:  %6d vs %6d  cost %5.1f%%\n" "$e" "$d" "$(pct "$e" "$d")"
printf "  every write announced:                %6d vs %6d  cost %5.1f%%\n" "$f" "$a" "$(pct "$f" "$a")"
printf "  key-level, reads by key through pgtier: %6d vs %6d  cost %5.1f%%\n" "$k" "$d" "$(pct "$k" "$d")"
