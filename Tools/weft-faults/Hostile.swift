import Foundation
import NIOHTTP1

/// A hostile client, on a seeded schedule through the whole run: requests that every node must refuse
/// with a 4xx and that must leave no trace — records of reserved types (JSON, sent to the leader or to
/// a node that would forward them), payloads over 4 MiB, bodies over 16 MiB, malformed JSON, truncated
/// binary bodies, and requests without the operator token or with a wrong one (appends, membership
/// changes, reads). Every payload starts with a unique marker (`HOSTILE-<n>-<kind>`); the checker fails
/// if any marker is in any final log, and if any of these requests got a 2xx or a 5xx.
struct HostileClient: Sendable {
    let client: HTTPClient
    let nodes: [Int]
    let shards: Int
    let history: History
    /// The stream hostile records would go to.
    let stream = 7
    static let reservedTypes = [0, 2, 3, 4, 100, 0x7FFF]

    enum Kind: String, CaseIterable {
        case reservedType = "reserved-type"
        case reservedTypeB64 = "reserved-type-b64"
        case reservedTypeMixed = "reserved-type-in-mixed-batch"
        case oversizeJSON = "oversize-payload-json"
        case oversizeBinary = "oversize-payload-binary"
        case bodyTooLarge = "body-over-16-mib"
        case malformedJSON = "malformed-json"
        case truncatedBinary = "truncated-binary"
        case noToken = "no-token"
        case wrongToken = "wrong-token"
        case unauthorizedAdmin = "membership-change-without-token"
        case unauthorizedRead = "read-without-token"
    }

    static let weights: [(Kind, Int)] = [
        (.reservedType, 16), (.reservedTypeB64, 6), (.reservedTypeMixed, 6), (.oversizeJSON, 3), (.oversizeBinary, 3), (.bodyTooLarge, 1),
        (.malformedJSON, 8), (.truncatedBinary, 8), (.noToken, 8), (.wrongToken, 8), (.unauthorizedAdmin, 6), (.unauthorizedRead, 6),
    ]

    func run(until end: ContinuousClock.Instant, seed: UInt64) async {
        var rng = SplitMix(seed: seed ^ 0x4057_11E5)
        var n = 0
        while ContinuousClock.now < end {
            n += 1
            var r = Int(rng.next() % UInt64(Self.weights.reduce(0) { $0 + $1.1 }))
            var kind = Kind.reservedType
            for (k, w) in Self.weights {
                if r < w {
                    kind = k
                    break
                }
                r -= w
            }
            await send(n: n, kind: kind, rng: &rng)
            try? await Task.sleep(for: rng.millis(150...600))
        }
    }

    /// The leader of `shard` as the first answering node sees it.
    func leader(shard: Int) async -> Int? {
        for n in nodes {
            if let s = await client.json(host: TestNetwork.address(n), port: Cluster.apiPort, path: "/api/v1/cluster/status", timeout: .seconds(1)),
                let sh = (s["shards"] as? [[String: Any]])?.first(where: { ($0["id"] as? Int) == shard }), let l = sh["leader"] as? Int
            {
                return l
            }
        }
        return nil
    }

    static func json(_ text: String) -> [UInt8] { Array(text.utf8) }

    static func binaryRecord(stream: UInt64, payload: [UInt8], claimedLength: Int? = nil) -> [UInt8] {
        var out: [UInt8] = []
        withUnsafeBytes(of: stream.littleEndian) { out += $0 }
        withUnsafeBytes(of: UInt32(claimedLength ?? payload.count).littleEndian) { out += $0 }
        return out + payload
    }

    /// `count` bytes: the marker, then filler.
    static func big(_ marker: String, _ count: Int) -> [UInt8] { bigChunks(marker, count).flatMap { $0 } }

    static let filler = [UInt8](repeating: UInt8(ascii: "x"), count: 1 << 20)

    /// The same bytes as `big`, as chunks that share one MiB of filler.
    static func bigChunks(_ marker: String, _ count: Int) -> [[UInt8]] {
        var out = [Array(marker.utf8)]
        var left = max(0, count - out[0].count)
        while left > 0 {
            let n = min(left, filler.count)
            out.append(n == filler.count ? filler : Array(filler.prefix(n)))
            left -= n
        }
        return out
    }

    static func binaryHeader(stream: UInt64, length: Int) -> [UInt8] {
        var out: [UInt8] = []
        withUnsafeBytes(of: stream.littleEndian) { out += $0 }
        withUnsafeBytes(of: UInt32(length).littleEndian) { out += $0 }
        return out
    }

