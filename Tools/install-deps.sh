#!/usr/bin/env bash
# Installs the system packages Weft builds against, if missing (Debian/Ubuntu, apt-get; root or sudo).
set -euo pipefail
need=()
# iproute2 and iptables: the fault harness (Tools/weft-faults) builds its test network with them.
for p in liblz4-dev libssl-dev pkg-config iproute2 iptables; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
command -v swift >/dev/null || { echo "swift (6.1 or newer) is not on PATH" >&2; exit 1; }
