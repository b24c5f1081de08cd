import Foundation
import SegmentStore
import Testing
import WeftCore
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// A real 4-node cluster whose one shard starts on nodes 1-3: node 4 is added as a voter while writes
/// flow (it joins with an empty log and catches up), then node 1 is removed (the replica moved from 1 to
/// 4). Every acknowledged write must be on the final members, once, in the same order.
extension Clusters {
    @Suite(.serialized) struct MembershipTests {
        func change(_ c: ClusterProcess, via n: Int, _ body: String) async -> Int {
            guard let url = URL(string: "http://127.0.0.1:\(c.apiPorts[n]!)/api/v1/admin/shards/0/membership") else { return 0 }
            var req = URLRequest(url: url)
            req.setValue("Bearer \(ClusterProcess.token)", forHTTPHeaderField: "Authorization")
            req.httpMethod = "POST"
            req.httpBody = Data(body.utf8)
            req.timeoutInterval = 15
            guard let (_, resp) = try? await URLSession.shared.data(for: req) else { return 0 }
            return (resp as? HTTPURLResponse)?.statusCode ?? 0
        }

        struct Members: Decodable {
            struct Shard: Decodable {
                struct Replica: Decodable {
                    var node: UInt64
                    var role: String
                    var match_index: UInt64
                }
                var id: UInt64
                var role: String
                var commit_index: UInt64
                var replicas: [Replica]
            }
            var shards: [Shard]
        }

        func shard0(_ c: ClusterProcess, _ n: Int) async -> Members.Shard? {
            guard let url = URL(string: "http://127.0.0.1:\(c.apiPorts[n]!)/api/v1/cluster/status"),
                let (data, _) = try? await URLSession.shared.data(for: ClusterProcess.authorized(url))
            else { return nil }
            return (try? JSONDecoder().decode(Members.self, from: data))?.shards.first { $0.id == 0 }
        }

        @Test func addAVoterThenRemoveOneWithWritesFlowing() async throws {
            let c = try ClusterProcess(name: "members", nodes: 4, shards: 1)
            try c.startAll()
            defer { c.stopAll() }
            #expect(await c.leader(of: 0) != nil)
            #expect(await shard0(c, 4) == nil, "node 4 starts without a replica of shard 0")

            actor Acks {
                var payloads: [String] = []
                func add(_ p: String) { payloads.append(p) }
            }
            let acks = Acks()
            let stop = ManagedAtomicFlag()
            let writer = Task {
                var k = 0
                while !stop.isSet {
                    k += 1
                    let via = [2, 3][k % 2]
                    if await c.append(via: via, shard: 0, stream: 3, payload: "m\(k)") != nil { await acks.add("m\(k)") }
                }
            }
            try await Task.sleep(for: .milliseconds(500))
            #expect(await change(c, via: 2, #"{"add_voter":4}"#) == 200)
            // Node 4 joins, catches up and applies its own addition.
            var joined = false
            for _ in 0..<100 where !joined {
                if let s = await shard0(c, 4), s.replicas.contains(where: { $0.node == 4 && $0.role == "voter" }) { joined = true }
                if !joined { try await Task.sleep(for: .milliseconds(100)) }
            }
            #expect(joined, "node 4 never became a voter")
            try await Task.sleep(for: .milliseconds(500))
            #expect(await change(c, via: 3, #"{"remove_voter":1}"#) == 200)
            try await Task.sleep(for: .milliseconds(800))
            stop.set()
            await writer.value
            let acked = await acks.payloads
            #expect(acked.count > 20)
            // Bad requests: unknown node, malformed body.
            #expect(await change(c, via: 2, #"{"add_voter":99}"#) == 400)
            #expect(await change(c, via: 2, #"{"add":4}"#) == 400)

            // Let 2, 3, 4 agree on the commit index, then read their logs from disk.
            for _ in 0..<100 {
                var commits = Set<UInt64>()
                for n in [2, 3, 4] { if let s = await shard0(c, n) { commits.insert(s.commit_index) } else { commits.insert(0) } }
                if commits.count == 1 { break }
                try await Task.sleep(for: .milliseconds(100))
            }
            // Node 4 gained its replica after start-up: after a SIGKILL and restart it reopens it from
            // disk with its group, and keeps up.
            c.kill9(4)
            try c.start(4)
            var back = false
            for _ in 0..<100 where !back {
                let s4 = await shard0(c, 4)
                let s2 = await shard0(c, 2)
                back = s4 != nil && s4?.commit_index == s2?.commit_index && Set(s4?.replicas.map(\.node) ?? []) == [2, 3, 4]
                if !back { try await Task.sleep(for: .milliseconds(100)) }
            }
            #expect(back, "node 4 did not come back as a member of shard 0")
            let final = await shard0(c, 2)
            print("membership test: \(acked.count) writes acknowledged; shard 0 replicas now \(final?.replicas.map { "\($0.node):\($0.role)" } ?? [])")
            #expect(Set(final?.replicas.map(\.node) ?? []) == [2, 3, 4])
            c.stopAll()
            var logs: [Int: [String]] = [:]
            for n in [2, 3, 4] {
                let store = try SegmentStore(directory: c.shardDirectory(node: n, shard: 0))
                logs[n] = try store.read(from: 1, to: store.lastIndex).filter { $0.type == .data }.map { String(decoding: $0.payload, as: UTF8.self) }
                store.close()
            }
            for n in [2, 3, 4] {
                let log = logs[n] ?? []
                #expect(Set(acked).isSubset(of: Set(log)), "node \(n) misses acknowledged writes")
                #expect(Set(log).count == log.count, "node \(n) has duplicates")
            }
            #expect(logs[2] == logs[3] && logs[3] == logs[4], "replicas diverge")
        }
    }}
