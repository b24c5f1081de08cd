import Raft
import SegmentFormat
import SegmentStore
import ShardState
import Testing
import WeftCore
import WeftTesting

@testable import Replication

/// Issue 10: state machines on the log, snapshots and restarts.
@Suite struct StateTests {
    /// A cluster of three replicas running the key-value machine, snapshotting every `every` entries.
    func kvCluster(every: UInt64) throws -> ReplicaCluster {
        let c = try ReplicaCluster()
        c.machine = KeyValueMachine.self
        c.snapshotEvery = every
        for id in c.ids { try c.restart(id) }
        try c.elect(NodeID(1))
        return c
    }

    func put(_ c: ReplicaCluster, _ n: Int, from: Int = 0) throws {
        for k in from..<(from + n) {
            c.replica(NodeID(1)).propose([Proposal(stream: StreamID(UInt64(k % 3 + 1)), payload: KeyValueMachine.put(Array("k\(k % 7)".utf8), Array("v\(k)".utf8)))]) { _ in }
            try c.settle()
        }
        try c.heartbeats()
    }

    func hash(_ c: ReplicaCluster, _ id: NodeID) -> UInt64 { c.replica(id).machine.stateHash }

    @Test func replicasAgreeAndARestartLoadsTheSnapshotAndReplaysOnlyTheTail() throws {
        let c = try kvCluster(every: 10)
        try put(c, 35)
        let applied = c.replica(NodeID(1)).raft.applied
        for id in c.ids {
            #expect(c.replica(id).raft.applied == applied)
            #expect(hash(c, id) == hash(c, NodeID(1)))
            #expect(c.replica(id).lastSnapshotIndex >= 30, "a snapshot at least every 10 entries")
        }
        let snapAt = c.replica(NodeID(2)).lastSnapshotIndex
        try c.restart(NodeID(2))
        let r2 = c.replica(NodeID(2))
        #expect(r2.raft.applied == snapAt, "applied starts at the snapshot")
        #expect(r2.repairEvents.isEmpty, "\(r2.repairEvents)")
        try c.heartbeats()
        try c.settle()
        #expect(c.applied[NodeID(2)]?.first?.index == snapAt + 1, "only the entries after the snapshot are replayed")
        #expect(r2.raft.applied == c.replica(NodeID(1)).raft.applied)
        #expect(hash(c, NodeID(2)) == hash(c, NodeID(1)))
        // Snapshots carry every stream's last applied seq.
        let s = try r2.snapshots.load(snapAt)
        #expect(s.streamSeqs.map(\.stream) == [StreamID(1), StreamID(2), StreamID(3)])
        #expect(s.membership.voters == Set(c.ids))
        #expect(try r2.snapshots.indexes().count <= 2, "older snapshots are dropped")
    }

