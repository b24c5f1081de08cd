import Foundation
import SegmentStore
import Testing
import WeftCore

/// End to end: three `weft serve` processes on loopback; writes flow while the leader is killed with
/// SIGKILL and restarted; afterwards every acknowledged write is in every replica's log exactly once and
/// in the same order.
extension Clusters {
    @Suite(.serialized) struct KillTests {
        @Test func acknowledgedWritesSurviveLeaderKills() async throws {
            let cluster = try ClusterProcess(name: "kill", nodes: 3, shards: 2)
            try cluster.startAll()
            defer { cluster.stopAll() }
            let shard: UInt64 = 1
            #expect(await cluster.leader(of: shard) != nil, "no leader elected")

            actor Acks {
                var byPayload: [String: UInt64] = [:]
                var attempts = 0
                func add(_ p: String, _ index: UInt64) { byPayload[p] = index }
                func tried() { attempts += 1 }
            }
            let acks = Acks()
            let stop = ManagedAtomicFlag()
            let writer = Task {
                var k = 0
                while !stop.isSet {
                    k += 1
                    let payload = "w\(k)"
                    let via = cluster.nodes[k % cluster.nodes.count]
                    await acks.tried()
                    if let ref = await cluster.append(via: via, shard: shard, stream: 7, payload: payload) {
                        await acks.add(payload, ref.index)
                    }
                }
            }
            var kills = 0
            for _ in 0..<3 {
                try await Task.sleep(for: .milliseconds(700))
                guard let l = await cluster.leader(of: shard) else { continue }
                cluster.kill9(l)
                kills += 1
                try await Task.sleep(for: .milliseconds(900))
                try cluster.start(l)
            }
            try await Task.sleep(for: .milliseconds(700))
            stop.set()
            await writer.value
            // Let the restarted node catch up, then stop everything and read the logs from disk.
            let acked = await acks.byPayload
            print("kill test: \(acked.count) writes acknowledged of \(await acks.attempts) attempted, \(kills) leader SIGKILLs")
            #expect(kills == 3)
            #expect(acked.count > 20, "too few writes acknowledged: \(acked.count)")
            var caughtUp = false
            for _ in 0..<100 where !caughtUp {
                var commits: [UInt64] = []
                for n in cluster.nodes {
                    if let s = await cluster.status(n), let sh = s.shards.first(where: { $0.id == shard }) { commits.append(sh.commit_index) }
                }
                caughtUp = commits.count == 3 && Set(commits).count == 1
                if !caughtUp { try await Task.sleep(for: .milliseconds(100)) }
            }
            cluster.stopAll()

            var logs: [Int: [String]] = [:]
            for n in cluster.nodes {
                let store = try SegmentStore(directory: cluster.shardDirectory(node: n, shard: shard), options: StoreOptions(shard: ShardID(shard)))
                let records = try store.read(from: store.firstIndex, to: store.lastIndex)
                store.close()
                var payloads: [String] = []
                for r in records where r.type == .data {
                    let p = String(decoding: r.payload, as: UTF8.self)
                    payloads.append(p)
                    if let idx = acked[p] { #expect(idx == r.index, "node \(n): \(p) acknowledged at \(idx), stored at \(r.index)") }
                }
                logs[n] = payloads
            }
            for n in cluster.nodes {
                let log = logs[n] ?? []
                let missing = acked.keys.filter { !log.contains($0) }
                #expect(missing.isEmpty, "node \(n) lost acknowledged writes: \(missing.prefix(5))")
                #expect(Set(log).count == log.count, "node \(n) has duplicates")
            }
            #expect(logs[1] == logs[2] && logs[2] == logs[3], "replicas diverge")
        }
    }}

/// A flag set once from one task and read from another.
final class ManagedAtomicFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    var isSet: Bool { lock.withLock { value } }
    func set() { lock.withLock { value = true } }
}
