#!/usr/bin/env bash
# Write-path cost of the logical invalidation source (issue 15): pgbench TPC-B
# on a throwaway cluster with wal_level = logical (fsync on), alternating
# rounds of:
#   - pgtier stopped (TPC-B alone), and with the read load sent straight to
#     Postgres;
#   - Postgres's own logical client, pg_recvlogical, decoding the same
#     publication with pgoutput (output to /dev/null), the read load straight
#     to Postgres: what decoding costs the writers with no pgtier at all;
#   - pgtier with invalidation.source = logical, the read load through pgtier
#     keeping the four pgbench tables cached (its walsender decodes every write);
#   - pgtier with the NOTIFY source announcing every write (triggers,
#     unwatch_on_write = false), the same read load through pgtier;
#   - the same with the poll source (triggers appending to pgtier.changes).
#
#   benches/logical_cost.sh [--rounds 3] [--duration 15] [--clients 8] [--threads 2] [--scale 10] [--bin PATH]
#                           [--read-mode simple|extended|prepared] [--only logical]
#
# --read-mode: the read load's query mode (default simple: literals in the
# text, so each read pgtier sees is a text it parses); --only logical skips the
# notify and poll rounds.
#
# Without --bin it builds the release binary. Run as root (the cluster runs as
# the postgres OS user); it stops the cluster and every process it started.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
rounds=3 duration=15 clients=8 threads=2 scale=10 bin="" read_mode=simple only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift ;;
    --duration) duration=$2; shift ;;
    --clients) clients=$2; shift ;;
    --threads) threads=$2; shift ;;
    --scale) scale=$2; shift ;;
    --bin) bin=$2; shift ;;
    --read-mode) read_mode=$2; shift ;;
    --only) only=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$bin" ]; then
  cargo build --release --quiet --manifest-path "$here/Cargo.toml"
  bin="$here/target/release/pgtier"
fi
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