    @Test func aDamagedSnapshotFallsBackToAnOlderOneAndNeverToAWrongState() throws {
        let c = try kvCluster(every: 10)
        try put(c, 25)
        let r3 = c.replica(NodeID(3))
        let indexes = try r3.snapshots.indexes()
        #expect(indexes.count == 2)
        c.stop(NodeID(3))
        // Flip one byte in the middle of the newest snapshot.
        let path = c.dir(NodeID(3)) + "/snapshots/" + SnapshotFiles.name(indexes[0])
        let f = try PosixDisk().open(path, create: false)
        let n = try f.size()
        let b = try f.read(at: n / 2, count: 1)
        try f.write([b[0] ^ 0x40], at: n / 2)
        f.close()
        try c.open(NodeID(3))
        let again = c.replica(NodeID(3))
        #expect(again.raft.applied == indexes[1], "the older snapshot was used")
        #expect(again.repairEvents.contains { $0.contains("unreadable") && $0.contains("checksum") }, "\(again.repairEvents)")
        #expect(PosixDisk().exists(path + ".damaged"))
        try c.heartbeats()
        try c.settle()
        #expect(hash(c, NodeID(3)) == hash(c, NodeID(1)))
        // Both damaged: the whole log is replayed.
        c.stop(NodeID(3))
        let older = c.dir(NodeID(3)) + "/snapshots/" + SnapshotFiles.name(indexes[1])
        if PosixDisk().exists(older) {
            let g = try PosixDisk().open(older, create: false)
            try g.truncate(to: 30)
            g.close()
        }
        // A newer snapshot may have been written meanwhile: damage every one left.
        for i in try SnapshotFiles(shardDirectory: c.dir(NodeID(3)), disk: PosixDisk()).indexes() {
            let h = try PosixDisk().open(c.dir(NodeID(3)) + "/snapshots/" + SnapshotFiles.name(i), create: false)
            try h.truncate(to: 30)
            h.close()
        }
        try c.open(NodeID(3))
        #expect(c.replica(NodeID(3)).raft.applied == 0)
        try c.heartbeats()
        try c.settle()
        #expect(c.applied[NodeID(3)]?.first?.index == 1)
        #expect(hash(c, NodeID(3)) == hash(c, NodeID(1)))
    }

    @Test func aSnapshotPastTheLogOrOfAnotherHistoryIsNotUsed() throws {
        let c = try kvCluster(every: 10)
        try put(c, 25)
        let r2 = c.replica(NodeID(2))
        let newest = try #require(try r2.snapshots.indexes().first)
        let last = r2.store.lastIndex
        var ahead = try r2.snapshots.load(newest)
        c.stop(NodeID(2))
        // A snapshot beyond the log's end (as a log cut back by a repair leaves one), and one whose
        // entry has another term in this log.
        let files = try SnapshotFiles(shardDirectory: c.dir(NodeID(2)), disk: PosixDisk())
        files.keep = 4
        ahead.index = last + 10
        try files.write(index: ahead.index, bytes: ahead.encode())
        var otherTerm = try files.load(newest)
        otherTerm.index = newest + 1
        otherTerm.term = 99
        try files.write(index: otherTerm.index, bytes: otherTerm.encode())
        try c.open(NodeID(2))
        let again = c.replica(NodeID(2))
        #expect(again.raft.applied == newest, "the newest snapshot that matches the log")
        #expect(again.repairEvents.contains { $0.contains("past the end of the log") }, "\(again.repairEvents)")
        #expect(again.repairEvents.contains { $0.contains("not of term 99") }, "\(again.repairEvents)")
        try c.heartbeats()
        try c.settle()
        #expect(again.raft.applied == c.replica(NodeID(1)).raft.applied)
        #expect(hash(c, NodeID(2)) == hash(c, NodeID(1)))
    }

    @Test func theProposerGetsEachRecordsOutcome() throws {
        let c = try kvCluster(every: 1000)
        var got: Result<[Applied], ReplicationError>?
        c.replica(NodeID(1)).proposeApplied([
            Proposal(stream: StreamID(4), payload: KeyValueMachine.put([1], [1])),
            Proposal(stream: StreamID(4), payload: KeyValueMachine.cas([1], expected: 77, [2])),
            Proposal(stream: StreamID(4), payload: [9, 9, 9]),
        ]) { got = $0 }
        try c.settle()
        let applied = try #require(try got?.get())
        #expect(applied.count == 3)
        guard case .accepted = applied[0].outcome, case .rejected(let c1, _) = applied[1].outcome, case .rejected(let c2, _) = applied[2].outcome else {
            Issue.record("outcomes: \(applied.map(\.outcome))")
            return
        }
        #expect(c1 == "conflict" && c2 == "malformed")
        // A rejected record still holds its place in its stream: seqs stay dense.
        #expect(applied.map(\.record.seq) == [1, 2, 3])
    }

