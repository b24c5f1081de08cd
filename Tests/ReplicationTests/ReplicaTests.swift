import Raft
import SegmentStore
import Testing
import WeftCore
import WeftTesting

@testable import Replication

/// Three replicas of one shard over real segment stores (on the simulated disk), messages passed by
/// hand: the driver's persist-then-send order, truncation through the store, restart from disk.
@Suite struct ReplicaTests {
    typealias Cluster = ReplicaCluster

    @Test func replicatesAndAppliesInOrderOnAllReplicas() throws {
        let c = try Cluster.simulated()
        try c.elect(NodeID(1))
        #expect(c.replicas[NodeID(1)]!.raft.role == .leader)
        var acked: [Record] = []
        var rng = SeededRNG(seed: 5)
        for k in 0..<40 {
            // Incompressible bodies, so 40 of them fill several 4 KiB segments.
            let body = Array("message \(k) ".utf8) + (0..<200).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            c.replicas[NodeID(1)]!.propose([Proposal(stream: StreamID(UInt64(k % 3 + 1)), payload: body)]) {
                if case .success(let rs) = $0 { acked += rs }
            }
            try c.settle()
        }
        #expect(acked.count == 40)
        for (s, recs) in Dictionary(grouping: acked, by: \.stream) {
            #expect(recs.map(\.seq) == Array(1...UInt64(recs.count)), "stream \(s) seqs dense")
        }
        // Heartbeats carry the commit index to followers.
        for _ in 0..<3 { c.replicas[NodeID(1)]!.tick() }
        try c.settle()
        let data = { (id: NodeID) in c.applied[id]!.filter { $0.type == .data } }
        #expect(data(NodeID(1)) == acked)
        #expect(data(NodeID(2)) == acked)
        #expect(data(NodeID(3)) == acked)
        // The segment stores rolled and hold the same log.
        #expect(c.replicas[NodeID(2)]!.store.segmentCount > 1)
        #expect(try c.replicas[NodeID(2)]!.store.read(from: 1, to: 1000) == c.replicas[NodeID(1)]!.store.read(from: 1, to: 1000))
    }

    @Test func restartKeepsTermVoteAndLog() throws {
        let c = try Cluster.simulated()
        try c.elect(NodeID(2))
        var ok = 0
        for k in 0..<10 {
            c.replicas[NodeID(2)]!.propose([Proposal(stream: StreamID(1), payload: [UInt8(k)])]) { if case .success = $0 { ok += 1 } }
            try c.settle()
        }
        #expect(ok == 10)
        let term = c.replicas[NodeID(2)]!.raft.term
        let last = c.replicas[NodeID(3)]!.store.lastIndex
        var rng = SeededRNG(seed: 1)
        try c.crash(NodeID(3), rng: &rng)
        let r3 = c.replicas[NodeID(3)]!
        #expect(r3.raft.term == term)
        #expect(r3.raft.vote == NodeID(2))
        #expect(r3.store.lastIndex == last)
    }

    @Test func conflictingSuffixIsTruncatedThroughTheStore() throws {
        let c = try Cluster.simulated()
        try c.elect(NodeID(1))
        c.replicas[NodeID(1)]!.propose([Proposal(stream: StreamID(1), payload: [1])]) { _ in }
        try c.settle()
        // Leader 1 appends entries that never leave it (its messages are dropped) ...
        var lost: Result<[Record], ReplicationError>?
        c.replicas[NodeID(1)]!.propose((0..<5).map { Proposal(stream: StreamID(1), payload: [UInt8(10 + $0)]) }) { lost = $0 }
        _ = try c.replicas[NodeID(1)]!.process()
        let stale = c.replicas[NodeID(1)]!.store.lastIndex
        // ... then, with node 1 cut off, nodes 2 and 3 elect a leader of a new term ...
        let cutOff = { (m: Message) in m.from == NodeID(1) || m.to == NodeID(1) }
        var newLeader: NodeID?
        for _ in 0..<60 where newLeader == nil {
            c.replicas[NodeID(2)]!.tick()
            c.replicas[NodeID(3)]!.tick()
            try c.settle(drop: cutOff)
            newLeader = [NodeID(2), NodeID(3)].first { c.replicas[$0]!.raft.role == .leader }
        }
        let l = try #require(newLeader)
        // ... which commits its own entry; when node 1 is back its stale suffix is cut from its store.
        var won = false
        c.replicas[l]!.propose([Proposal(stream: StreamID(1), payload: [99])]) { if case .success = $0 { won = true } }
        try c.settle(drop: cutOff)
        for _ in 0..<3 {
            c.replicas[l]!.tick()
            try c.settle()
        }
        #expect(won)
        if case .failure(let e) = lost { #expect(e == .superseded) } else { Issue.record("stale proposal did not fail: \(String(describing: lost))") }
        let s1 = c.replicas[NodeID(1)]!.store
        let s2 = c.replicas[l]!.store
        #expect(s1.lastIndex == s2.lastIndex)
        #expect(s1.lastIndex < stale + 2)
        #expect(try s1.read(from: 1, to: 100) == s2.read(from: 1, to: 100))
        // Stream seqs were renumbered by the new leader, densely.
        let seqs = try s1.readStream(StreamID(1), fromSeq: 1, limit: 100).map(\.seq)
        #expect(seqs == Array(1...UInt64(seqs.count)))
    }

    @Test func readIndexAnswersOnlyOnTheLeader() throws {
        let c = try Cluster.simulated()
        try c.elect(NodeID(1))
        var leaderRead: Result<LogIndex, ReplicationError>?
        var followerRead: Result<LogIndex, ReplicationError>?
        c.replicas[NodeID(1)]!.readIndex { leaderRead = $0 }
        c.replicas[NodeID(2)]!.readIndex { followerRead = $0 }
        try c.settle()
        #expect((try? leaderRead?.get()) == c.replicas[NodeID(1)]!.raft.commit)
        if case .failure = followerRead {} else { Issue.record("follower answered a read: \(String(describing: followerRead))") }
    }

    @Test func hardStateFileSurvivesATornSlot() throws {
        let disk = SimulatedDisk()
        try disk.makeDirectory("/d")
        let f = try HardStateFile(path: "/d/raft.state", disk: disk)
        try f.save(HardState(term: 3, vote: NodeID(2), commit: 10))
        try f.save(HardState(term: 4, vote: nil, commit: 12))
        var bytes = try #require(disk.contents("/d/raft.state"))
        // Tear the newest slot (seq 2 lives in slot 0).
        bytes[20] ^= 0xFF
        disk.setContents("/d/raft.state", bytes)
        let g = try HardStateFile(path: "/d/raft.state", disk: disk)
        #expect(g.state == HardState(term: 3, vote: NodeID(2), commit: 10))
    }
}

extension ReplicaCluster {
    /// Replicas on a simulated disk (fsync on every batch), so that tests can crash it.
    static func simulated() throws -> ReplicaCluster {
        try ReplicaCluster(disk: SimulatedDisk(), root: "/data", options: StoreOptions(segmentBytesMax: 4096, blockBytesTarget: 512))
    }

    /// Crashes the simulated disk under replica `id` (unsynced writes lost) and reopens the replica.
    func crash(_ id: NodeID, rng: inout SeededRNG) throws {
        guard let sim = disk as? SimulatedDisk else { preconditionFailure("crash needs a SimulatedDisk") }
        replicas[id]?.failAll(.stopped)
        replicas[id] = nil
        sim.crash(rng: &rng)
        queue.removeAll { $0.to == id }
        try open(id)
    }
}