    func send(n: Int, kind: Kind, rng: inout SplitMix) async {
        let shard = Int(rng.next() % UInt64(shards))
        var node = rng.pick(nodes)
        let marker = "\(Checker.hostileMarker)\(n)-\(kind.rawValue)"
        let appendPath = "/api/v1/shards/\(shard)/append"
        var path = appendPath
        var method = HTTPMethod.POST
        var body: [UInt8] = []
        /// Set for the large bodies: sent chunk by chunk instead of `body`.
        var chunks: [[UInt8]]? = nil
        var contentType = "application/json"
        var auth = Authorization.operatorToken
        var expected: UInt = 400
        var timeout = Duration.seconds(5)
        var detail = kind.rawValue
        switch kind {
        case .reservedType, .reservedTypeB64, .reservedTypeMixed:
            let type = rng.pick(Self.reservedTypes)
            detail += "-\(type)"
            // Half of them go to a node that does not lead the shard (it would forward them).
            let viaFollower = rng.chance(0.5)
            if let l = await leader(shard: shard) {
                let others = nodes.filter { $0 != l }
                node = viaFollower && !others.isEmpty ? rng.pick(others) : l
                detail += viaFollower ? "-via-follower" : "-via-leader"
            }
            let m = "\(marker)-\(type)"
            switch kind {
            case .reservedType:
                body = Self.json(#"{"records":[{"stream":\#(stream),"type":\#(type),"payload":"\#(m)"}]}"#)
            case .reservedTypeB64:
                body = Self.json(#"{"records":[{"stream":\#(stream),"type":\#(type),"payload_b64":"\#(Data(m.utf8).base64EncodedString())"}]}"#)
            default:
                body = Self.json(
                    #"{"records":[{"stream":\#(stream),"payload":"\#(m)-data"},{"stream":\#(stream),"type":\#(type),"payload":"\#(m)-reserved"},{"stream":\#(stream),"type":1,"payload":"\#(m)-typed-data"}]}"#)
            }
        case .oversizeJSON:
            // 4 MiB + 1 of text: over the payload limit, under the body limit.
            chunks = [Self.json(#"{"records":[{"stream":\#(stream),"payload":""#)] + Self.bigChunks(marker, (4 << 20) + 1) + [Self.json(#""}]}"#)]
            expected = 413
            timeout = .seconds(20)
        case .oversizeBinary:
            chunks = [Self.binaryHeader(stream: UInt64(stream), length: (4 << 20) + 1)] + Self.bigChunks(marker, (4 << 20) + 1)
            contentType = "application/x-weft-records"
            expected = 413
            timeout = .seconds(20)
        case .bodyTooLarge:
            // Five records of 3.5 MiB (each under the payload limit): 17.5 MiB, over the 16 MiB body limit.
            var parts: [[UInt8]] = []
            for k in 0..<5 { parts += [Self.binaryHeader(stream: UInt64(stream), length: 3_670_016)] + Self.bigChunks("\(marker)-\(k)", 3_670_016) }
            chunks = parts
            contentType = "application/x-weft-records"
            expected = 413
            timeout = .seconds(30)
        case .malformedJSON:
            let forms = [
                #"{"records":[{"stream":\#(stream),"payload":"\#(marker)"}"#,  // cut off
                #"{"records":[{"stream":\#(stream),"payload":"\#(marker)"}]}}"#,  // trailing brace
                #"{"records":{"stream":\#(stream),"payload":"\#(marker)"}}"#,  // not an array
                #"{"records":[{"stream":"\#(stream)","payload":"\#(marker)"}]}"#,  // stream as a string
                #"{"records":[{"stream":\#(stream),"type":65536,"payload":"\#(marker)"}]}"#,  // type out of u16
                #"{"records":[{"stream":\#(stream),"payload":"\#(marker)","payload_b64":"SE9TVElMRQ=="}]}"#,  // both payloads
                "\(marker) is not JSON",
            ]
            let k = Int(rng.next() % UInt64(forms.count))
            detail += "-\(k)"
            body = Self.json(forms[k])
        case .truncatedBinary:
            let whole = Self.binaryRecord(stream: UInt64(stream), payload: Array("\(marker)-complete".utf8))
            let forms: [[UInt8]] = [
                // The length says 200 bytes, 60 follow.
                Self.binaryRecord(stream: UInt64(stream), payload: Self.big(marker, 60), claimedLength: 200),
                // A whole record, then half a header.
                whole + Array(whole.prefix(7)),
                // A whole record, then a header whose payload is missing.
                whole + Self.binaryRecord(stream: UInt64(stream), payload: [], claimedLength: 50),
            ]
            let k = Int(rng.next() % UInt64(forms.count))
            detail += "-\(k)"
            body = forms[k]
            contentType = "application/x-weft-records"
        case .noToken, .wrongToken:
            expected = 401
            if rng.chance(0.5) {
                body = Self.json(#"{"records":[{"stream":\#(stream),"payload":"\#(marker)"}]}"#)
            } else {
                body = Self.binaryRecord(stream: UInt64(stream), payload: Array(marker.utf8))
                contentType = "application/x-weft-records"
                detail += "-binary"
            }
            if kind == .noToken {
                auth = .none
            } else {
                let token = client.token
                let forms = [
                    "Bearer \(token)x", "Bearer \(token.dropLast())", "Bearer \(token.prefix(16))", "Basic \(token)", token, "Bearer",
                    "bearer-\(token)", "Bearer wf-0000000000000000-0000000000000000",
                ]
                let k = Int(rng.next() % UInt64(forms.count))
                detail += "-\(k)"
                auth = .header(forms[k])
            }
        case .unauthorizedAdmin:
            expected = 401
            path = "/api/v1/admin/shards/\(shard)/membership"
            let target = rng.pick(nodes)
            body = Self.json(rng.chance(0.5) ? #"{"remove_voter":\#(target)}"# : #"{"add_learner":\#(target)}"#)
            auth = rng.chance(0.5) ? .none : .header("Bearer \(client.token.dropFirst())")
        case .unauthorizedRead:
            expected = 401
            method = .GET
            path = rng.pick(["/api/v1/cluster/status", "/api/v1/shards/\(shard)/log?from=1&limit=10", "/api/v1/shards/\(shard)/streams/1?cursor=1&limit=10"])
            auth = rng.chance(0.5) ? .none : .header("Bearer not-the-operator-token")
        }
        let outcome = await client.request(
            method, host: TestNetwork.address(node), port: Cluster.apiPort, path: path, chunks: chunks ?? [body], contentType: contentType, auth: auth,
            timeout: timeout)
        await history.hostile(kind: detail, marker: marker, node: node, path: path, expected: expected, outcome: outcome)
    }
}
