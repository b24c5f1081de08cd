#!/usr/bin/env bash
# By hand, for longer than CI: a 3-node cluster on loopback, a writer appending unique records through
# every node, and a loop that SIGKILLs the leader of shard 0 and restarts it. At the end every
# acknowledged record must be in every replica's log exactly once, in the same order.
#   Tools/kill-loop.sh [KILLS] [SECONDS_BETWEEN]     (default 20 kills, 2 s apart)
set -euo pipefail
cd "$(dirname "$0")/.."
kills="${1:-20}"; gap="${2:-2}"
swift build -c release --product weft >/dev/null
swift build -c release --product weft-dump >/dev/null
bin=.build/release
work=$(mktemp -d /tmp/weft-kill-loop.XXXXXX)
base=$((21000 + RANDOM % 2000 * 10))
cat > "$work/cluster.toml" <<TOML
[cluster]
name = "kill-loop"
shards = 1
replication = 3
secret = "kill-loop-secret-0123456789"
[storage]
data_dir = "data"
[api]
operator_token = "kill-loop-operator-token"
[raft]
election_timeout_min_ms = 300
election_timeout_max_ms = 600
heartbeat_interval_ms = 50
TOML
for n in 1 2 3; do
  printf '[[nodes]]\nid = %d\npeer_addr = "127.0.0.1:%d"\napi_addr = "127.0.0.1:%d"\n' "$n" $((base + 2*n + 1)) $((base + 2*n)) >> "$work/cluster.toml"
done
declare -A pid
start() { "$bin/weft" serve --config "$work/cluster.toml" --node "$1" --log-level warning >>"$work/node$1.log" 2>&1 & pid[$1]=$!; }
stop_all() { for n in 1 2 3; do kill -TERM "${pid[$n]}" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap stop_all EXIT
for n in 1 2 3; do start "$n"; done
sleep 2
leader() {
  for n in 1 2 3; do
    curl -s -m 1 -H "Authorization: Bearer kill-loop-operator-token" "127.0.0.1:$((base + 2*n))/api/v1/cluster/status" | grep -q '"role":"leader"' && { echo "$n"; return; }
  done
}
(
  k=0
  while [ ! -f "$work/stop" ]; do
    k=$((k+1)); via=$(( (k % 3) + 1 ))
    if out=$(curl -s -m 6 -H "Authorization: Bearer kill-loop-operator-token" -X POST "127.0.0.1:$((base + 2*via))/api/v1/shards/0/append" \
        -d "{\"records\":[{\"stream\":1,\"payload\":\"w$k\"}]}"); then
      case "$out" in *'"index"'*) echo "w$k" >> "$work/acked";; esac
    fi
  done
) &
writer=$!
for i in $(seq "$kills"); do
  sleep "$gap"
  l=$(leader || true)
  [ -n "$l" ] || continue
  kill -9 "${pid[$l]}"; wait "${pid[$l]}" 2>/dev/null || true
  echo "kill $i: node $l"
  sleep 0.5
  start "$l"
done
touch "$work/stop"; wait "$writer" || true
sleep 3
stop_all; trap - EXIT
for n in 1 2 3; do
  "$bin/weft-dump" --json "$work/data/$n/shard-0" | grep '"kind":"record"' | grep '"type":1,' \
    | sed 's/.*"payload_b64":"\([^"]*\)".*/\1/' | while read -r b; do echo "$b" | base64 -d; echo; done > "$work/log$n"
done
acked=$(sort -u "$work/acked" | wc -l)
lost=0
for n in 1 2 3; do
  l=$(comm -23 <(sort -u "$work/acked") <(sort -u "$work/log$n") | wc -l); lost=$((lost + l))
  d=$(sort "$work/log$n" | uniq -d | wc -l); [ "$d" -eq 0 ] || { echo "node $n: $d duplicates"; lost=$((lost + d)); }
done
same=yes; cmp -s "$work/log1" "$work/log2" && cmp -s "$work/log2" "$work/log3" || same=no
echo "kill-loop: $kills kills, $acked acknowledged, $lost lost or duplicated, replicas identical: $same (work dir $work)"
[ "$lost" -eq 0 ] && [ "$same" = yes ]
