#!/usr/bin/env bash
# Load benchmark: the same pgbench workload against direct Postgres, through pgtier
# and (optionally) against pgceiling, in one run, printing TPS and ratios.
#
#   benches/load.sh                      # pgbench -S (select-only), all three modes
#   benches/load.sh --script hot         # ../shared/bench/hot.sql hot set (cache hits)
#   benches/load.sh --script tpcb        # TPC-B (default pgbench script)
#   options: --clients 8 --threads 2 --duration 10 --warmup 3 --modes "simple extended prepared"
#            --rounds 1 --ceiling (also measure pgceiling) --pgtier-args "--default-ttl 60s"
#            --upstream /var/run/postgresql:5432 (pgtier reaches Postgres over its Unix socket)
#            --latency (also print p50/p99 latency through pgtier, from sampled pgbench logs)
#            --cache   (pgtier caches the benchmark database: listener, triggers, 10 min TTL)
#            --l2 URL  (with --cache: L2 in Redis at URL and no L1, so every hit is an L2 hit;
#                       also prints what redis-benchmark gets from that Redis with as many
#                       connections as pgbench, one GET at a time: the round-trip ceiling)
#            --pgbouncer (also measure PgBouncer in session mode in front of the same upstream,
#                       the reference for pure forwarding; needs the pgbouncer package)
#            --baseline BIN (also measure another pgtier build, started with the same
#                       arguments, alternating with this one: before/after in one run)
#
# Needs the local Postgres on 127.0.0.1:5432 (see README). Builds pgtier in release.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
shared="$here/../shared/bench"
clients=8 threads=2 duration=10 warmup=3 rounds=1 script=select ceiling=0
modes="simple extended prepared"
pgtier_args=""
upstream=127.0.0.1:5432
db=pgtier_bench
scale=1
latency=0
pgbouncer=0
cache=0
l2=""
baseline=""
while [ $# -gt 0 ]; do
  case "$1" in
    --clients) clients=$2; shift ;;
    --threads) threads=$2; shift ;;
    --duration) duration=$2; shift ;;
    --warmup) warmup=$2; shift ;;
    --rounds) rounds=$2; shift ;;
    --modes) modes=$2; shift ;;
    --script) script=$2; shift ;;
    --ceiling) ceiling=1 ;;
    --pgbouncer) pgbouncer=1 ;;
    --baseline) baseline=$2; shift ;;
    --latency) latency=1 ;;
    --cache) cache=1 ;;
    --l2) l2=$2; shift ;;
    --pgtier-args) pgtier_args=$2; shift ;;
    --scale) scale=$2; shift ;;
    --upstream) upstream=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

