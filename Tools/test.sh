#!/usr/bin/env bash
# The README's second command: install what is missing, build, and run the whole test suite:
# unit and property tests, tool tests that run the real weft and weft-dump binaries, and a bounded
# fuzzing run of the decoders (FUZZ_SECONDS, default 60; 0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
Tools/install-deps.sh
swift build --build-tests
swift test --skip-build
if [ "${FUZZ_SECONDS:-60}" != "0" ]; then
  Tools/fuzz.sh "${FUZZ_SECONDS:-60}"
fi
