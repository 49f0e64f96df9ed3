#!/usr/bin/env bash
# Key-level invalidation benchmark (issue 14): hot rows read by key while the
# same table is written, direct Postgres against pgtier, in one run.
#
#   reads:  \set aid random_zipfian(1, 100000 * scale, 1.1)
#           SELECT abalance FROM pgbench_accounts WHERE aid = :aid
#   writes: \set aid random(1, 100000 * scale)
#           UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid
#   as weighted pgbench scripts (-f read.sql@R -f write.sql@W), W = the write
#   share of transactions, for each query mode and each write share.
#
#   benches/keyed.sh                   # scale 10, 10 s runs, all three modes, writes 0 1 5 20 %
#   options: --modes "simple extended prepared" --writes "0 1 5 20" --duration 10 --warmup 3
#            --scale 10 --clients 8 --threads 2
#            --bin PATH      (this pgtier binary instead of `cargo build --release`)
#            --baseline BIN  (also measure another pgtier build, started with the same
#                             arguments, alternating with this one: before/after in one run)
#            --pgtier-args "..." (extra arguments for every pgtier started)
#            --forwarding    (also measure the same binary with no cache at all, a plain
#                             proxy in front of the direct copy: what the extra hop costs
#                             on this machine, the floor of "never slower than no cache")
#            --ceiling       (also run the same pgbench load against pgceiling, the
#                             protocol server in ../shared/bench that answers everything
#                             at once: what this machine allows pgbench at all, so
#                             ceiling/direct bounds the ratio any cache could reach)
#            --logical       (invalidation.source = "logical": everything runs on a throwaway
#                             cluster with wal_level = logical started by the script, direct
#                             included, and pgtier streams changes instead of installing triggers)
#
# Targets: direct Postgres is a copy of the database without pgtier's triggers
# (what the application gets with no cache at all); each pgtier build caches
# its own copy as load.sh's --cache does (--control-url, --auto-install-triggers,
# --watch eager, --default-ttl 600s), with its metrics on a free port.
# Per mode: every target first runs the reads alone for --warmup seconds, then
# for each write share: direct, pgtier, baseline, one run each.
#
# L1 hit ratio of a run: pgtier's /metrics scraped just before and just after
# that run; from the difference of pgtier_cache_lookups_total{tier="l1"}:
#   (hit + stale) / (hit + stale + miss + bypass)
# where bypass counts every reason except not_select: the benchmark's UPDATEs
# pass through pgtier as not_select bypasses, and they are writes, not reads a
# cache could answer. So this is the share of the reads answered from L1.
#
# Prints one table per mode, the issue's targets (prepared mode) with PASS/FAIL
# next to the measured figures, and one `summary ...` line per row. The targets
# are a report: the exit code is 0 unless the benchmark itself failed.
#
# Needs the local Postgres on 127.0.0.1:5432 (see README), or with --logical the
# PostgreSQL server binaries (initdb, pg_ctl) and a `postgres` OS user.
set -euo pipefail
shopt -s inherit_errexit

here=$(cd "$(dirname "$0")/.." && pwd)
clients=8 threads=2 duration=10 warmup=3 scale=10
modes="simple extended prepared"
writes="0 1 5 20"
bin="" baseline="" pgtier_args="" forwarding="" logical="" ceiling=""
db=pgtier_keyed
while [ $# -gt 0 ]; do
  case "$1" in
    --modes) modes=$2; shift ;;
    --writes) writes=$2; shift ;;
    --duration) duration=$2; shift ;;
    --warmup) warmup=$2; shift ;;
    --scale) scale=$2; shift ;;
    --clients) clients=$2; shift ;;
    --threads) threads=$2; shift ;;
    --bin) bin=$2; shift ;;
    --baseline) baseline=$2; shift ;;
    --pgtier-args) pgtier_args=$2; shift ;;
    --forwarding) forwarding=1 ;;
    --logical) logical=1 ;;
    --ceiling) ceiling=1 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
for m in $modes; do
  case "$m" in simple | extended | prepared) ;; *) echo "unknown mode $m" >&2; exit 2 ;; esac