pg_isready -h 127.0.0.1 -p 5432 -q || { echo "Postgres is not running on 127.0.0.1:5432" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cargo build --release --quiet --manifest-path "$here/Cargo.toml"
bin="$here/target/release/pgtier"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

psql -h 127.0.0.1 -U postgres -d postgres -qAtc "select 1 from pg_database where datname='$db'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -d postgres -qc "create database $db"
# Initialise once (re-creating tables each run would leave autovacuum busy
# during the measurement), then settle: vacuum, analyse, checkpoint.
have=$(psql -h 127.0.0.1 -U postgres -d "$db" -qAtc "select count(*) from pgbench_branches" 2>/dev/null || echo 0)
if [ "$have" != "$scale" ]; then
  pgbench -h 127.0.0.1 -U postgres -i -q -s "$scale" "$db" >/dev/null 2>&1
fi
psql -h 127.0.0.1 -U postgres -d "$db" -qc "vacuum analyze" -c "checkpoint" >/dev/null

# A cached baseline gets its own copy of the database: two builds installing
# their own versions of the triggers on the same tables would fight.
base_db=$db
if [ -n "$baseline" ] && [ "$cache" = 1 ]; then
  base_db=${db}_base
  psql -h 127.0.0.1 -U postgres -d postgres -qc "drop database if exists $base_db with (force)" \
    -c "create database $base_db template $db" >/dev/null
fi

start_pgtier() { # binary port workdir database
  local args=$pgtier_args
  if [ "$cache" = 1 ]; then
    args="$args --control-url postgres://postgres@127.0.0.1:5432/$4 --auto-install-triggers --watch eager --default-ttl 600s"
    [ -n "$l2" ] && args="$args --redis $l2 --l1-max-bytes 0"
  fi
  # L2 needs a signing key; older builds ignore the variable.
  # shellcheck disable=SC2086
  PGTIER_L2_SIGNING_KEY="${PGTIER_L2_SIGNING_KEY:-$(printf 'ab%.0s' $(seq 32))}" \
  "$1" --listen "127.0.0.1:$2" --upstream "$upstream" --admin-listen "" \
    --pid-file "$3/pgtier.pid" --upgrade-sock "$3/upgrade.sock" --log-level warn $args \
    >"$3/pgtier.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$2") 2>/dev/null && break; sleep 0.1; done
  psql -h 127.0.0.1 -p "$2" -U postgres -d "$4" -qAtc "select 1" >/dev/null \
    || { echo "pgtier ($1) did not start:" >&2; cat "$3/pgtier.log" >&2; exit 1; }
}
port=$(free_port)
work=$(mktemp -d)
start_pgtier "$bin" "$port" "$work" "$db"
base_port=""
if [ -n "$baseline" ]; then
  base_port=$(free_port)
  base_work=$(mktemp -d)
  start_pgtier "$baseline" "$base_port" "$base_work" "$base_db"
fi

ceil_port=""
if [ "$ceiling" = 1 ]; then
  ceil_port=$(free_port)
  pids+=("$("$shared/ceiling.sh" "$ceil_port")")
fi

pgb_port=""
if [ "$pgbouncer" = 1 ]; then
  command -v pgbouncer >/dev/null || { echo "--pgbouncer needs pgbouncer (apt-get install pgbouncer)" >&2; exit 1; }
  pgb_port=$(free_port)
  pgb=$(mktemp -d)
  cat >"$pgb/pgbouncer.ini" <<EOF
[databases]
* = host=${upstream%:*} port=${upstream##*:}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $pgb_port
unix_socket_dir =
auth_type = trust
auth_file = $pgb/users.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 50
logfile = $pgb/pgbouncer.log
pidfile = $pgb/pgbouncer.pid
EOF
  echo '"postgres" ""' >"$pgb/users.txt"
  # pgbouncer refuses to run as root
  if [ "$(id -u)" = 0 ]; then
    chown -R postgres "$pgb"
    runuser -u postgres -- pgbouncer -d "$pgb/pgbouncer.ini"
  else
    pgbouncer -d "$pgb/pgbouncer.ini"
  fi
  for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$pgb_port") 2>/dev/null && break; sleep 0.1; done
  pids+=("$(cat "$pgb/pgbouncer.pid")")
fi

case "$script" in
  select) wl=(-S) ;;
  tpcb) wl=() ;;
  hot) wl=(-f "$shared/hot.sql") ;;
  *) echo "unknown script $script" >&2; exit 2 ;;
esac

tps() { # port mode seconds [extra pgbench args]; the database is $tdb (default $db)
  local port=$1 mode=$2 secs=$3
  shift 3
  pgbench -h 127.0.0.1 -p "$port" -U postgres -n -M "$mode" -c "$clients" -j "$threads" -T "$secs" "${wl[@]}" "$@" "${tdb:-$db}" 2>&1 \
    | awk '/^tps = /{print int($3)} /failed transactions: [1-9]/{print "FAILED " $0 > "/dev/stderr"}'
}

