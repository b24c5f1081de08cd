#!/usr/bin/env bash
# Checks the live messaging API against Docs/openapi.yaml with schemathesis (PyPI): starts a 3-node
# cluster on 127.0.0.1:18201-18206, signs up two users who are contacts with a message between them, and
# runs schemathesis with a token of one of them. Fails on any 5xx, any status, content type, header or
# body the spec does not allow, and any invalid input the API accepts. API_CHECK_EXAMPLES (default 40)
# examples per operation.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v st >/dev/null || { echo "schemathesis (st) is not installed: Tools/install-deps.sh installs it" >&2; exit 1; }
dir=$(mktemp -d /tmp/weft-api-check.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
cat > "$dir/cluster.toml" <<TOML
[cluster]
name = "api-check"
shards = 4
replication = 3
secret = "api-check-secret-0123456789"
[storage]
data_dir = "data"
[api]
operator_token = "api-check-operator-token-0123"
[messaging]
bcrypt_cost = 4
sends_per_minute = 1000000
history_reads_per_minute = 1000000
actions_per_minute = 1000000
syncs_per_minute = 1000000
logins_per_minute = 1000000
[[nodes]]
id = 1
peer_addr = "127.0.0.1:18202"
api_addr = "127.0.0.1:18201"
[[nodes]]
id = 2
peer_addr = "127.0.0.1:18204"
api_addr = "127.0.0.1:18203"
[[nodes]]
id = 3
peer_addr = "127.0.0.1:18206"
api_addr = "127.0.0.1:18205"
TOML
for n in 1 2 3; do
  .build/debug/weft serve --config "$dir/cluster.toml" --node "$n" --log-level warning > "$dir/node$n.log" 2>&1 &
  pids+=($!)
done
api=http://127.0.0.1:18201
json() { python3 -c "import sys,json; print(json.load(sys.stdin)$1)"; }
post() { curl -s -X POST "$api$1" -H 'Content-Type: application/json' "${@:3}" -d "$2"; }
for _ in $(seq 1 100); do
  if post /api/v1/auth/register '{"username":"checker","password":"password-123"}' | grep -q user_id; then break; fi
  sleep 0.2
done
for _ in $(seq 1 50); do
  if post /api/v1/auth/register '{"username":"peer","password":"password-123"}' | grep -q user_id; then break; fi
  sleep 0.2
done
token=$(post /api/v1/auth/login '{"username":"checker","password":"password-123"}' | json "['token']")
peer_token=$(post /api/v1/auth/login '{"username":"peer","password":"password-123"}' | json "['token']")
me=$(curl -s "$api/api/v1/users/me" -H "Authorization: Bearer $token" | json "['user_id']")
peer=$(curl -s "$api/api/v1/users/me" -H "Authorization: Bearer $peer_token" | json "['user_id']")
post /api/v1/contacts/requests "{\"user_id\":$peer}" -H "Authorization: Bearer $token" > /dev/null
post "/api/v1/contacts/requests/$me/accept" '' -H "Authorization: Bearer $peer_token" > /dev/null
post /api/v1/messages "{\"receiver_id\":$peer,\"message_type\":\"text\",\"content\":\"hello\"}" -H "Authorization: Bearer $token" | grep -q message_id
# A group of the two, with a message that mentions the peer: sync, conversations and the group routes
# then answer with group data too.
group=$(post /api/v1/groups "{\"name\":\"checkers\",\"member_ids\":[$peer]}" -H "Authorization: Bearer $token" | json "['group_id']")
post /api/v1/messages "{\"group_id\":$group,\"message_type\":\"text\",\"content\":\"hi all\",\"mentions\":[$peer]}" -H "Authorization: Bearer $token" | grep -q message_id
# Logout and TOTP would end the token's session half way through the run: checked by the process tests.
# From the temporary folder: schemathesis keeps its cache (.schemathesis/) in the working directory.
spec="$PWD/Docs/openapi.yaml"
cd "$dir"
# A body past 16 KiB is refused with 413 before it is parsed (an over-long member list is both invalid
# and too large): a rejection like any other 4xx.
cat > schemathesis.toml <<'CONF'
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
CONF
st run "$spec" --url "$api" -H "Authorization: Bearer $token" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection \
  --exclude-path /api/v1/auth/logout --exclude-path-regex '/api/v1/auth/totp/.*' \
  --max-examples "${API_CHECK_EXAMPLES:-40}" --request-timeout 10 --generation-deterministic --workers 1
