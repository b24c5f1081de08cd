import Foundation
import Testing

extension Clusters {
    /// A leader that stops answering without closing its connections (SIGSTOP): the other nodes elect
    /// another, and writes through them go on. Before stop 24, a node whose leader hint named the paused
    /// node sent every later write there (each timing out after 5 s) until something else refreshed the
    /// hint; found when a test paused a leader, reproduced here.
    @Suite(.serialized) struct PausedLeaderTests {
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
            // Both other nodes know node 3 leads (a status answer records the hint).
            for n in [1, 2] { #expect(await c.status(n)?.shards.first?.leader == 3) }
            c.pause(3, true)
            var statuses: [Int] = []
            for k in 0..<6 {
                let r = await c.call(1 + k % 2, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "p\(k)"])
                statuses.append(r.status)
            }
            // The first write through each node may go to the paused leader and end unknown (504); the
            // ones after it find the new leader.
            #expect(Array(statuses.suffix(4)) == [200, 200, 200, 200], "\(statuses)")
        }
    }
}
