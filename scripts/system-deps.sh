#!/usr/bin/env bash
# Installs the Debian packages kansas needs, if they are missing: redis-server and
# PostgreSQL always, and any extra ones named as arguments (e.g. `wrk` for benchmarks,
# `prometheus` for the alerting-rule tests: Debian's package brings `promtool` too);
# COMMAND=PACKAGE when they differ, e.g. `nft=nftables`.
# Needs root (or sudo) for apt-get; says what to do otherwise.
set -euo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
for extra in "$@"; do
  command -v "${extra%%=*}" >/dev/null 2>&1 || need+=("${extra#*=}")
done
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ]; then
  sudo=""
elif command -v sudo >/dev/null 2>&1; then
  sudo="sudo"
else
  echo "kansas needs: ${need[*]} (apt-get install ${need[*]})" >&2
  exit 1
fi
echo "installing ${need[*]} ..."
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
