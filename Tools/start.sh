#!/usr/bin/env bash
# The README's first command: install what is missing, build (release), and start a local 3-node
# cluster from cluster.example.toml in the foreground (data under ./data; Ctrl-C stops all nodes).
#   Tools/start.sh [CONFIG]
set -euo pipefail
cd "$(dirname "$0")/.."
Tools/install-deps.sh
swift build -c release --product weft
swift build -c release --product weft-dump
exec .build/release/weft local --config "${1:-cluster.example.toml}"
