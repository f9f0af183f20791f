#!/usr/bin/env bash
# `make bench`: install the benchmark's origin and peers from Debian's packages if they are
# missing and we may (root with apt-get); otherwise say what is missing and go on without it.
set -uo pipefail
declare -A pkg=([redis-server]=redis-server [nginx]=nginx-light [curl]=curl [wget]=wget [aria2c]=aria2)
missing=()
for tool in "${!pkg[@]}"; do
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || missing+=("${pkg[$tool]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "bench: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null \
    || echo "bench: could not install ${missing[*]}; those peers are skipped" >&2
else
  echo "bench: missing ${missing[*]} (apt-get install ${missing[*]}); those peers are skipped" >&2
fi
exit 0
