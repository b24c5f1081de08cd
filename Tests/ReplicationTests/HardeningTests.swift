import Foundation
import Raft
import SegmentStore
import Testing
import WeftCore
import WeftTesting

@testable import Replication

/// Issue 8: a follower far behind, unreadable committed entries, a joined replica without its group
/// file, and a long replay after a restart — each must leave the replica in a defined state.
@Suite struct HardeningTests {
    typealias Cluster = ReplicaCluster

    /// Item 2: a follower paused during a burst used to get more unstable entries in one Ready than the
    /// store takes in one append (`invalid batch: 106496 records, limit 65536`) and stopped its replica.
    /// The messages to node 3 are held (a paused process), then stepped all at once.
    @Test func followerFarBehindPersistsInBatchesTheStoreTakes() throws {
        let c = try Cluster.simulated()
        try c.elect(NodeID(1))
        _ = try c.propose(3, tag: "warm")
        try c.heartbeats()
        var held: [Message] = []
        let paused = NodeID(3)
        // 64 appends in flight to node 3 (the pipelining window), 2048 records each: 131 072 records.
        for batch in 0..<70 {
            let ps = (0..<2048).map { k in Proposal(stream: StreamID(UInt64(k % 7 + 1)), payload: Array("b\(batch)-\(k)".utf8)) }
            var ok = false
            c.replica(NodeID(1)).propose(ps) { if case .success = $0 { ok = true } }
            try c.settle(drop: { m in
                if m.to == paused { held.append(m) }
                return m.to == paused || m.from == paused
            })
            #expect(ok, "batch \(batch) committed on nodes 1 and 2")
        }
        let r3 = c.replica(paused)
        for m in held { r3.step(m) }
        #expect(r3.raft.lastIndex - r3.store.lastIndex > UInt64(Limits.appendBatchCountMax), "the follower holds more than one store batch")
        // Before the fix this threw `invalid batch: ... limit 65536`.
        c.queue += try r3.process()
        try c.settle()
        try c.heartbeats()
        #expect(try c.log(paused) == c.log(NodeID(1)))
        #expect(c.replica(paused).store.lastIndex == c.replica(NodeID(1)).store.lastIndex)
    }

    /// Item 9: an I/O error on a committed block made `process` loop forever at 100 % CPU (Raft kept
    /// asking for the entries, the read kept failing), so the shard thread never handled a tick or a
    /// stop. Now each turn returns (the runner retries at the next tick); once the entries stayed
    /// unreadable for `readStallMax` the replica stops with the reason.
    @Test func unreadableCommittedEntriesEndInADefinedState() throws {
        let sim = SimulatedDisk()
        let c = try Cluster(disk: sim, root: "/data", options: StoreOptions(segmentBytesMax: 4096, blockBytesTarget: 512))
        try c.elect(NodeID(1))
        _ = try c.propose(30, tag: "x")
        try c.heartbeats()
        // Node 2 restarts (it replays its log from index 1) on a disk that can no longer read its segments.
        try c.restart(NodeID(2))
        let r2 = c.replica(NodeID(2))
        r2.readStallMax = .milliseconds(300)
        sim.failReadsUnder = c.dir(NodeID(2)) + "/"
        var m = Message(kind: .heartbeat, from: NodeID(1), to: NodeID(2), term: c.replica(NodeID(1)).raft.term)
        m.commit = c.replica(NodeID(1)).raft.commit
        m.hint = c.replica(NodeID(1)).raft.lastIndex
        r2.step(m)
        var turns = 0
        var stopped: (any Error)?
        let start = ContinuousClock.now
        while turns < 1000 && stopped == nil {
            turns += 1
            do {
                _ = try r2.process()
                #expect(!r2.hasPendingWork, "a stalled replica waits for the next tick, it does not spin")
            } catch {
                stopped = error
            }
            Thread.sleep(forTimeInterval: 0.01)
        }
        #expect(turns > 1, "it retried before giving up")
        #expect(ContinuousClock.now - start >= .milliseconds(300))
        #expect("\(stopped.map { "\($0)" } ?? "")".contains("unreadable"))
        sim.failReadsUnder = nil
    }

    /// Item 6: a replica that joined a group and stopped before it saved the group file used to refuse
    /// to open (`membershipMissing`), taking its node down. It now rebuilds the group from the log.
    @Test func replicaWithoutGroupFileRebuildsTheGroupFromItsLog() throws {
        let c = try Cluster.simulated()
        try c.elect(NodeID(1))
        _ = try c.propose(5, tag: "m")
        try c.heartbeats()
        c.stop(NodeID(3))
        try c.disk.remove(c.dir(NodeID(3)) + "/membership")
        try c.open(NodeID(3))
        #expect(c.replica(NodeID(3)).raft.membership.voters.isEmpty, "no group until the log is replayed")
        try c.heartbeats()
        #expect(c.replica(NodeID(3)).raft.membership.voters == [NodeID(1), NodeID(2), NodeID(3)])
        #expect(c.disk.exists(c.dir(NodeID(3)) + "/membership"))
        // And the replica works: new records reach it.
        let more = try c.propose(3, tag: "after")
        try c.heartbeats()
        #expect(more.count == 3)
        #expect(try c.log(NodeID(3)) == c.log(NodeID(1)))
    }