done
for w in $writes; do
  if ! [[ "$w" =~ ^[0-9]+(\.[0-9])?$ ]] || ! awk "BEGIN{exit !($w <= 100)}"; then
    echo "--writes: $w is not a percentage (0-100, at most one decimal)" >&2
    exit 2
  fi
done
[[ "$scale" =~ ^[1-9][0-9]*$ ]] || { echo "--scale must be a positive integer" >&2; exit 2; }

pgport=5432
if [ -z "$logical" ]; then
  pg_isready -h 127.0.0.1 -p 5432 -q || { echo "Postgres is not running on 127.0.0.1:5432" >&2; exit 1; }
fi

if [ -z "$bin" ]; then
  cargo build --release --quiet --manifest-path "$here/Cargo.toml"
  bin="$here/target/release/pgtier"
fi
for b in "$bin" ${baseline:+"$baseline"}; do
  [ -x "$b" ] || { echo "$b is not an executable" >&2; exit 1; }
done

# N free loopback ports, distinct (all held open until every one is bound)
free_ports() {
  python3 -c 'import socket,sys
ss=[socket.socket() for _ in range(int(sys.argv[1]))]
for s in ss: s.bind(("127.0.0.1",0))
print(" ".join(str(s.getsockname()[1]) for s in ss))' "$1"
}
sql() { # database, then psql arguments
  local d=$1
  shift
  psql -h 127.0.0.1 -p "$pgport" -U postgres -d "$d" -qAtX "$@"
}

work=$(mktemp -d)
pids=()
cluster=""
cleanup() {
  local rc=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -n "$cluster" ]; then
    runuser -u postgres -- "$pgbin/pg_ctl" -D "$cluster/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$cluster"
  fi
  if [ "$rc" = 0 ]; then rm -rf "$work"; else echo "logs kept in $work" >&2; fi
}
trap cleanup EXIT

if [ -n "$logical" ]; then
  # A cluster of the script's own: the shared one is never reconfigured.
  pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
  [ -x "$pgbin/initdb" ] || { echo "--logical needs PostgreSQL's initdb (postgresql package)" >&2; exit 1; }
  cluster=$(mktemp -d)
  chown postgres:postgres "$cluster"
  read -r pgport <<<"$(free_ports 1)"
  runuser -u postgres -- "$pgbin/initdb" -D "$cluster/data" -U postgres --auth=trust -E UTF8 >/dev/null
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$cluster/data" -l "$cluster/postgres.log" -w \
    -o "-p $pgport -k $cluster -c listen_addresses=127.0.0.1 -c wal_level=logical -c max_connections=200" \
    start >/dev/null
  pgtier_args="--invalidation-source logical $pgtier_args"
fi

# The database: initialised once per scale (re-creating the tables each run
# would leave autovacuum busy during the measurement), then settled. Direct
# runs use a copy without pgtier's triggers; a baseline build caches a copy
# of its own (two builds installing their versions of the triggers on the same
# tables would fight). Each copy is taken afresh, so every run starts alike.
direct_db=${db}_direct base_db=${db}_base
sql postgres -c "select 1 from pg_database where datname='$db'" | grep -q 1 \
  || sql postgres -c "create database $db"
have=$(sql "$db" -c "select count(*) from pgbench_branches" 2>/dev/null || echo 0)
if [ "$have" != "$scale" ]; then
  echo "initialising $db at scale $scale" >&2
  pgbench -h 127.0.0.1 -p "$pgport" -U postgres -i -q -s "$scale" "$db" >"$work/init.log" 2>&1 \
    || { cat "$work/init.log" >&2; exit 1; }
fi
sql "$db" -c "vacuum analyze" >/dev/null
strategy=""
[ "$(sql postgres -c "show server_version_num")" -ge 150000 ] && strategy="strategy file_copy"
copies=("$direct_db")
[ -n "$baseline" ] && copies+=("$base_db")
for c in "${copies[@]}"; do
  sql postgres -c "set client_min_messages = warning" -c "drop database if exists $c with (force)" \
    -c "create database $c template $db $strategy" >/dev/null
