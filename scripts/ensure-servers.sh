#!/usr/bin/env bash
# Makes sure the Redis and PostgreSQL server binaries that the tests start throwaway copies of
# are installed. Installs them from Debian's packages when missing; nothing is started here.
set -euo pipefail

have_pg() { command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
have_redis() { command -v redis-server >/dev/null 2>&1; }

missing=()
have_pg || missing+=(postgresql)
have_redis || missing+=(redis-server)
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing missing server packages: ${missing[*]}"
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: ${missing[*]} missing and no apt-get here; install them, or point the tests at running" \
       "servers with CHR_TEST_POSTGRES_URL and CHR_TEST_REDIS_URL" >&2
  exit 1
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