    @Test func theLeaderStampsTimeThatNeverRunsBackwards() throws {
        let c = try kvCluster(every: 1000)
        var clock: Int64 = 5_000_000
        let l = c.replica(NodeID(1))
        l.clockMicros = {
            clock -= 1000  // a clock stepping back
            return clock
        }
        var stamps: [Int64] = []
        for k in 0..<5 {
            l.proposeApplied([Proposal(timestampMicros: 99_999_999, payload: KeyValueMachine.put([UInt8(k)], []))]) { r in
                if case .success(let a) = r { stamps += a.map(\.record.timestampMicros) }
            }
            try c.settle()
        }
        #expect(stamps.count == 5)
        #expect(stamps == stamps.sorted(), "timestamps only grow along the log: \(stamps)")
        #expect(stamps.allSatisfy { $0 <= 5_000_000 }, "the client's own stamp is not used")
        // A new leader continues from the log, not from its own clock.
        c.replica(NodeID(1)).raftTransfer(NodeID(2))
        try c.settle()
        try c.heartbeats()
        #expect(c.leader == NodeID(2))
        c.replica(NodeID(2)).clockMicros = { 1 }
        var next: Int64 = 0
        c.replica(NodeID(2)).proposeApplied([Proposal(payload: KeyValueMachine.put([9], []))]) { r in
            if case .success(let a) = r { next = a[0].record.timestampMicros }
        }
        try c.settle()
        #expect(next >= stamps.last ?? 0)
    }
}

@Suite struct IdempotentWriteTests {
    func keyed(_ r: ShardReplica, _ key: String, _ payloads: [[UInt8]]) -> (() -> Result<KeyedResult, ReplicationError>?) {
        final class Box: @unchecked Sendable { var v: Result<KeyedResult, ReplicationError>? }
        let box = Box()
        r.proposeKeyed(Array(key.utf8), payloads.map { Proposal(stream: StreamID(9), payload: $0) }) { box.v = $0 }
        return { box.v }
    }

    @Test func aRetryGetsTheFirstResultAndWritesNothingAlsoAfterALeaderChangeAndARestart() throws {
        let c = try ReplicaCluster()
        c.snapshotEvery = 5
        for id in c.ids { try c.restart(id) }
        try c.elect(NodeID(1))
        let l = c.replica(NodeID(1))
        // Two attempts in the same turn, before either is persisted: one write.
        let a = keyed(l, "msg-1", [[1], [2]])
        let b = keyed(l, "msg-1", [[1], [2]])
        try c.settle()
        try c.heartbeats()
        let first = try #require(try a()?.get())
        let second = try #require(try b()?.get())
        #expect(first.complete && !first.replayed && first.landed.count == 2)
        #expect(second.replayed && second.landed == first.landed)
        // Then after it is applied.
        let c1 = keyed(l, "msg-1", [[9]])
        #expect(try c1()?.get().landed == first.landed, "answered at once from the window, whatever the body")
        // A new leader knows it too.
        l.raftTransfer(NodeID(2))
        try c.settle()
        try c.heartbeats()
        let d = keyed(c.replica(NodeID(2)), "msg-1", [[1], [2]])
        #expect(try d()?.get().replayed == true)
        // Enough other writes for a snapshot, then a restart from it.
        _ = try c.propose(12, tag: "other")
        try c.heartbeats()
        try c.restart(NodeID(2))
        try c.tick(c.ids, 60) { c.leader != nil }
        try c.heartbeats()
        #expect(c.replica(NodeID(2)).lastSnapshotIndex > first.landed[1].index)
        let leader = try #require(c.leader)
        let e = keyed(c.replica(leader), "msg-1", [[1], [2]])
        try c.settle()
        #expect(try e()?.get().landed == first.landed)
        // The stream holds the two records once.
        let stream2 = try c.log(NodeID(1)).filter { $0.stream == StreamID(9) }
        #expect(stream2.map(\.seq) == [1, 2])
        // Keys are checked; reserved types refused.
        #expect(throws: ReplicationError.self) { try keyed(l, "", [[1]])()?.get() }
        #expect(throws: ReplicationError.self) { try keyed(l, String(repeating: "k", count: 65), [[1]])()?.get() }
        var refused: Result<[Applied], ReplicationError>?
        c.replica(leader).proposeApplied([Proposal(type: .requestKey, payload: RequestWindow.keyPayload([1], count: 0))]) { refused = $0 }
        #expect(throws: ReplicationError.self) { try refused?.get() }
    }
}