work=$(mktemp -d)
chown postgres:postgres "$work"
pgport=$(free_port)
port=$(free_port)
db=pgtier_tpcb
pid=""
stop_pgtier() { [ -n "$pid" ] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }; pid=""; }
cleanup() {
  stop_pgtier
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
runuser -u postgres -- "$pgbin/initdb" -D "$work/data" -U postgres --auth=trust -E UTF8 >/dev/null
runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/data" -l "$work/postgres.log" -w \
  -o "-p $pgport -k $work -c listen_addresses=127.0.0.1 -c wal_level=logical" start >/dev/null
psql -h 127.0.0.1 -p "$pgport" -U postgres -d postgres -qc "create database $db"
pgbench -h 127.0.0.1 -p "$pgport" -U postgres -i -q -s "$scale" "$db" >/dev/null 2>&1
control="postgres://postgres@127.0.0.1:$pgport/$db"
printf '[invalidation]\nunwatch_on_write = false\n' >"$work/announce-all.toml"

start_pgtier() { # [extra args]
  "$bin" --listen "127.0.0.1:$port" --upstream "127.0.0.1:$pgport" --admin-listen "" ${control:+--control-url "$control"} \
    --pid-file "$work/pid" --upgrade-sock "$work/sock" --log-level warn "$@" >>"$work/pgtier.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
}

tps() {
  pgbench -h 127.0.0.1 -p "$pgport" -U postgres -n -c "$clients" -j "$threads" -T "$duration" "$db" 2>&1 |
    awk '/^tps = /{print int($3)}'
}

# A light read load by key on the tables TPC-B writes (1 client, at most 500
# reads/s), through pgtier (`$port`) or straight to Postgres (`$pgport`).
# (Not pgbench_history: TPC-B only appends to it, and counting a table that
# grows all run long would weigh on the direct rounds alone.)
reads=$work/reads.sql
cat >"$reads" <<'SQL'
\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SELECT bbalance FROM pgbench_branches WHERE bid = :bid;
SELECT tbalance FROM pgbench_tellers WHERE tid = :tid;
SQL
with_reads() { # port command...
  local to=$1
  shift
  pgbench -h 127.0.0.1 -p "$to" -U postgres -n -M "$read_mode" -c 1 -R 500 -T "$((duration + 2))" -f "$reads" "$db" >"$work/reads.log" 2>&1 &
  local r=$!
  "$@"
  wait "$r" || { echo "read load failed:" >&2; cat "$work/reads.log" >&2; exit 1; }
  grep -q "failed transactions: 0 " "$work/reads.log" || { cat "$work/reads.log" >&2; exit 1; }
}

# The read load's average latency (pgtier's admin endpoint is off here).
read_latency() { awk '/latency average/{print $4 " ms"}' "$work/reads.log"; }

# TPC-B with the read load straight to Postgres while pg_recvlogical streams
# the publication $1 with pgoutput to /dev/null (a slot of its own, dropped
# after).
recvlogical() {
  local recv
  "$pgbin/pg_recvlogical" -h 127.0.0.1 -p "$pgport" -U postgres -d "$db" -S pgtier_floor \
    --create-slot -P pgoutput >/dev/null
  "$pgbin/pg_recvlogical" -h 127.0.0.1 -p "$pgport" -U postgres -d "$db" -S pgtier_floor --start \
    -o proto_version=1 -o "publication_names=$1" -o messages=true -f /dev/null 2>>"$work/recvlogical.log" &
  recv=$!
  with_reads "$pgport" tps
  kill "$recv" 2>/dev/null || true
  wait "$recv" 2>/dev/null || true
  # The walsender may outlive its client for a moment: the slot is dropped
  # once it is free.
  for _ in $(seq 50); do
    "$pgbin/pg_recvlogical" -h 127.0.0.1 -p "$pgport" -U postgres -d "$db" -S pgtier_floor --drop-slot 2>/dev/null && return
    sleep 0.1
  done
  echo "could not drop the slot pgtier_floor" >&2
  exit 1
}

pct() { echo "(1 - $1 / $2) * 100" | bc -l; }

"$bin" install-triggers --invalidation-source logical --control-url "$control" >/dev/null
psql -h 127.0.0.1 -p "$pgport" -U postgres -d "$db" -qc "create publication pgtier_empty" \
  -c "create publication pgtier_keys for table pgbench_accounts (aid), pgbench_tellers (tid), pgbench_branches (bid)"
echo "TPC-B, scale $scale, $clients clients, $threads threads, ${duration}s runs, $rounds rounds (alternating), wal_level = logical"
a=0 d=0 f=0 l=0 n=0 p=0 g=0 e=0 k=0
for r in $(seq "$rounds"); do
  ra=$(tps)
  rd=$(with_reads "$pgport" tps)
  ld=$(read_latency)
  # The read load through pgtier with no cache and no change feed: what the
  # extra hop alone costs the writers (the part of the cost that is not the
  # walsender's decoding).
  stop_control=$control control=""
  start_pgtier
  control=$stop_control
  rf=$(with_reads "$port" tps)
  lf=$(read_latency)
  stop_pgtier
  # Postgres's own client decoding the same stream (pgtier's options): the
  # floor any change-feed consumer pays on these cores; on a publication with
  # no table, what reading and decoding the WAL costs before any row is sent;
  # and on one whose column lists keep only the primary keys, what sending
  # whole rows adds.
  rr=$(recvlogical pgtier)
  re=$(recvlogical pgtier_empty)
  rk=$(recvlogical pgtier_keys)
  start_pgtier --invalidation-source logical
  with_reads "$port" true # warm: the tables get cached
  rl=$(with_reads "$port" tps)
  ll=$(read_latency)
  stop_pgtier
  rn=0 ln=- rp=0 lp=-
  if [ "$only" != logical ]; then
    "$bin" install-triggers --control-url "$control" >/dev/null
    start_pgtier --config "$work/announce-all.toml" --watch eager
    with_reads "$port" true
    rn=$(with_reads "$port" tps)
    ln=$(read_latency)
    stop_pgtier
    "$bin" uninstall-triggers --control-url "$control" >/dev/null
    "$bin" install-triggers --invalidation-source poll --control-url "$control" >/dev/null
    start_pgtier --config "$work/announce-all.toml" --watch eager --invalidation-source poll
    with_reads "$port" true
    rp=$(with_reads "$port" tps)
    lp=$(read_latency)
    stop_pgtier
    "$bin" uninstall-triggers --control-url "$control" >/dev/null
  fi
  echo "  round $r: pgtier stopped $ra | reads straight to Postgres $rd (read latency $ld) | reads through pgtier, no cache $rf ($lf) | pg_recvlogical, reads straight $rr (empty publication $re, keys only $rk) | logical, reads through pgtier $rl ($ll) | notify, every write announced $rn ($ln) | poll, every write announced $rp ($lp)"
  a=$((a + ra)) d=$((d + rd)) g=$((g + rr)) e=$((e + re)) k=$((k + rk)) f=$((f + rf)) l=$((l + rl)) n=$((n + rn)) p=$((p + rp))
done
a=$((a / rounds)) d=$((d / rounds)) g=$((g / rounds)) e=$((e / rounds)) k=$((k / rounds)) f=$((f / rounds)) l=$((l / rounds)) n=$((n / rounds)) p=$((p / rounds))
echo "average TPS (cost against the same cluster without pgtier; read load -M $read_mode):"
printf "  logical, against pgtier stopped:                  %6d vs %6d  cost %5.1f%%\n" "$l" "$a" "$(pct "$l" "$a")"
printf "  logical, against the reads straight to Postgres:  %6d vs %6d  cost %5.1f%%\n" "$l" "$d" "$(pct "$l" "$d")"
printf "  the hop alone (no cache), same comparison:        %6d vs %6d  cost %5.1f%%\n" "$f" "$d" "$(pct "$f" "$d")"
printf "  pg_recvlogical, reads straight (decoding floor): %6d vs %6d  cost %5.1f%%\n" "$g" "$d" "$(pct "$g" "$d")"
printf "  the same, publication with no table (WAL decoding): %4d vs %6d  cost %5.1f%%\n" "$e" "$d" "$(pct "$e" "$d")"
printf "  the same, column lists of primary keys only:     %6d vs %6d  cost %5.1f%%\n" "$k" "$d" "$(pct "$k" "$d")"
printf "  logical, against the hop alone (decoding):        %6d vs %6d  cost %5.1f%%\n" "$l" "$f" "$(pct "$l" "$f")"
if [ "$only" != logical ]; then
  printf "  notify announcing every write, same comparison:   %6d vs %6d  cost %5.1f%%\n" "$n" "$d" "$(pct "$n" "$d")"
  printf "  poll announcing every write, same comparison:     %6d vs %6d  cost %5.1f%%\n" "$p" "$d" "$(pct "$p" "$d")"
fi
