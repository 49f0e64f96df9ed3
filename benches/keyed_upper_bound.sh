#!/usr/bin/env bash
# What keyed.sh's 20 % row could reach if announcing writes cost nothing: the
# same reads by key through pgtier (cached, key-level), with the writes sent to
# an unwatched copy of pgbench_accounts (schema nowatch: no trigger, no
# announcement, no fence), against direct Postgres running the real mix.
#
#   benches/keyed_upper_bound.sh [--bin PATH] [--rounds 2] [--duration 10] [--writes 20]
#
# Needs keyed.sh's databases (pgtier_keyed, pgtier_keyed_direct: run keyed.sh
# once) and the local Postgres on 127.0.0.1:5432.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin="" rounds=2 duration=10 writes=20
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift ;;
    --rounds) rounds=$2; shift ;;
    --duration) duration=$2; shift ;;
    --writes) writes=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$bin" ]; then
  cargo build --release --quiet --manifest-path "$here/Cargo.toml"
  bin="$here/target/release/pgtier"
fi
db=pgtier_keyed dd=pgtier_keyed_direct
S() { psql -h 127.0.0.1 -U postgres -d "$1" -qAtX -c "$2"; }
for d in $db $dd; do
  S "$d" "select 1 from pgbench_accounts limit 1" >/dev/null \
    || { echo "$d has no pgbench tables: run benches/keyed.sh first" >&2; exit 1; }
  S "$d" "create schema if not exists nowatch; drop table if exists nowatch.acc;
          create table nowatch.acc as select * from pgbench_accounts;
          alter table nowatch.acc add primary key (aid)" >/dev/null 2>&1
  S "$d" "vacuum analyze nowatch.acc"
done
work=$(mktemp -d)
read -r port admin <<<"$(python3 -c 'import socket
ss=[socket.socket() for _ in range(2)]
for s in ss: s.bind(("127.0.0.1",0))
print(" ".join(str(s.getsockname()[1]) for s in ss))')"
printf '[invalidation]\nunwatch_on_write = false\nschemas = ["public"]\n' >"$work/cfg.toml"
n=$(S "$db" "select count(*) from pgbench_accounts")
printf '\\set aid random_zipfian(1, %s, 1.1)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n' "$n" >"$work/read.sql"
printf '\\set aid random(1, %s)\nUPDATE nowatch.acc SET abalance = abalance + 1 WHERE aid = :aid;\n' "$n" >"$work/write_copy.sql"
printf '\\set aid random(1, %s)\nUPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n' "$n" >"$work/write.sql"
"$bin" --config "$work/cfg.toml" --listen "127.0.0.1:$port" --upstream 127.0.0.1:5432 \
  --admin-listen "127.0.0.1:$admin" --pid-file "$work/pid" --upgrade-sock "$work/sock" --log-level warn \
  --control-url "postgres://postgres@127.0.0.1:5432/$db" --auto-install-triggers --watch eager \
  --default-ttl 600s --key-level >"$work/pgtier.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 150); do curl -sf -o /dev/null "http://127.0.0.1:$admin/ready" && break; sleep 0.1; done
w=$((writes * 10)) r=$((1000 - writes * 10))
pb() { # port seconds db scripts...
  pgbench -h 127.0.0.1 -p "$1" -U postgres -n -M prepared -c 8 -j 2 -T "$2" "${@:4}" "$3" 2>&1 \
    | awk '/^tps/{print int($3)}'
}
pb "$port" 3 "$db" -f "$work/read.sql" >/dev/null
for round in $(seq "$rounds"); do
  direct=$(pb 5432 "$duration" "$dd" -f "$work/read.sql@$r" -f "$work/write.sql@$w")
  cached=$(pb "$port" "$duration" "$db" -f "$work/read.sql@$r" -f "$work/write_copy.sql@$w")
  echo "round $round: direct (real mix) $direct | pgtier, writes to the unwatched copy $cached | ratio $(awk "BEGIN{printf \"%.2f\", $cached/$direct}")"
done