@Suite struct RelayDestinationTests {
    func relay(_ r: ShardReplica, source: UInt64, _ first: UInt64, _ last: UInt64, _ idx: [UInt64]) -> () -> Result<RelayResult, ReplicationError>? {
        final class Box: @unchecked Sendable { var v: Result<RelayResult, ReplicationError>? }
        let box = Box()
        let ps = idx.map { Proposal(stream: StreamID(5), payload: Array("from \(source)/\($0)".utf8)) }
        r.proposeRelayBatch(RelayMarks.Header(source: ShardID(source), first: first, last: last, sourceIndexes: idx), ps) { box.v = $0 }
        return { box.v }
    }

    @Test func batchesAreWrittenOnceInSourceOrderAcrossALeaderChangeAndARestart() throws {
        let c = try ReplicaCluster()
        c.snapshotEvery = 4
        for id in c.ids { try c.restart(id) }
        try c.elect(NodeID(1))
        let l = c.replica(NodeID(1))
        // The same batch twice in one turn, and the next one right behind it: each waits for the one before.
        let a = relay(l, source: 9, 1, 10, [2, 7])
        let b = relay(l, source: 9, 1, 10, [2, 7])
        let n = relay(l, source: 9, 11, 15, [11])
        try c.settle()
        try c.heartbeats()
        #expect(try a()?.get() == .written(mark: 10))
        #expect(try b()?.get() == .alreadyApplied(mark: 10))
        #expect(try n()?.get() == .written(mark: 15))
        // Overlapping the mark: stale; nothing written.
        let s = relay(l, source: 9, 14, 20, [16])
        try c.settle()
        #expect(try s()?.get() == .stale(mark: 15))
        // A new leader, then a restart from a snapshot: the marks come with the state.
        l.raftTransfer(NodeID(2))
        try c.settle()
        try c.heartbeats()
        let l2 = c.replica(NodeID(2))
        #expect(l2.relayMarks.mark(of: ShardID(9)) == 15)
        let again = relay(l2, source: 9, 11, 15, [11])
        try c.settle()
        #expect(try again()?.get() == .alreadyApplied(mark: 15))
        _ = try c.propose(6, tag: "x")
        try c.heartbeats()
        try c.restart(NodeID(3))
        try c.heartbeats()
        #expect(c.replica(NodeID(3)).lastSnapshotIndex > 0)
        #expect(c.replica(NodeID(3)).relayMarks.mark(of: ShardID(9)) == 15)
        // Each derived record is in the log once.
        let derived = try c.log(NodeID(2)).filter { $0.stream == StreamID(5) }
        #expect(derived.map { String(decoding: $0.payload, as: UTF8.self) } == ["from 9/2", "from 9/7", "from 9/11"])
        // Reserved types are refused in relay batches and as plain proposals.
        var refused: Result<[Applied], ReplicationError>?
        l2.proposeApplied([Proposal(type: .relayBatch, payload: [])]) { refused = $0 }
        #expect(throws: ReplicationError.self) { try refused?.get() }
    }
}

