import Foundation
import Testing
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

extension Clusters {
    /// A node added to a shard with a long log catches up from the leader's sealed segment files (shipped
    /// whole on the peer connection), not entry by entry: its sealed segments end up byte-identical to
    /// the leader's.
    @Suite(.serialized) struct CatchUpTests {
        func post(_ c: ClusterProcess, _ n: Int, _ path: String, _ body: Data, type: String) async -> Int {
            guard let url = URL(string: "http://127.0.0.1:\(c.apiPorts[n]!)\(path)") else { return 0 }
            var req = URLRequest(url: url)
            req.setValue("Bearer \(ClusterProcess.token)", forHTTPHeaderField: "Authorization")
            req.httpMethod = "POST"
            req.httpBody = body
            req.setValue(type, forHTTPHeaderField: "Content-Type")
            req.timeoutInterval = 15
            guard let (_, resp) = try? await URLSession.shared.data(for: req) else { return 0 }
            return (resp as? HTTPURLResponse)?.statusCode ?? 0
        }

        @Test func aNewReplicaCatchesUpFromSegmentFiles() async throws {
            let c = try ClusterProcess(name: "catchup", nodes: 4, shards: 1, segmentBytes: 4096)
            try c.startAll()
            defer { c.stopAll() }
            let leader = try #require(await c.leader(of: 0))
            // ~300 KB of incompressible log in 4 KiB segments: one segment or more per request.
            var rng = SystemRandomNumberGenerator()
            for batch in 0..<20 {
                var body = Data()
                for k in 0..<100 {
                    let payload = Array("catch-up record \(batch)-\(k) ".utf8) + (0..<150).map { _ in UInt8.random(in: 0...255, using: &rng) }
                    withUnsafeBytes(of: UInt64(k % 7 + 1).littleEndian) { body.append(contentsOf: $0) }
                    withUnsafeBytes(of: UInt32(payload.count).littleEndian) { body.append(contentsOf: $0) }
                    body.append(contentsOf: payload)
                }
                #expect(await post(c, leader, "/api/v1/shards/0/append", body, type: "application/x-weft-records") == 200)
            }
            #expect(await post(c, leader, "/api/v1/admin/shards/0/membership", Data(#"{"add_voter":4}"#.utf8), type: "application/json") == 200)
            var caughtUp = false
            for _ in 0..<150 where !caughtUp {
                let s4 = await c.status(4)?.shards.first
                let sl = await c.status(leader)?.shards.first
                caughtUp = s4 != nil && s4?.commit_index == sl?.commit_index
                if !caughtUp { try await Task.sleep(for: .milliseconds(100)) }
            }
            #expect(caughtUp, "node 4 did not catch up")
            c.stopAll()
            let leaderDir = c.shardDirectory(node: leader, shard: 0)
            let newDir = c.shardDirectory(node: 4, shard: 0)
            let fm = FileManager.default
            let sealed = try fm.contentsOfDirectory(atPath: leaderDir).filter { $0.hasSuffix(".idx") }.map { String($0.dropLast(4)) + ".seg" }.sorted()
            #expect(sealed.count > 5, "the leader sealed too few segments: \(sealed.count)")
            var identical = 0
            for name in sealed where fm.contentsEqual(atPath: leaderDir + "/" + name, andPath: newDir + "/" + name) { identical += 1 }
            // All but possibly the newest sealed segment (sealed after the catch-up) were shipped whole.
            print("catch-up test: \(identical) of \(sealed.count) sealed segments identical to the leader's")
            #expect(identical >= sealed.count - 1, "only \(identical) of \(sealed.count) sealed segments are the leader's files")
        }
    }
}
