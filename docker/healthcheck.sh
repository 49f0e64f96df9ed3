#!/bin/bash
# Container health check for pgtier: GET an admin endpoint (default /health)
# and succeed on HTTP 200.
#
#     pgtier-healthcheck [/health|/ready]
#
# The runtime image has no curl or wget (keeping it small), so this uses bash's
# /dev/tcp. The address comes from PGTIER_ADMIN_LISTEN (the image sets
# 0.0.0.0:9930); a wildcard host is probed on loopback.
set -u

path="${1:-/health}"
addr="${PGTIER_ADMIN_LISTEN:-127.0.0.1:9930}"
port="${addr##*:}"
host="${addr%:*}"
host="${host#[}"
host="${host%]}"
case "$host" in
    "" | 0.0.0.0) host=127.0.0.1 ;;
    ::) host=::1 ;;
esac

if ! exec 3<>"/dev/tcp/$host/$port"; then
    echo "pgtier admin endpoint $host:$port: connection refused" >&2
    exit 1
fi
printf 'GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' "$path" >&3
status=""
IFS= read -r -t 5 status <&3
exec 3<&-
case "$status" in
    "HTTP/1."?" 200 "*) exit 0 ;;
esac
echo "pgtier $path: ${status:-no response}" >&2
exit 1
