import Foundation
import Testing
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// Issue 10: retention on real processes. A node is SIGKILLed, the shard writes on and drops its log's
/// start (`[storage] retention`), and the node, restarted, needs entries no replica has any more: the
/// leader ships its files and a snapshot; the node then serves the same records as the others.
extension Clusters {
    @Suite(.serialized) struct RetentionProcessTests {
        func get(_ c: ClusterProcess, node: Int, _ path: String) async -> (Int, [String: Any]) {
            guard let url = URL(string: "http://127.0.0.1:\(c.apiPorts[node]!)\(path)") else { return (0, [:]) }
            var req = URLRequest(url: url)
            req.setValue("Bearer \(ClusterProcess.token)", forHTTPHeaderField: "Authorization")
            req.timeoutInterval = 5
            guard let (data, resp) = try? await URLSession.shared.data(for: req) else { return (0, [:]) }
            return ((resp as? HTTPURLResponse)?.statusCode ?? 0, (try? JSONSerialization.jsonObject(with: data) as? [String: Any]) ?? [:])
        }

        /// Writes `n` records from `from` through the running nodes, 8 at a time; returns how many were acknowledged.
        func write(_ c: ClusterProcess, _ from: Int, _ n: Int, nodes: [Int]) async -> Int {
            await withTaskGroup(of: Int.self) { g in
                for w in 0..<8 {
                    g.addTask {
                        var ok = 0
                        for k in stride(from: from + w, to: from + n, by: 8) {
                            let pad = String(repeating: "retained history ", count: 6)
                            if await c.append(via: nodes[k % nodes.count], shard: 0, stream: UInt64(1 + k % 3), payload: "r\(k) \(pad)") != nil { ok += 1 }
                        }
                        return ok
                    }
                }
                var total = 0
                for await x in g { total += x }
                return total
            }
        }

        @Test(.timeLimit(.minutes(4))) func aNodeThatMissedDroppedEntriesIsCaughtUpFromFilesAndASnapshot() async throws {
            let c = try ClusterProcess(
                name: "retain", nodes: 3, shards: 1, segmentBytes: 4096, storage: "snapshot_every_records = 100\nretention = \"16KiB\"")
            try c.startAll()
            defer { c.stopAll() }
            _ = try #require(await c.leader(of: 0))
            #expect(await write(c, 0, 100, nodes: [1, 2, 3]) == 100)
            c.kill9(3)
            #expect(await write(c, 100, 700, nodes: [1, 2]) == 700)
            // The leader's retention check runs every 10 s: wait until both running replicas dropped well
            // past where node 3 stopped.
            var first: [Int: UInt64] = [:]
            let end = Date().addingTimeInterval(90)
            while Date() < end {
                for n in [1, 2] { first[n] = await c.status(n)?.shards.first?.first_index }
                if first.values.count == 2 && first.values.allSatisfy({ $0 > 300 }) { break }
                try await Task.sleep(for: .milliseconds(500))
            }
            try #require(first.values.count == 2 && first.values.allSatisfy { $0 > 300 }, "retention dropped nothing: \(first)")
            let (gone, _) = await get(c, node: 1, "/api/v1/shards/0/log?from=1&limit=10&consistency=local")
            #expect(gone == 410, "a read below the first index is answered 410 compacted")

            try c.start(3)
            let leader = try #require(await c.leader(of: 0))
            let target = try #require(await c.status(leader)?.shards.first?.commit_index)
            var caught: ClusterProcess.Status.Shard?
            let end2 = Date().addingTimeInterval(90)
            while Date() < end2 {
                if let s = await c.status(3)?.shards.first, (s.applied_index ?? 0) >= target, s.repair?.recovering == false {
                    caught = s
                    break
                }
                try await Task.sleep(for: .milliseconds(300))
            }
            let s3 = try #require(caught, "node 3 did not catch up to \(target)")
            #expect((s3.first_index ?? 1) > 1, "node 3 took the leader's files, which start after index 1")
            #expect((s3.stats?.snapshotsInstalled ?? 0) >= 1, "node 3 installed the leader's files with a snapshot: \(String(describing: s3.stats))")
            // Node 3 serves the same records as the leader, from its own replica.
            for stream in 1...3 {
                let (a, ja) = await get(c, node: 3, "/api/v1/shards/0/streams/\(stream)?cursor=1&limit=1000&consistency=local")
                let (b, jb) = await get(c, node: leader, "/api/v1/shards/0/streams/\(stream)?cursor=1&limit=1000&consistency=local")
                #expect(a == 200 && b == 200)
                let pa = (ja["records"] as? [[String: Any]] ?? []).compactMap { $0["payload_b64"] as? String }
                let pb = (jb["records"] as? [[String: Any]] ?? []).compactMap { $0["payload_b64"] as? String }
                #expect(!pa.isEmpty && pa.suffix(50) == pb.suffix(50), "stream \(stream): node 3 serves what the leader serves")
            }
            // And it keeps up with new writes.
            #expect(await write(c, 800, 40, nodes: [1, 2, 3]) == 40)
        }
    }
}
