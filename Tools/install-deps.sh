#!/usr/bin/env bash
# Installs the system packages Weft builds against, if missing (Debian/Ubuntu, apt-get; root or sudo).
set -euo pipefail
need=()
# iproute2 and iptables: the fault harness (Tools/weft-faults) builds its test network with them.
# openssl (the command): Tools/webhook-receiver.py makes its test certificate with it.
for p in liblz4-dev libssl-dev pkg-config iproute2 iptables openssl; do
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
# schemathesis (PyPI): Tools/api-check.sh checks the live API against Docs/openapi.yaml with it.
if ! command -v st >/dev/null; then
  echo "installing: schemathesis (pip)"
  python3 -m pip install --quiet schemathesis==4.32.5 2>/dev/null || python3 -m pip install --quiet --break-system-packages schemathesis==4.32.5
fi