# p50 and p99 (ms) of the transactions logged under prefix $1
percentiles() {
  cat "$1".* 2>/dev/null | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {if (NR) printf "%.3f %.3f", a[int(NR*0.5)+1]/1000, a[int(NR*0.99)+1]/1000; else printf "- -"}'
}

echo "workload: $script, clients $clients, threads $threads, ${duration}s per run, $rounds round(s)"
printf "%-9s %10s %10s %8s" mode direct pgtier ratio
[ "$ceiling" = 1 ] && printf " %10s %12s" ceiling pgtier/ceil
[ "$pgbouncer" = 1 ] && printf " %10s %8s %10s" pgbouncer ratio pgtier/pgb
[ -n "$baseline" ] && printf " %10s %8s %10s" baseline ratio pgt/base
[ "$latency" = 1 ] && printf " %12s %12s" "p50 ms" "p99 ms"
printf "\n"
for mode in $modes; do
  # warm up caches and connections on every target
  tps 5432 "$mode" "$warmup" >/dev/null
  tps "$port" "$mode" "$warmup" >/dev/null
  [ "$ceiling" = 1 ] && tps "$ceil_port" "$mode" "$warmup" >/dev/null
  [ "$pgbouncer" = 1 ] && tps "$pgb_port" "$mode" "$warmup" >/dev/null
  [ -n "$baseline" ] && tdb=$base_db tps "$base_port" "$mode" "$warmup" >/dev/null
  d=0 p=0 c=0 b=0 o=0
  for _ in $(seq "$rounds"); do
    # alternate targets so drift on the machine hits both alike
    d=$((d + $(tps 5432 "$mode" "$duration")))
    if [ "$latency" = 1 ]; then
      rm -f "$work"/lat.*
      p=$((p + $(cd "$work" && tps "$port" "$mode" "$duration" -l --sampling-rate=0.02 --log-prefix=lat)))
    else
      p=$((p + $(tps "$port" "$mode" "$duration")))
    fi
    [ "$ceiling" = 1 ] && c=$((c + $(tps "$ceil_port" "$mode" "$duration")))
    [ "$pgbouncer" = 1 ] && b=$((b + $(tps "$pgb_port" "$mode" "$duration")))
    [ -n "$baseline" ] && o=$((o + $(tdb=$base_db tps "$base_port" "$mode" "$duration")))
  done
  d=$((d / rounds)) p=$((p / rounds)) c=$((c / rounds)) b=$((b / rounds)) o=$((o / rounds))
  printf "%-9s %10d %10d %8.2f" "$mode" "$d" "$p" "$(echo "$p / $d" | bc -l)"
  [ "$ceiling" = 1 ] && printf " %10d %12.2f" "$c" "$(echo "$p / $c" | bc -l)"
  [ "$pgbouncer" = 1 ] && printf " %10d %8.2f %10.2f" "$b" "$(echo "$b / $d" | bc -l)" "$(echo "$p / $b" | bc -l)"
  [ -n "$baseline" ] && printf " %10d %8.2f %10.2f" "$o" "$(echo "$o / $d" | bc -l)" "$(echo "$p / $o" | bc -l)"
  if [ "$latency" = 1 ]; then read -r p50 p99 <<<"$(percentiles "$work/lat")"; printf " %12s %12s" "$p50" "$p99"; fi
  printf "\n"
done

if [[ "$l2" == redis://* ]] && command -v redis-benchmark >/dev/null; then
  # The same number of connections doing nothing but GETs, one at a time: what
  # Redis round trips alone reach on this machine, next to the L2-hit TPS above.
  hp=${l2#*://}; hp=${hp#*@}; hp=${hp%%/*}
  rps=$(redis-benchmark -h "${hp%:*}" -p "${hp##*:}" -t get -c "$clients" -n $((duration * 50000)) --csv 2>/dev/null \
    | awk -F'"' '/^"GET"/{print int($4)}')
  echo "redis-benchmark GET, $clients connections, no pipelining: ${rps:-?} requests/s"
fi
