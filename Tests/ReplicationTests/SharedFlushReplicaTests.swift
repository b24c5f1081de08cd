import Raft
@testable import Replication
import SegmentStore
import Testing
import WeftCore
import WeftTesting

/// Replicas driven as a lane drives them with shared flushes (`ShardReplica.process(send:deferSync:)`,
/// `SegmentStore.syncTogether`, `finishDeferredSync`): what is acknowledged survives a power loss of
/// every replica at once, at any point of a round.
@Suite struct SharedFlushReplicaTests {
    struct PowerLost: Error {}

    /// Loses power (all three replicas share the simulated disk) and reopens every replica.
    static func powerLoss(_ c: ReplicaCluster, rng: inout SeededRNG) throws {
        guard let sim = c.disk as? SimulatedDisk else { preconditionFailure("needs a SimulatedDisk") }
        for r in c.replicas.values { r.failAll(.stopped) }
        c.replicas = [:]
        c.queue = []
        c.catchUpMessages = []
        sim.crash(rng: &rng)
        for id in c.ids { try c.open(id) }
    }

    @Test(arguments: 0..<30 as Range<UInt64>)
    func acknowledgedRecordsSurviveAPowerLossAtAnyPointOfARound(seed: UInt64) throws {
        _ = try Self.powerLossWorkload(seed: seed)
    }

    /// The workload is only worth something if the power goes, at every phase, and flushes are shared.
    @Test func powerLossWorkloadExercisesItsFaults() throws {
        var losses = 0
        var shared: UInt64 = 0
        for seed: UInt64 in 100..<104 {
            let r = try Self.powerLossWorkload(seed: seed)
            losses += r.losses
            shared += r.shared
        }
        #expect(losses >= 20)
        #expect(shared > 0)
    }

    /// Returns the power losses and the appends made durable by a shared flush.
    static func powerLossWorkload(seed: UInt64) throws -> (losses: Int, shared: UInt64) {
        var rng = SeededRNG(seed: seed &+ 0xF1A5_0000)
        let c = try ReplicaCluster.simulated()
        c.sharedFlush = true
        // Every replica loses power at once: a fence torn on all three would leave none voting
        // (Docs/faults.md), so writes tear at sector boundaries, as on a real disk.
        (c.disk as? SimulatedDisk)?.atomicSectorWrites = true
        try c.elect(NodeID(UInt64(rng.next() % 3 + 1)))
        var acked: [LogIndex: [UInt8]] = [:]
        var losses = 0
        var shared: UInt64 = 0
        for step in 0..<24 {
            if c.leader == nil {
                try c.tick(c.ids, 40) { c.leader != nil }
            }
            guard let l = c.leader else {
                let states = c.ids.map { id in c.replicas[id].map { "\(id): \($0.raft.role) term \($0.raft.term) last \($0.store.lastIndex) status \($0.status())" } ?? "-" }
                Issue.record("seed \(seed) step \(step): no leader; \(states)")
                return (losses, shared)
            }
            for k in 0..<Int(rng.next() % 3 + 1) {
                let body = Array("s\(seed) step \(step) #\(k)".utf8)
                c.replica(l).propose([Proposal(stream: StreamID(UInt64(k % 2 + 1)), payload: body)]) {
                    if case .success(let rs) = $0 { for r in rs { acked[r.index] = r.payload } }
                }
            }
            // A few rounds by hand; in one of them (or none) the power goes at a random point.
            let lossRound = Int(rng.next() % 8)
            let lossPhase = Int(rng.next() % 3)
            do {
                for round in 0..<6 {
                    let out = try c.drive { phase in
                        if round == lossRound && ((phase == .turned && lossPhase == 0) || (phase == .flushed && lossPhase == 1)) {
                            try powerLoss(c, rng: &rng)
                            throw PowerLost()
                        }
                    }
                    if round == lossRound && lossPhase == 2 {
                        try powerLoss(c, rng: &rng)
                        throw PowerLost()
                    }
                    for m in out { c.replicas[m.to]?.step(m) }
                }
            } catch is PowerLost {
                losses += 1
            }
            for r in c.replicas.values { shared += r.stats.sharedSyncs }
            try c.settle()
        }
        try c.tick(c.ids, 60) { c.leader != nil }
        guard let l = c.leader else {
            Issue.record("seed \(seed): no leader at the end")
            return (losses, shared)
        }
        try c.heartbeats()
        let log = try c.log(l)
        let byIndex = Dictionary(log.map { ($0.index, $0.payload) }, uniquingKeysWith: { a, _ in a })
        for (index, payload) in acked.sorted(by: { $0.key < $1.key }) {
            #expect(byIndex[index] == payload, "seed \(seed): acknowledged entry \(index) lost or replaced")
        }
        #expect(!acked.isEmpty)
        return (losses, shared)
    }

    /// The lane's flush is shared in practice: replicas whose files were synced at their length write
    /// back and ride on one fdatasync.
    @Test func followersShareTheFlush() throws {
        let c = try ReplicaCluster.simulated()
        c.sharedFlush = true
        try c.elect(NodeID(1))
        let acked = try c.propose(40, tag: "shared")
        #expect(acked.count == 40)
        let shared = c.replicas.values.reduce(0) { $0 + $1.stats.sharedSyncs }
        #expect(shared > 0)
        let sim = try #require(c.disk as? SimulatedDisk)
        #expect(sim.writeBacks > 0)
        for id in c.ids { #expect(try c.log(id).count == c.log(NodeID(1)).count) }
    }
}
