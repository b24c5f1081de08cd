#!/usr/bin/env bash
# Fuzz the segment, block, record and index decoders with libFuzzer for a bounded time.
#   Tools/fuzz.sh [SECONDS] [SEED_DIR...]      (default 60 s)
# Builds weft-fuzz-decoder with -sanitize=fuzzer,address into .build-fuzz. Crashes and slow or huge
# inputs are written to fuzz-out/ (replay one with: .build/debug/weft-fuzz-decoder fuzz-out/crash-*).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
swift build --product weft-fuzz-decoder --scratch-path .build-fuzz \
  -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING -Xswiftc -use-ld=lld
bin=".build-fuzz/debug/weft-fuzz-decoder"
mkdir -p fuzz-out/corpus
# Seed with real segment and index files when some are given (e.g. a small `weft bench store` dir).
for d in "$@"; do
  find "$d" -name '*.seg' -size -2M -exec cp {} fuzz-out/corpus/ \; 2>/dev/null || true
  find "$d" -name '*.idx' -size -2M -exec cp {} fuzz-out/corpus/ \; 2>/dev/null || true
done
# -rss_limit_mb / -malloc_limit_mb: a decoder that tries a huge allocation on hostile input fails here.
"$bin" fuzz-out/corpus -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=512 \
  -max_len=65536 -artifact_prefix=fuzz-out/ -print_final_stats=1
echo "fuzz: no crash in ${seconds} s"
