#!/usr/bin/env bash
# The README's second command: install what is missing, build, and run the whole test suite:
# unit and property tests, tool tests that run the real weft and weft-dump binaries, the API against
# its OpenAPI spec (Tools/api-check.sh, schemathesis), a bounded
# fuzzing run of the decoders (FUZZ_SECONDS, default 60; 0 skips it), and a short fault run
# (Tools/weft-faults: FAULT_MINUTES of faults, default 3; FAULT_SEED, default fixed so CI replays the
# same schedule; needs root for network namespaces; FAULT_MINUTES=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
Tools/install-deps.sh
swift build --build-tests
# Line-buffered (stdbuf), so a log read through a pipe shows the test that is running; bounded (timeout),
# so a hung test ends the run with a failure and its name instead of running into CI's limit.
status=0
timeout -k 30 "${TEST_MINUTES:-45}m" stdbuf -oL -eL swift test --skip-build || status=$?
if [ "$status" != "0" ]; then
  echo "swift test failed (exit $status)" >&2
  pkill -9 -f WeftPackageTests.xctest || true
  pkill -9 -f "weft serve" || true
  exit "$status"
fi
# The live messaging API against Docs/openapi.yaml (schemathesis): no 5xx, nothing off the spec.
Tools/api-check.sh
if [ "${FUZZ_SECONDS:-60}" != "0" ]; then
  Tools/fuzz.sh "${FUZZ_SECONDS:-60}"
fi
if [ "${FAULT_MINUTES:-3}" != "0" ]; then
  .build/debug/weft-faults --minutes "${FAULT_MINUTES:-3}" --seed "${FAULT_SEED:-20261126}" --out fault-runs/ci
fi