done
"$bin" uninstall-triggers --control-url "postgres://postgres@127.0.0.1:$pgport/$direct_db" >"$work/uninstall.log" 2>&1 \
  || { echo "uninstall-triggers on $direct_db failed:" >&2; cat "$work/uninstall.log" >&2; exit 1; }
if [ -n "$logical" ]; then
  # The publication pgtier streams (no triggers on this source).
  "$bin" install-triggers --invalidation-source logical --control-url "postgres://postgres@127.0.0.1:$pgport/$db" \
    >"$work/publication.log" 2>&1 || { echo "creating the publication failed:" >&2; cat "$work/publication.log" >&2; exit 1; }
fi
sql postgres -c "checkpoint" >/dev/null

start_pgtier() { # binary port admin-port workdir database
  mkdir -p "$4"
  # shellcheck disable=SC2086
  "$1" --listen "127.0.0.1:$2" --upstream "127.0.0.1:$pgport" --admin-listen "127.0.0.1:$3" \
    --pid-file "$4/pgtier.pid" --upgrade-sock "$4/upgrade.sock" --log-level warn \
    --control-url "postgres://postgres@127.0.0.1:$pgport/$5" --auto-install-triggers --watch eager \
    --default-ttl 600s $pgtier_args >"$4/pgtier.log" 2>&1 &
  pids+=($!)
  local ok=0
  for _ in $(seq 150); do
    curl -sf -o /dev/null "http://127.0.0.1:$3/ready" && { ok=1; break; }
    sleep 0.1
  done
  if [ "$ok" != 1 ] || ! psql -h 127.0.0.1 -p "$2" -U postgres -d "$5" -qAtXc "select 1" >/dev/null; then
    echo "pgtier ($1) did not become ready:" >&2
    cat "$4/pgtier.log" >&2
    exit 1
  fi
}
read -r port admin base_port base_admin fwd_port fwd_admin ceil_port <<<"$(free_ports 7)"
if [ -n "$ceiling" ]; then
  ceil_sh=$here/../shared/bench/ceiling.sh
  [ -x "$ceil_sh" ] || [ -f "$ceil_sh" ] || { echo "--ceiling needs $ceil_sh" >&2; exit 1; }
  ceil_pid=$(bash "$ceil_sh" "$ceil_port" | tail -n1)
  pids+=("$ceil_pid")
  pg_isready -h 127.0.0.1 -p "$ceil_port" -q -t 10 || { echo "pgceiling did not start on $ceil_port" >&2; exit 1; }
fi
start_pgtier "$bin" "$port" "$admin" "$work/pgtier" "$db"
[ -n "$baseline" ] && start_pgtier "$baseline" "$base_port" "$base_admin" "$work/baseline" "$base_db"
if [ -n "$forwarding" ]; then
  # No control URL: nothing is cached, every statement is forwarded.
  mkdir -p "$work/forward"
  "$bin" --listen "127.0.0.1:$fwd_port" --upstream "127.0.0.1:$pgport" --admin-listen "127.0.0.1:$fwd_admin" \
    --pid-file "$work/forward/pgtier.pid" --upgrade-sock "$work/forward/upgrade.sock" --log-level warn \
    >"$work/forward/pgtier.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 150); do curl -sf -o /dev/null "http://127.0.0.1:$fwd_admin/ready" && break; sleep 0.1; done
  psql -h 127.0.0.1 -p "$fwd_port" -U postgres -d "$direct_db" -qAtXc "select 1" >/dev/null \
    || { echo "forwarding pgtier did not start:" >&2; cat "$work/forward/pgtier.log" >&2; exit 1; }
fi

n=$((100000 * scale))
cat >"$work/read.sql" <<SQL
\set aid random_zipfian(1, $n, 1.1)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SQL
cat >"$work/write.sql" <<SQL
\set aid random(1, $n)
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;
SQL