@Suite struct AppliedWaiterTests {
    @Test func waitersAnswerInIndexOrderOnceAppliedAndFailWhenTheReplicaStops() throws {
        let c = try ReplicaCluster()
        try c.elect(NodeID(1))
        let f = c.replica(NodeID(2))
        let base = f.raft.applied
        var answered: [LogIndex] = []
        for i in [base + 3, base + 1, base + 2, base] {
            f.whenApplied(i) { r in if case .success = r { answered.append(i) } }
        }
        #expect(answered == [base], "an index already applied answers at once")
        _ = try c.propose(3, tag: "w")
        try c.heartbeats()
        #expect(answered == [base, base + 1, base + 2, base + 3])
        // A waiter whose caller gave up is dropped without an answer.
        var dropped = false
        f.whenApplied(base + 500, token: 42) { _ in dropped = true }
        f.cancelWaiter(42)
        #expect(f.appliedWaiters.isEmpty)
        // An index far past the log is refused at once.
        var far: ReplicationError?
        f.whenApplied(.max) { r in if case .failure(let e) = r { far = e } }
        if case .invalid = far {} else { Issue.record("a waiter far past the log was taken: \(String(describing: far))") }
        var failed: ReplicationError?
        f.whenApplied(base + 1000) { r in if case .failure(let e) = r { failed = e } }
        c.stop(NodeID(2))
        #expect(failed == .stopped)
        #expect(!dropped)
    }
}

@Suite struct SnapshotFileTests {
    func sample() -> StateSnapshot {
        StateSnapshot(
            index: 1234, term: 7, membership: Membership(voters: [NodeID(1), NodeID(2), NodeID(3)], learners: [NodeID(4)]), membershipIndex: 12,
            streamSeqs: [(StreamID(1), 10), (StreamID(9), 3)], state: Array("state bytes".utf8), retainThrough: 1000)
    }

    @Test func theDocumentedExampleIs150Bytes() {
        let s = StateSnapshot(
            index: 5, term: 2, membership: Membership(voters: [NodeID(1), NodeID(2), NodeID(3)]), membershipIndex: 3,
            streamSeqs: [(StreamID(7), 4)], state: [], requests: RequestWindow().encode(), relays: RelayMarks().encode())
        #expect(s.encode().count == 150)
        #expect(RequestWindow().encode().count == 17)
        #expect(RelayMarks().encode().count == 5)
    }

    @Test func roundTripsAndEveryFlippedByteIsCaught() throws {
        let s = sample()
        let b = s.encode()
        #expect(try StateSnapshot.decode(b) == s)
        for k in b.indices {
            var bad = b
            bad[k] ^= 0x01
            #expect(throws: StateSnapshot.DecodeError.self) { try StateSnapshot.decode(bad) }
        }
        for cut in [0, 7, 20, b.count - 1] {
            #expect(throws: StateSnapshot.DecodeError.self) { try StateSnapshot.decode(Array(b.prefix(cut))) }
        }
    }

    @Test func filesAreWrittenWholeAndTheNewestTwoKept() throws {
        let tmp = try TempDirectory(prefix: "weft-snap-test")
        defer { tmp.remove() }
        let disk = PosixDisk()
        let files = try SnapshotFiles(shardDirectory: tmp.path, disk: disk)
        for i in [5, 50, 500] as [UInt64] {
            var s = sample()
            s.index = i
            try files.write(index: i, bytes: s.encode())
        }
        #expect(try files.indexes() == [500, 50])
        #expect(try files.load(50).index == 50)
        // A leftover .tmp (a crash mid-write) is removed at open and never read.
        let t = try disk.open(files.directory + "/" + SnapshotFiles.name(900) + ".tmp", create: true)
        try t.write([1, 2, 3], at: 0)
        t.close()
        let again = try SnapshotFiles(shardDirectory: tmp.path, disk: disk)
        #expect(try again.indexes() == [500, 50])
        #expect(try disk.list(again.directory).allSatisfy { !$0.hasSuffix(".tmp") })
        // A file whose name and contents disagree is refused.
        try disk.rename(again.directory + "/" + SnapshotFiles.name(50), to: again.directory + "/" + SnapshotFiles.name(60))
        #expect(throws: StateSnapshot.DecodeError.self) { try again.load(60) }
    }
}
