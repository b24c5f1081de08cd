import Foundation
import Raft
import SegmentStore
import ShardState
import Testing
import WeftCore
import WeftTesting

@testable import Replication

/// Issue 10: tails — committed records for in-process subscribers, on followers too.
@Suite struct TailTests {
    func drain(_ sub: TailSubscription, into seen: inout [Record], fromFiles: inout Int) throws {
        while true {
            let b = try sub.poll(limit: 7)
            if b.fromFiles && !b.records.isEmpty { fromFiles += 1 }
            seen += b.records
            if b.records.isEmpty { return }
        }
    }

    @Test func aFollowersTailHasEveryCommittedRecordInOrderAcrossALeaderChange() throws {
        let c = try ReplicaCluster()
        try c.elect(NodeID(1))
        let f = c.replica(NodeID(3))
        final class Wakes: @unchecked Sendable { var n = 0 }
        let wakes = Wakes()
        let sub = try f.tail.subscribe(from: 1) { wakes.n += 1 }
        var seen: [Record] = []
        var fromFiles = 0
        _ = try c.propose(20, tag: "a")
        try c.heartbeats()
        try drain(sub, into: &seen, fromFiles: &fromFiles)
        c.replica(NodeID(1)).raftTransfer(NodeID(2))
        try c.settle()
        try c.heartbeats()
        #expect(c.leader == NodeID(2))
        _ = try c.propose(20, tag: "b")
        try c.heartbeats()
        try drain(sub, into: &seen, fromFiles: &fromFiles)
        #expect(wakes.n > 0)
        #expect(seen.map(\.index) == Array(1...f.raft.applied), "no gap, no repeat")
        #expect(try seen == c.log(NodeID(2)).prefix(seen.count).map { $0 })
        #expect(seen.filter { $0.type == .data }.count == 40)
    }

    @Test func aSubscriberBehindTheWindowReadsTheFilesAcrossSegments() throws {
        let c = try ReplicaCluster()
        try c.elect(NodeID(1))
        let f = c.replica(NodeID(2))
        f.tail.windowCountMax = 5
        _ = try c.propose(60, tag: "w")  // ~13 KiB of incompressible records: several 4 KiB segments
        try c.heartbeats()
        #expect(try c.segments(NodeID(2)).count >= 3)
        let sub = try f.tail.subscribe(from: 1) {}
        var seen: [Record] = []
        var fromFiles = 0
        try drain(sub, into: &seen, fromFiles: &fromFiles)
        #expect(fromFiles > 0, "the window holds 5 records: the rest came from the files")
        #expect(seen.map(\.index) == Array(1...f.raft.applied))
        #expect(try seen == c.log(NodeID(2)))
        // A subscriber can start anywhere, and resume where it stopped.
        let mid = try f.tail.subscribe(from: 33) {}
        let b = try mid.poll(limit: 3)
        #expect(b.records.map(\.index) == [33, 34, 35])
        #expect(mid.next == 36)
    }

    /// As after a catch-up that installed a log starting past a snapshot: the files no longer hold the
    /// subscriber's position. Polling again cannot cure that; the failure says where the files start, and
    /// a subscriber that can live with the gap (the delivery hub) skips there, which also stops its old
    /// position from holding back retention.
    @Test func aSubscriberWhosePositionTheFilesNoLongerHoldLearnsWhereTheyStart() throws {
        let c = try ReplicaCluster()
        try c.elect(NodeID(1))
        let f = c.replica(NodeID(2))
        f.tail.windowCountMax = 5
        _ = try c.propose(60, tag: "w")
        try c.heartbeats()
        let segs = try c.segments(NodeID(2))
        #expect(segs.count >= 3)
        let sub = try f.tail.subscribe(from: 1) {}
        try FileManager.default.removeItem(atPath: segs[0].path)
        try? FileManager.default.removeItem(atPath: String(segs[0].path.dropLast(4)) + ".idx")
        var failure: (any Error)?
        do { _ = try sub.poll(limit: 10) } catch { failure = error }
        let error = try #require(failure)
        let first = try #require(TailSubscription.firstHeld(after: error))
        #expect(first == segs[1].blocks.first?.header.firstIndex)
        #expect(f.tail.lowestPosition == 1, "the stuck position holds retention back")
        sub.skip(to: first)
        let b = try sub.poll(limit: 3)
        #expect(b.records.map(\.index) == [first, first + 1, first + 2])
        #expect(f.tail.lowestPosition == first + 3)
        // Any other failure is not one to skip over.
        #expect(TailSubscription.firstHeld(after: CancellationError()) == nil)
    }

    @Test func aTailResumesFromFilesAfterARestartFromASnapshot() throws {
        let c = try ReplicaCluster()
        c.machine = KeyValueMachine.self
        c.snapshotEvery = 10
        for id in c.ids { try c.restart(id) }
        try c.elect(NodeID(1))
        for k in 0..<30 {
            c.replica(NodeID(1)).propose([Proposal(stream: StreamID(1), payload: KeyValueMachine.put([UInt8(k % 4)], [UInt8(k)]))]) { _ in }
            try c.settle()
        }
        try c.heartbeats()
        try c.restart(NodeID(3))
        let f = c.replica(NodeID(3))
        #expect(f.tail.applied == f.lastSnapshotIndex && f.tail.applied > 0, "the tail starts where the state does")
        try c.heartbeats()
        let sub = try f.tail.subscribe(from: 1) {}
        var seen: [Record] = []
        var fromFiles = 0
        try drain(sub, into: &seen, fromFiles: &fromFiles)
        #expect(seen.map(\.index) == Array(1...f.raft.applied))
        #expect(fromFiles > 0)
    }

    @Test func subscribersAreBounded() throws {
        let c = try ReplicaCluster()
        let tail = c.replica(NodeID(1)).tail
        var subs: [TailSubscription] = []
        for _ in 0..<ShardTail.subscribersMax { subs.append(try tail.subscribe(from: 1) {}) }
        #expect(throws: ShardTail.SubscribeError.self) { _ = try tail.subscribe(from: 1) {} }
        subs.removeLast()
        _ = try tail.subscribe(from: 1) {}
    }
}
