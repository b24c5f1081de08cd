import Foundation
import Testing
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// Issue 10: a relay between two shards of real processes across SIGKILLs of both shards' leaders: every
/// fan-out record written to shard 0 reaches its stream in shard 1 exactly once.
extension Clusters {
    @Suite(.serialized) struct RelayProcessTests {
        /// `u16 n=1 | u64 shard | u64 stream | body`.
        static func fanout(to shard: UInt64, stream: UInt64, _ body: String) -> Data {
            var d = Data([1, 0])
            withUnsafeBytes(of: shard.littleEndian) { d.append(contentsOf: $0) }
            withUnsafeBytes(of: stream.littleEndian) { d.append(contentsOf: $0) }
            d.append(contentsOf: Array(body.utf8))
            return d
        }

        func post(_ c: ClusterProcess, node: Int, key: String, body: Data) async -> (Int, Data) {
            guard let url = URL(string: "http://127.0.0.1:\(c.apiPorts[node]!)/api/v1/shards/0/append") else { return (0, Data()) }
            var req = URLRequest(url: url)
            req.setValue("Bearer \(ClusterProcess.token)", forHTTPHeaderField: "Authorization")
            req.setValue(key, forHTTPHeaderField: "Idempotency-Key")
            req.setValue("application/json", forHTTPHeaderField: "Content-Type")
            req.httpMethod = "POST"
            req.timeoutInterval = 6
            req.httpBody = try? JSONSerialization.data(withJSONObject: ["records": [["stream": 2, "type": 6, "payload_b64": body.base64EncodedString()]]])
            guard let (data, resp) = try? await URLSession.shared.data(for: req) else { return (0, Data()) }
            return ((resp as? HTTPURLResponse)?.statusCode ?? 0, data)
        }

        func derived(_ c: ClusterProcess, node: Int) async -> [Data]? {
            var out: [Data] = []
            var cursor = 1
            while true {
                guard let url = URL(string: "http://127.0.0.1:\(c.apiPorts[node]!)/api/v1/shards/1/streams/9?cursor=\(cursor)&limit=1000") else { return nil }
                var req = URLRequest(url: url)
                req.setValue("Bearer \(ClusterProcess.token)", forHTTPHeaderField: "Authorization")
                req.timeoutInterval = 8
                guard let (data, resp) = try? await URLSession.shared.data(for: req), (resp as? HTTPURLResponse)?.statusCode == 200,
                    let obj = try? JSONSerialization.jsonObject(with: data) as? [String: Any], let recs = obj["records"] as? [[String: Any]]
                else { return nil }
                if recs.isEmpty { return out }
                out += recs.compactMap { ($0["payload_b64"] as? String).flatMap { Data(base64Encoded: $0) } }
                cursor = obj["next"] as? Int ?? cursor + recs.count
            }
        }

        @Test(.timeLimit(.minutes(3))) func fanoutRecordsReachTheirStreamOnceAcrossKillsOfBothLeaders() async throws {
            let c = try ClusterProcess(name: "relay", nodes: 3, shards: 2)
            try c.startAll()
            defer { c.stopAll() }
            _ = try #require(await c.leader(of: 0))
            _ = try #require(await c.leader(of: 1))
            let total = 40
            var sourceIndex: [String: UInt64] = [:]
            var killed: [Int] = []
            var kills: [String] = []
            // Writes 10...14 and 20...24 go on with one node down; each write is retried (same key) until
            // acknowledged.
            for k in 0..<total {
                // One leader at a time, so a quorum stays up: shard 0's, then shard 1's (the same node's
                // second kill when it leads both).
                if k == 10 || k == 20, let l = await c.leader(of: k == 10 ? 0 : 1, seconds: 2) {
                    c.kill9(l)
                    killed.append(l)
                    kills.append("leader \(l) of shard \(k == 10 ? 0 : 1) at write \(k)")
                }
                if k == 15 || k == 25 {
                    for n in killed { try c.start(n) }
                    killed = []
                }
                var acked = false
                for attempt in 0..<40 where !acked {
                    let node = c.nodes.filter { !killed.contains($0) }[(k + attempt) % c.nodes.filter { !killed.contains($0) }.count]
                    let (s, data) = await post(c, node: node, key: "f\(k)", body: Self.fanout(to: 1, stream: 9, "f\(k)"))
                    if s == 200, let ack = try? JSONDecoder().decode(ClusterProcess.Ack.self, from: data), let r = ack.records.first {
                        sourceIndex["f\(k)"] = r.index
                        acked = true
                    } else {
                        try await Task.sleep(for: .milliseconds(200))
                    }
                }
                #expect(acked, "f\(k) was never acknowledged")
            }
            // Kill the destination's leader once more while the relay catches up.
            if let l1 = await c.leader(of: 1, seconds: 2) {
                kills.append("leader \(l1) of shard 1 while the relay catches up")
                c.kill9(l1)
                try await Task.sleep(for: .milliseconds(500))
                try c.start(l1)
            }
            var got: [Data] = []
            let end = Date().addingTimeInterval(60)
            while Date() < end {
                for n in c.nodes {
                    if let d = await derived(c, node: n) { got = d }
                }
                if got.count >= total { break }
                try await Task.sleep(for: .milliseconds(300))
            }
            // Each derived record: u64 source shard | u64 source index | body.
            var seen: [String: Int] = [:]
            for d in got {
                let b = [UInt8](d)
                guard b.count > 16 else {
                    Issue.record("a derived record of \(b.count) bytes")
                    continue
                }
                let source = b[0..<8].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
                let index = b[8..<16].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
                let body = String(decoding: b[16...], as: UTF8.self)
                #expect(source == 0)
                #expect(sourceIndex[body] == index, "\(body) derived from index \(index), acknowledged at \(String(describing: sourceIndex[body]))")
                seen[body, default: 0] += 1
            }
            print("relay process test: killed \(kills.joined(separator: "; ")); \(got.count) derived records")
            #expect(kills.count == 3)
            for k in 0..<total { #expect(seen["f\(k)"] == 1, "f\(k) arrived \(seen["f\(k)"] ?? 0) times") }
            #expect(got.count == total)
            // The source leader reports the relay's lag (refreshed at most once a second): 0 once caught up.
            var lagLine: String?
            let metricsEnd = Date().addingTimeInterval(10)
            while lagLine == nil && Date() < metricsEnd {
                for n in c.nodes {
                    guard let text = await c.metricsText(n) else { continue }
                    lagLine = text.split(separator: "\n").first { $0.hasPrefix("weft_relay_lag_records{") && $0.contains("source=\"0\"") && $0.contains("destination=\"1\"") && $0.hasSuffix(" 0.0") || ($0.hasPrefix("weft_relay_lag_records{") && $0.contains("source=\"0\"") && $0.hasSuffix(" 0")) }.map(String.init)
                    if lagLine != nil { break }
                }
                if lagLine == nil { try await Task.sleep(for: .milliseconds(500)) }
            }
            #expect(lagLine != nil, "no weft_relay_lag_records line for source 0 at 0")
        }
    }
}
