#!/usr/bin/env bash
# Install the peers the benchmarks compare with, from Debian, when missing:
# certbot and pebble (an ACME CA) for the certbot comparison, golang-cfssl for issuance.
set -euo pipefail
need=()
command -v certbot >/dev/null 2>&1 || need+=(certbot)
command -v pebble >/dev/null 2>&1 || [ -x /usr/bin/pebble ] || need+=(pebble)
command -v cfssl >/dev/null 2>&1 || need+=(golang-cfssl)
if [ ${#need[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
