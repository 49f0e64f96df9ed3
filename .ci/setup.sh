# Sourced by .ci/demo, .ci/test and .ci/run: install what a fresh machine lacks
# (Debian packages; as root, or it names them) and start the local services.

# Install Debian packages that are missing, or say which to install.
ensure_packages() { # package...
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "pgtier needs these packages: ${missing[*]}" >&2
    echo "install them with: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# What building pgtier needs: pingora's zlib-ng (cmake) and pg_query's bindgen (libclang).
need_build() {
  command -v cargo >/dev/null || { echo "pgtier needs Rust: https://rustup.rs" >&2; exit 1; }
  ensure_packages cmake libclang-dev
}

# The local PostgreSQL on 127.0.0.1:5432, started if it is installed but down.
need_postgres() {
  if ! command -v pg_isready >/dev/null; then
    ensure_packages postgresql
  fi
  if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  fi
  for _ in $(seq 60); do pg_isready -h 127.0.0.1 -p 5432 -q && return 0; sleep 0.5; done
  echo "PostgreSQL did not come up on 127.0.0.1:5432" >&2
  exit 1
}

# The local Redis on 127.0.0.1:6379, started if it is down.
need_redis() {
  command -v redis-server >/dev/null || ensure_packages redis-server
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log
  fi
  for _ in $(seq 60); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "Redis did not come up on 127.0.0.1:6379" >&2
  exit 1
}

# Clients the tests drive besides their own: psql, pgbench; bc for the bench scripts.
need_test_tools() {
  command -v pgbench >/dev/null || ensure_packages postgresql-contrib
  command -v bc >/dev/null || ensure_packages bc
}