# pgbench script arguments for a write share in percent (weights in per mille)
scripts() {
  local w r
  w=$(awk "BEGIN{printf \"%d\", $1 * 10 + 0.5}")
  r=$((1000 - w))
  [ "$r" -gt 0 ] && printf -- '-f\n%s@%d\n' "$work/read.sql" "$r"
  [ "$w" -gt 0 ] && printf -- '-f\n%s@%d\n' "$work/write.sql" "$w"
  return 0
}

tps() { # port database mode seconds write-share
  local out=$work/pgbench.log args
  mapfile -t args < <(scripts "$5")
  if ! pgbench -h 127.0.0.1 -p "$1" -U postgres -n -M "$3" -c "$clients" -j "$threads" -T "$4" \
    "${args[@]}" "$2" >"$out" 2>&1; then
    echo "pgbench failed (port $1, $2, -M $3, $5 % writes):" >&2
    cat "$out" >&2
    return 1
  fi
  grep -E 'failed transactions: [1-9]' "$out" | sed 's/^/FAILED /' >&2 || true
  awk '/^tps = /{print int($3); found=1} END{exit !found}' "$out" \
    || { echo "no tps in pgbench output:" >&2; cat "$out" >&2; return 1; }
}

# "served total" L1 lookups so far (see the header), from pgtier's metrics
l1_counts() { # admin port
  curl -sf "http://127.0.0.1:$1/metrics" | awk '
    /^pgtier_cache_lookups_total\{/ && /tier="l1"/ {
      v = $NF
      if ($0 ~ /outcome="(hit|stale)"/) h += v
      if ($0 ~ /reason="not_select"/) next
      t += v
    }
    END { printf "%.0f %.0f\n", h, t }'
}
hit_ratio() { # "served total" before, "served total" after
  local h0 t0 h1 t1
  read -r h0 t0 <<<"$1"
  read -r h1 t1 <<<"$2"
  awk "BEGIN{ t = $t1 - $t0; if (t > 0) printf \"%.3f\", ($h1 - $h0) / t; else printf \"-\" }"
}
# a pgtier run: prints "tps hit-ratio"
tps_hit() { # port admin-port database mode seconds write-share
  local before after t
  before=$(l1_counts "$2")
  t=$(tps "$1" "$3" "$4" "$5" "$6") || return 1
  after=$(l1_counts "$2")
  echo "$t $(hit_ratio "$before" "$after")"
}
div() { awk "BEGIN{ if ($2 > 0) printf \"%.2f\", $1 / $2; else printf \"-\" }"; }

# target check: measured value, minimum -> PASS/FAIL (n/a if either is unknown)
verdict() {
  if [ "$1" = - ] || [ "$2" = - ]; then echo "n/a"; else awk "BEGIN{ print ($1 >= $2) ? \"PASS\" : \"FAIL\" }"; fi
}
# The issue's targets, prepared mode: write share, hit ratio factor of the
# 0 %-writes row (- for none), TPS factor of direct
targets=("1 0.95 1.5" "5 0.85 1.2" "20 - 1.0")

declare -A D P PH B BH F C
echo "key reads (zipfian 1.1 over $n rows) + uniform single-row updates; scale $scale," \
  "$clients clients, $threads threads, ${duration}s per run, ${warmup}s warm-up per mode"
echo "hit = pgtier L1 hit ratio of the reads in that run: (hit+stale)/(hit+stale+miss+bypass), writes excluded"
for mode in $modes; do
  tps "$pgport" "$direct_db" "$mode" "$warmup" 0 >/dev/null
  tps "$port" "$db" "$mode" "$warmup" 0 >/dev/null
  [ -n "$baseline" ] && tps "$base_port" "$base_db" "$mode" "$warmup" 0 >/dev/null
  [ -n "$forwarding" ] && tps "$fwd_port" "$direct_db" "$mode" "$warmup" 0 >/dev/null
  [ -n "$ceiling" ] && tps "$ceil_port" "$direct_db" "$mode" "$warmup" 0 >/dev/null
  echo
  echo "-M $mode"
  printf "%8s %10s %10s %7s %7s" "writes %" direct pgtier ratio hit
  [ -n "$baseline" ] && printf " %10s %7s %7s %9s" baseline ratio hit pgt/base
  [ -n "$forwarding" ] && printf " %10s %7s" forward ratio
  [ -n "$ceiling" ] && printf " %10s %7s" ceiling ratio
  printf "\n"
  for w in $writes; do
    k=$mode/$w
    D[$k]=$(tps "$pgport" "$direct_db" "$mode" "$duration" "$w")
    r=$(tps_hit "$port" "$admin" "$db" "$mode" "$duration" "$w")
    read -r "P[$k]" "PH[$k]" <<<"$r"
    printf "%8s %10d %10d %7s %7s" "$w" "${D[$k]}" "${P[$k]}" "$(div "${P[$k]}" "${D[$k]}")" "${PH[$k]}"
    if [ -n "$baseline" ]; then
      r=$(tps_hit "$base_port" "$base_admin" "$base_db" "$mode" "$duration" "$w")
      read -r "B[$k]" "BH[$k]" <<<"$r"
      printf " %10d %7s %7s %9s" "${B[$k]}" "$(div "${B[$k]}" "${D[$k]}")" "${BH[$k]}" "$(div "${P[$k]}" "${B[$k]}")"
    fi
    if [ -n "$forwarding" ]; then
      F[$k]=$(tps "$fwd_port" "$direct_db" "$mode" "$duration" "$w")
      printf " %10d %7s" "${F[$k]}" "$(div "${F[$k]}" "${D[$k]}")"
    fi
    if [ -n "$ceiling" ]; then
      C[$k]=$(tps "$ceil_port" "$direct_db" "$mode" "$duration" "$w")
      printf " %10d %7s" "${C[$k]}" "$(div "${C[$k]}" "${D[$k]}")"
    fi
    printf "\n"
  done
  [ "$mode" = prepared ] || continue
  echo "targets (issue 14, prepared mode):"
  for t in "${targets[@]}"; do
    read -r tw hf tf <<<"$t"
    k=$mode/$tw
    # only write shares that were measured
    [ -n "${D[$k]:-}" ] || continue
    zero=$mode/0
    if [ "$hf" != - ]; then
      for who in pgtier baseline; do
        if [ "$who" = pgtier ]; then h0=${PH[$zero]:--} h=${PH[$k]}; else
          [ -n "$baseline" ] || continue
          h0=${BH[$zero]:--} h=${BH[$k]}
        fi
        min=-
        [ "$h0" != - ] && min=$(awk "BEGIN{printf \"%.3f\", $hf * $h0}")
        printf "  %-8s %5s %% writes: hit ratio >= %s x the 0 %% row (>= %s)  measured %-6s %s\n" \
          "$who" "$tw" "$hf" "$min" "$h" "$(verdict "$h" "$min")"
      done
    fi
    for who in pgtier baseline; do
      if [ "$who" = pgtier ]; then r=$(div "${P[$k]}" "${D[$k]}"); else
        [ -n "$baseline" ] || continue
        r=$(div "${B[$k]}" "${D[$k]}")
      fi
      printf "  %-8s %5s %% writes: TPS >= %s x direct                measured %-6s %s\n" \
        "$who" "$tw" "$tf" "${r}x" "$(verdict "$r" "$tf")"
    done
  done
done

echo
for mode in $modes; do
  for w in $writes; do
    k=$mode/$w
    printf "summary mode=%s writes=%s%% direct=%d pgtier=%d ratio=%s hit=%s" \
      "$mode" "$w" "${D[$k]}" "${P[$k]}" "$(div "${P[$k]}" "${D[$k]}")" "${PH[$k]}"
    [ -n "$baseline" ] && printf " baseline=%d baseline_ratio=%s baseline_hit=%s" \
      "${B[$k]}" "$(div "${B[$k]}" "${D[$k]}")" "${BH[$k]}"
    [ -n "$forwarding" ] && printf " forward=%d forward_ratio=%s" "${F[$k]}" "$(div "${F[$k]}" "${D[$k]}")"
    [ -n "$ceiling" ] && printf " ceiling=%d ceiling_ratio=%s" "${C[$k]}" "$(div "${C[$k]}" "${D[$k]}")"
    printf "\n"
  done
done
