#!/usr/bin/env bash
# The README's first command: install what is missing, build (release), and run the main job.
# Until the Raft issue lands that job is the store benchmark on a fresh directory:
#   Tools/start.sh [RECORDS]        (default 1000000; the directory is printed and left in place)
set -euo pipefail
cd "$(dirname "$0")/.."
Tools/install-deps.sh
swift build -c release --product weft
swift build -c release --product weft-dump
dir="$(mktemp -d /tmp/weft-bench.XXXXXX)"
.build/release/weft bench store --dir "$dir" --records "${1:-1000000}"
.build/release/weft-dump --verify "$dir"
