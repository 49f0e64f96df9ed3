#!/usr/bin/env bash
# Warming hot keys (issue 14): the same pgtier build with warming on and off,
# hot keys read and written, alternating runs: pgtier's L1 hit ratio of the
# reads and the load that reached Postgres.
#
#   reads:  \set aid random_zipfian(1, 100000 * scale, 1.1)
#           SELECT abalance FROM pgbench_accounts WHERE aid = :aid
#   writes: the same zipfian key, UPDATE pgbench_accounts SET abalance = abalance + 1
#           (hot keys are the ones written: each write kills a key readers want)
#   as weighted pgbench scripts, --writes percent of transactions.
#
#   benches/warm.sh                    # scale 1, 10 s runs, -M prepared, 5 % writes, 2 rounds
#   options: --bin PATH (default: target/debug/pgtier, built if missing) --scale 1
#            --duration 10 --writes 5 --rounds 2 --mode prepared --clients 8 --threads 2
#            --table-level (without --key-level: every write kills the table's entries)
#            --idle N (N more connections through pgtier, mostly idle as in an
#            application's pool (a second pgbench, 2 transactions/s in all):
#            pgbench's own are rarely idle at full load)
#            --keys N (reads and writes over keys 1..N only: a hot set that stays
#            cached, so the misses left are the ones writes cause)
#
# Each setting caches its own copy of the database (warm on: `pgtier_warm_on`,
# off: `pgtier_warm_off`, `cache.warm_hot_keys = false`), both with
# --key-level, --watch eager, --default-ttl 600s, `warm_after_hits` at its
# default. Per run:
#   hit   = L1 hit ratio of the reads, as benches/keyed.sh computes it
#   pg/tx = transactions Postgres committed in that database (pg_stat_database
#           xact_commit, read after the stats flush) per pgbench transaction:
#           the share of the load that still reaches Postgres
#   warm  = pgtier_warm_refreshes_total filled/dropped/failed during the run
set -euo pipefail
shopt -s inherit_errexit

here=$(cd "$(dirname "$0")/.." && pwd)
clients=8 threads=2 duration=10 scale=1 writes=5 rounds=2 mode=prepared
bin="" key_level=--key-level idle=0 keys=
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift ;;
    --scale) scale=$2; shift ;;
    --duration) duration=$2; shift ;;
    --writes) writes=$2; shift ;;
    --rounds) rounds=$2; shift ;;
    --mode) mode=$2; shift ;;
    --clients) clients=$2; shift ;;
    --threads) threads=$2; shift ;;
    --table-level) key_level="" ;;
    --idle) idle=$2; shift ;;
    --keys) keys=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
pg_isready -h 127.0.0.1 -p 5432 -q || { echo "Postgres is not running on 127.0.0.1:5432" >&2; exit 1; }
if [ -z "$bin" ]; then
  bin="$here/target/debug/pgtier"
  [ -x "$bin" ] || cargo build --quiet --manifest-path "$here/Cargo.toml"
fi
sql() { local d=$1; shift; psql -h 127.0.0.1 -U postgres -d "$d" -qAtX "$@"; }
free_ports() {
  python3 -c 'import socket,sys
ss=[socket.socket() for _ in range(int(sys.argv[1]))]
for s in ss: s.bind(("127.0.0.1",0))
print(" ".join(str(s.getsockname()[1]) for s in ss))' "$1"
}
work=$(mktemp -d)
pids=()
cleanup() {
  local rc=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "$rc" = 0 ]; then rm -rf "$work"; else echo "logs kept in $work" >&2; fi
}
trap cleanup EXIT

template=pgtier_warm_bench
sql postgres -c "select 1 from pg_database where datname='$template'" | grep -q 1 \
  || sql postgres -c "create database $template"
if [ "$(sql "$template" -c "select count(*) from pgbench_branches" 2>/dev/null || echo 0)" != "$scale" ]; then
  pgbench -h 127.0.0.1 -U postgres -i -q -s "$scale" "$template" >"$work/init.log" 2>&1 \
    || { cat "$work/init.log" >&2; exit 1; }
fi
sql "$template" -c "vacuum analyze" >/dev/null
for s in on off; do
  sql postgres -c "set client_min_messages = warning" -c "drop database if exists pgtier_warm_$s with (force)" \
    -c "create database pgtier_warm_$s template $template" >/dev/null
done
"$bin" uninstall-triggers --control-url "postgres://postgres@127.0.0.1:5432/$template" >/dev/null 2>&1 || true