    /// Item 13: a restart replays the whole committed log through `onApply`; it used to do so in one
    /// `process` call, holding up ticks, votes and stop for as long as it took. Each turn now hands out
    /// at most `readiesPerProcessMax` batches and says there is more.
    @Test func replayAfterRestartIsBoundedPerTurn() throws {
        let c = try Cluster.simulated()
        try c.elect(NodeID(1))
        for batch in 0..<10 {
            let ps = (0..<1000).map { k in Proposal(stream: StreamID(1), payload: Array("r\(batch)-\(k)".utf8)) }
            c.replica(NodeID(1)).propose(ps) { _ in }
            try c.settle()
        }
        try c.heartbeats()
        let commit = c.replica(NodeID(1)).raft.commit
        c.stop(NodeID(2))
        try c.open(NodeID(2))
        let r2 = c.replica(NodeID(2))
        r2.readiesPerProcessMax = 1
        var m = Message(kind: .heartbeat, from: NodeID(1), to: NodeID(2), term: c.replica(NodeID(1)).raft.term)
        m.commit = commit
        r2.step(m)
        var turns = 0
        repeat {
            turns += 1
            _ = try r2.process()
        } while r2.hasPendingWork && turns < 100
        #expect(turns > 2, "the replay took several turns")
        #expect(r2.lastApplied == commit)
        #expect(c.applied[NodeID(2)]?.count == Int(commit))
    }

    /// Item 3: a catch-up was installed from whatever sat in `catchup/` (leftovers of an earlier transfer
    /// included) for any `snapshot` message past the log's end, a stale leader's too. Now only the
    /// transfer the current leader's message names is installed, and the answer names what it proves.
    @Test func catchUpInstallsOnlyTheCurrentLeadersTransfer() throws {
        let c = try Cluster.simulated()
        try c.elect(NodeID(1))
        let three = NodeID(3)
        c.drop = { $0.to == three || $0.from == three }
        _ = try c.propose(40, tag: "s")
        let l = c.replica(NodeID(1))
        let files = l.store.sealedFiles()
        try #require(files.count >= 4)
        let index = l.store.sealedLastIndex
        let logTerm = try l.store.term(at: index)
        let term = l.raft.term
        try #require(term >= 2)
        let r3 = c.replica(three)
        let before = r3.store.lastIndex
        try #require(before < index)
        func stageAll(_ transfer: UInt64) throws -> Bool {
            var all = true
            for (name, path) in files {
                let f = try c.disk.open(path, create: false)
                let bytes = try f.read(at: 0, count: Int(try f.size()))
                f.close()
                all = try r3.stage(transfer: transfer, name: name, offset: 0, bytes: bytes) && all
            }
            return all
        }
        func snapshot(term: Term, transfer: UInt64) -> Message {
            var m = Message(kind: .snapshot, from: NodeID(1), to: three, term: term)
            m.index = index
            m.logTerm = logTerm
            m.context = transfer
            return m
        }
        // A transfer of an older term is not even staged.
        #expect(try stageAll((term - 1) << 32 | 1) == false)
        // Files of transfer 1, a message naming transfer 2: the leftovers are not installed.
        #expect(try stageAll(term << 32 | 1))
        r3.step(snapshot(term: term, transfer: term << 32 | 2))
        let refused = try r3.process()
        #expect(r3.store.lastIndex == before)
        #expect(refused.contains { $0.kind == .snapshotResponse && $0.reject })
        // A stale leader's message (an older term) finds staged files: nothing is installed.
        #expect(try stageAll(term << 32 | 3))
        r3.step(snapshot(term: term - 1, transfer: term << 32 | 3))
        _ = try r3.process()
        #expect(r3.store.lastIndex == before)
        // A restart empties the staging directory: nothing staged before it is installed after it.
        c.stop(three)
        try c.open(three)
        #expect(((try? c.disk.list(c.dir(three) + "/catchup")) ?? []).isEmpty)
        // The current leader's transfer: installed, and the answer names the index and term it proves.
        let r3b = c.replica(three)
        for (name, path) in files {
            let f = try c.disk.open(path, create: false)
            let bytes = try f.read(at: 0, count: Int(try f.size()))
            f.close()
            #expect(try r3b.stage(transfer: term << 32 | 4, name: name, offset: 0, bytes: bytes))
        }
        r3b.step(snapshot(term: term, transfer: term << 32 | 4))
        let answer = try r3b.process().first { $0.kind == .snapshotResponse }
        #expect(r3b.store.lastIndex >= index)
        #expect(answer?.reject == false && answer?.index == index && answer?.logTerm == logTerm, "\(String(describing: answer))")
        // And the replica then catches up the rest the normal way.
        c.drop = { _ in false }
        try c.heartbeats(5)
        #expect(try c.log(three) == c.log(NodeID(1)))
    }
}
