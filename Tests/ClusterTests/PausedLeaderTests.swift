import Foundation
import Testing

extension Clusters {
    /// A leader that stops answering without closing its connections (SIGSTOP): the other nodes elect
    /// another, and writes through them go on. Before stop 24, a node whose leader hint named the paused
    /// node sent every later write there (each timing out after 5 s) until something else refreshed the
    /// hint; found when a test paused a leader, reproduced here. Since stop 25 a node's hint also follows
    /// its own replica's view of the leader, so not even the first write after the election is lost.
    @Suite(.serialized) struct PausedLeaderTests {
        /// The leader of shard 0 that node `asking` knows, once it is not `other` (10 s at most). Only that
        /// node is asked: a status read touches no other node's state.
        static func leader(other: Int, asking: Int, _ c: ClusterProcess) async -> UInt64? {
            for _ in 0..<100 {
                if let l = await c.status(asking)?.shards.first?.leader, l != UInt64(other) { return l }
                try? await Task.sleep(for: .milliseconds(100))
            }
            return nil
        }

        @Test(.timeLimit(.minutes(3))) func writesGoOnAfterTheLeaderIsPaused() async throws {
            let c = try ClusterProcess(name: "pausedleader", nodes: 3, shards: 1, messaging: "bcrypt_cost = 4\nsends_per_minute = 100000")
            try c.startAll()
            defer {
                for n in c.nodes { c.pause(n, false) }
                c.stopAll()
            }
            _ = try #require(await c.leader(of: 0))
            let (_, a, bob, _) = try await DeliveryProcessTests.contacts(c)
            // Node 3 to lead: pause whoever leads until node 3 wins an election.
            for _ in 0..<20 {
                guard let l = await c.leader(of: 0, seconds: 3), l != 3 else { break }
                c.pause(l, true)
                try await Task.sleep(for: .milliseconds(1500))
                c.pause(l, false)
                try await Task.sleep(for: .milliseconds(500))
            }
            try #require(await c.leader(of: 0, seconds: 3) == 3, "node 3 never led the shard")
            // Both other nodes forward to node 3 (their hints name it: a `not leader` answer of their own
            // replica sets it even without the replica's view).
            for n in [1, 2] {
                #expect(await c.status(n)?.shards.first?.leader == 3)
                let r = await c.call(n, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "via \(n)"])
                #expect(r.status == 200)
            }
            c.pause(3, true)
            // Nodes 1 and 2 elect a leader among themselves (node 1's status says when).
            try #require(await Self.leader(other: 3, asking: 1, c) != nil, "nodes 1 and 2 elected no leader")
            // Node 2's replica hears from the new leader within a heartbeat; a second is a wide margin.
            try await Task.sleep(for: .seconds(1))
            var statuses: [Int] = []
            for k in 0..<6 {
                let r = await c.call(2 - k % 2, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "p\(k)"])
                statuses.append(r.status)
            }
            // Every write goes to the new leader, the first through node 2 included: its hint follows
            // what its own replica knows. (Stop 24's fix alone, dropping a hint whose forward timed
            // out, still cost each node one write of 5 s ending 504.)
            #expect(statuses == [200, 200, 200, 200, 200, 200], "\(statuses)")
        }

        /// The same through a node that holds no replica of the shard (4 nodes, replication 3): it has no
        /// replica to tell it of the new leader, so the new leader tells it (`leader` frame). Without
        /// that, its first raw append after the pause went to the paused node and ended 504 after 5 s;
        /// and before stop 25, every message through it ended 503 while the pause lasted (its state
        /// query spent the whole 5 s on the paused node, and its fallback replica was the paused one).
        @Test(.timeLimit(.minutes(3))) func writesThroughANodeWithoutAReplicaGoOnAfterTheLeaderIsPaused() async throws {
            let c = try ClusterProcess(name: "pausedleader4", nodes: 4, shards: 1, messaging: "bcrypt_cost = 4\nsends_per_minute = 100000")
            try c.startAll()
            defer {
                for n in c.nodes { c.pause(n, false) }
                c.stopAll()
            }
            let leader = try #require(await c.leader(of: 0))
            var outsider: Int?
            for n in c.nodes {
                if let st = await c.status(n), st.shards.isEmpty { outsider = n }
            }
            let out = try #require(outsider, "every node holds a replica")
            let (_, a, bob, _) = try await DeliveryProcessTests.contacts(c)
            // The outsider has forwarded to the leader (its hint names it).
            let first = await c.call(out, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "before"])
            #expect(first.status == 200)
            c.pause(leader, true)
            let replicas = c.nodes.filter { $0 != out && $0 != leader }
            try #require(await Self.leader(other: leader, asking: replicas[0], c) != nil, "the other replicas elected no leader")
            try await Task.sleep(for: .seconds(1))
            // Raw appends first: nothing else moves the outsider's hint off the paused node (without the
            // announcement the first one waits out its 5 s there and ends 504).
            var acked: [Bool] = []
            for k in 0..<3 { acked.append(await c.append(via: out, shard: 0, stream: 1, payload: "r\(k)") != nil) }
            #expect(acked == [true, true, true], "\(acked)")
            // Messages too (a send also asks the shard's state first, through `remote`).
            var statuses: [Int] = []
            for k in 0..<3 {
                let r = await c.call(out, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "q\(k)"])
                statuses.append(r.status)
            }
            #expect(statuses == [200, 200, 200], "\(statuses)")
        }
    }
}