declare -A PORT ADMIN
start() { # setting
  local s=$1 dir=$work/$1
  mkdir -p "$dir"
  read -r "PORT[$s]" "ADMIN[$s]" <<<"$(free_ports 2)"
  local on=true
  [ "$s" = off ] && on=false
  printf '[cache]\nwarm_hot_keys = %s\n' "$on" >"$dir/pgtier.toml"
  # shellcheck disable=SC2086
  "$bin" --config "$dir/pgtier.toml" --listen "127.0.0.1:${PORT[$s]}" --upstream 127.0.0.1:5432 \
    --admin-listen "127.0.0.1:${ADMIN[$s]}" --pid-file "$dir/pgtier.pid" \
    --upgrade-sock "$dir/upgrade.sock" --log-level warn \
    --control-url "postgres://postgres@127.0.0.1:5432/pgtier_warm_$s" --auto-install-triggers \
    --watch eager --default-ttl 600s $key_level >"$dir/pgtier.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 300); do
    curl -sf -o /dev/null "http://127.0.0.1:${ADMIN[$s]}/ready" && return 0
    sleep 0.1
  done
  echo "pgtier ($s) did not become ready:" >&2
  cat "$dir/pgtier.log" >&2
  exit 1
}
start on
start off

n=${keys:-$((100000 * scale))}
printf '\\set aid random_zipfian(1, %d, 1.1)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n' "$n" >"$work/read.sql"
printf '\\set aid random_zipfian(1, %d, 1.1)\nUPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n' "$n" >"$work/write.sql"
w=$(awk "BEGIN{printf \"%d\", $writes * 10 + 0.5}")
args=(-f "$work/read.sql@$((1000 - w))")
[ "$w" -gt 0 ] && args+=(-f "$work/write.sql@$w")

metrics() { # setting: "served l1-reads filled dropped failed"
  curl -sf "http://127.0.0.1:${ADMIN[$1]}/metrics" | awk '
    /^pgtier_cache_lookups_total\{/ && /tier="l1"/ {
      v = $NF
      if ($0 ~ /outcome="(hit|stale)"/) h += v
      if ($0 ~ /reason="not_select"/) next
      t += v
    }
    /^pgtier_warm_refreshes_total\{/ && /result="filled"/ { f += $NF }
    /^pgtier_warm_refreshes_total\{/ && /result="dropped"/ { d += $NF }
    /^pgtier_warm_refreshes_total\{/ && /result="failed"/ { x += $NF }
    END { printf "%.0f %.0f %.0f %.0f %.0f\n", h, t, f, d, x }'
}
commits() { # database: transactions committed so far (stats flushed: wait a moment)
  sleep 1.2
  sql postgres -c "select pg_stat_clear_snapshot()" -c "select xact_commit from pg_stat_database where datname = '$1'" | tail -1
}
run() { # setting
  local s=$1 db=pgtier_warm_$1 out=$work/pgbench.log m0 m1 c0 c1 tx i
  # warm-up: reads alone fill the cache and register the key column (a table
  # written from the start is unwatched before it gets there), then the mix
  pgbench -h 127.0.0.1 -p "${PORT[$s]}" -U postgres -n -M "$mode" -c "$clients" -j "$threads" \
    -T 3 -f "$work/read.sql" "$db" >/dev/null 2>&1
  pgbench -h 127.0.0.1 -p "${PORT[$s]}" -U postgres -n -M "$mode" -c "$clients" -j "$threads" \
    -T 5 "${args[@]}" "$db" >/dev/null 2>&1
  m0=$(metrics "$s")
  c0=$(commits "$db")
  # mostly idle pool connections: the same reads at 2 transactions/s in all
  local quiet=""
  if [ "$idle" -gt 0 ]; then
    pgbench -h 127.0.0.1 -p "${PORT[$s]}" -U postgres -n -M "$mode" -c "$idle" -j 1 -R 2 \
      -T "$((duration + 1))" -f "$work/read.sql" "$db" >/dev/null 2>&1 &
    quiet=$!
    pids+=("$quiet")
  fi
  pgbench -h 127.0.0.1 -p "${PORT[$s]}" -U postgres -n -M "$mode" -c "$clients" -j "$threads" \
    -T "$duration" "${args[@]}" "$db" >"$out" 2>&1 || { cat "$out" >&2; exit 1; }
  c1=$(commits "$db")
  m1=$(metrics "$s")
  [ -n "$quiet" ] && wait "$quiet"
  tx=$(awk '/^number of transactions actually processed/{print $NF}' "$out")
  local tps
  tps=$(awk '/^tps = /{print int($3)}' "$out")
  read -r h0 t0 f0 d0 x0 <<<"$m0"
  read -r h1 t1 f1 d1 x1 <<<"$m1"
  printf "%-5s %7s %7s %7s %9s %8s %8s %7s\n" "$s" "$tps" \
    "$(awk "BEGIN{t=$t1-$t0; if (t>0) printf \"%.3f\", ($h1-$h0)/t; else print \"-\"}")" \
    "$(awk "BEGIN{if ($tx>0) printf \"%.3f\", ($c1-$c0)/$tx; else print \"-\"}")" \
    "$((c1 - c0))" "$((f1 - f0))" "$((d1 - d0))" "$((x1 - x0))"
}
echo "pgtier $bin; -M $mode, $clients clients, $threads threads, ${duration}s runs, scale $scale;" \
  "zipfian reads over $n keys, ${writes} % zipfian writes; ${key_level:-table-level}; $idle idle connections"
printf "%-5s %7s %7s %7s %9s %8s %8s %7s\n" warm tps hit pg/tx pg-xacts filled dropped failed
for _ in $(seq "$rounds"); do
  run on
  run off
done
