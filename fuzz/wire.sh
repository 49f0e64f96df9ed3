#!/usr/bin/env bash
# Differential wire fuzzing: starts a pgtier (caching, triggers installed) in
# front of the Postgres on PGHOST:PGPORT (default 127.0.0.1:5432), makes a
# scratch database, and runs fuzz_wire against both for SECONDS.
#   fuzz/wire.sh [SECONDS]        (FUZZ_DB names the scratch database)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-300}
pghost=${PGHOST:-127.0.0.1}
pgport=${PGPORT:-5432}
db=${FUZZ_DB:-pgtier_fuzz_wire}
nice -n 10 cargo build -q --profile fuzz --examples --bin pgtier
psql=(psql -X -q -v ON_ERROR_STOP=1 -h "$pghost" -p "$pgport" -U postgres)
"${psql[@]}" -d postgres -c "drop database if exists $db with (force)" -c "create database $db"
"${psql[@]}" -d "$db" -c "create table w (id int primary key, v int, s text);
  insert into w values (1, 10, 'a'), (2, 20, 'b'), (3, 30, 'b');
  create table w2 (id int, s text);"
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
admin=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf '[cache]\ndefault_ttl = "10m"\n' > "$work/pgtier.toml"
target/fuzz/pgtier --config "$work/pgtier.toml" --listen "127.0.0.1:$port" \
  --upstream "$pghost:$pgport" --admin-listen "127.0.0.1:$admin" \
  --upgrade-sock "$work/upgrade.sock" --pid-file "$work/pgtier.pid" \
  --control-url "postgres://postgres@$pghost:$pgport/$db" --auto-install-triggers --watch eager \
  2> "$work/pgtier.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$admin/ready" >/dev/null 2>&1 && break
  sleep 0.1
done
nice -n 10 target/fuzz/examples/fuzz_wire "$port" "$pgport" "$db" "$secs"
hits=$(curl -s "http://127.0.0.1:$admin/metrics" | grep -E '^pgtier_cache_lookups_total\{.*outcome="hit"' | awk '{s+=$2} END {print s+0}')
echo "  pgtier cache hits during the run: $hits"
if ! kill -0 $pid 2>/dev/null; then
  echo "  pgtier DIED during the run; log: $work/pgtier.log"
  exit 1
fi
kill $pid; wait $pid 2>/dev/null || true
trap - EXIT
"${psql[@]}" -d postgres -c "drop database if exists $db with (force)" || true
