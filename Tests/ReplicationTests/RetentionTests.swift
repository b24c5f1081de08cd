import Raft
import SegmentFormat
import SegmentStore
import ShardState
import Testing
import WeftCore
import WeftTesting

@testable import Replication

/// Issue 10: retention drops the log's start (never what a snapshot, relay or tail still needs), and a
/// follower that needs dropped entries is caught up from the leader's files plus a snapshot.
@Suite struct ReplicaRetentionTests {
    /// Three key-value replicas, 4 KiB segments, a snapshot every 40 entries, at most 12 KiB of log kept.
    func cluster() throws -> ReplicaCluster {
        let c = try ReplicaCluster()
        c.machine = KeyValueMachine.self
        c.snapshotEvery = 40
        c.retention = RetentionPolicy(bytesMax: 12 << 10)
        c.retentionTicks = 1
        for id in c.ids { try c.restart(id) }
        try c.elect(NodeID(1))
        return c
    }

    /// `n` puts of 200-byte values on the leader, one at a time, on 13 keys.
    func put(_ c: ReplicaCluster, _ n: Int, from: Int = 0) throws {
        let l = try #require(c.leader)
        for k in from..<(from + n) {
            let value = Array("v\(k) ".utf8) + (0..<200).map { _ in UInt8(truncatingIfNeeded: c.rng.next()) }
            c.replica(l).propose([Proposal(stream: StreamID(UInt64(k % 3 + 1)), payload: KeyValueMachine.put(Array("k\(k % 13)".utf8), value))]) { _ in }
            try c.settle()
        }
        // Every replica ticks (each runs its own retention check), a few times.
        try c.tick(c.ids.filter { c.replicas[$0] != nil }, 3)
    }

    func expectSameState(_ c: ReplicaCluster, _ ids: [NodeID], _ comment: Comment) {
        let l = c.replica(NodeID(1))
        for id in ids {
            let r = c.replica(id)
            #expect(r.raft.applied == l.raft.applied, "\(comment): node \(id) applied")
            #expect(r.machine.stateHash == l.machine.stateHash, "\(comment): node \(id) state")
            #expect(r.retainThrough == l.retainThrough, "\(comment): node \(id) retention mark")
        }
    }

    @Test func theLeaderDecidesEveryReplicaDropsAndNothingPastItsOldestSnapshot() throws {
        let c = try cluster()
        try put(c, 300)
        let l = c.replica(NodeID(1))
        #expect(l.retainThrough > 0, "the leader proposed a retention mark")
        for id in c.ids {
            let r = c.replica(id)
            #expect(r.store.firstIndex > 1, "node \(id) dropped segments")
            #expect(r.stats.segmentsDropped > 0)
            let oldest = try #require(try r.snapshots.indexes().last)
            #expect(r.store.firstIndex - 1 <= oldest, "node \(id) kept everything after its oldest snapshot")
            #expect(r.store.firstIndex - 1 <= r.retainThrough, "node \(id) dropped nothing past the mark")
            let bytes = r.store.segmentSpans().reduce(UInt64(0)) { $0 + $1.bytes }
            #expect(bytes < 40 << 10, "node \(id) keeps about the limit (\(bytes) bytes)")
        }
        expectSameState(c, c.ids, "after retention")
        // Streams numbered past dropped records keep counting (the high-water file).
        for s in 1...3 { #expect(l.store.lastSeq(of: StreamID(UInt64(s))) == 100) }
        // A restart restores from a snapshot that reaches the log's start, and replays only the rest.
        try c.restart(NodeID(2))
        #expect(c.replica(NodeID(2)).repairEvents.isEmpty, "\(c.replica(NodeID(2)).repairEvents)")
        // A relay started now reads nothing below this log's start, whatever the restored mark says.
        #expect(c.replica(NodeID(2)).relayStart >= c.replica(NodeID(2)).firstLogIndex)
        try c.heartbeats()
        try c.settle()
        expectSameState(c, c.ids, "after a restart")
    }

    @Test func aTailSubscriberHoldsRetentionBack() throws {
        let c = try cluster()
        try put(c, 20)
        // Node 2's subscriber stays at index 5: node 2 keeps everything from there.
        let sub = try c.replica(NodeID(2)).tail.subscribe(from: 5) {}
        try put(c, 250, from: 20)
        #expect(c.replica(NodeID(1)).store.firstIndex > 5)
        #expect(c.replica(NodeID(2)).store.firstIndex <= 5, "node 2 kept its subscriber's records")
        let batch = try sub.poll(limit: 10)
        #expect(batch.records.first?.index == 5)
        // Once it moves on, node 2 drops too.
        while try !sub.poll(limit: 1000).records.isEmpty {}
        try c.tick([NodeID(2)], 2)
        #expect(c.replica(NodeID(2)).store.firstIndex > 5)
    }

    @Test func theLeaderWaitsForItsRelays() throws {
        let c = try cluster()
        let l = c.replica(NodeID(1))
        var floor: LogIndex? = 0
        l.hasRelays = true
        l.relayFloor = { floor }
        try put(c, 300)
        #expect(l.retainThrough == 0, "no relay mark known: nothing is dropped")
        #expect(l.store.firstIndex == 1)
        floor = 60
        try c.heartbeats()
        #expect(l.retainThrough > 0 && l.retainThrough <= 60, "the mark stops at the relays' floor: \(l.retainThrough)")
        for id in c.ids { #expect(c.replica(id).store.firstIndex <= 61) }
        floor = nil
        try put(c, 10, from: 300)
        #expect(l.retainThrough <= 60, "no relay running here: nothing more is dropped")
    }

    @Test func aFollowerBehindTheLeadersFirstIndexGetsFilesAndASnapshot() throws {
        let c = try cluster()
        try put(c, 40)
        c.stop(NodeID(3))
        try put(c, 300, from: 40)
        let l = c.replica(NodeID(1))
        try #require(l.store.firstIndex > 60, "the leader dropped what node 3 needs (first index \(l.store.firstIndex))")
        try c.open(NodeID(3))
        try c.heartbeats(6)
        try c.settle()
        let r3 = c.replica(NodeID(3))
        #expect(r3.store.firstIndex > 1, "node 3 took the leader's files")
        #expect(r3.lastSnapshotIndex + 1 >= r3.store.firstIndex, "and a snapshot reaching their start")
        expectSameState(c, c.ids, "after the catch-up")
        #expect(l.outgoingSnapshots.isEmpty, "the shipped snapshot is unpinned once the transfer ended")
        // Its state stays right across a restart, and it keeps up afterwards.
        try c.restart(NodeID(3))
        try put(c, 30, from: 340)
        expectSameState(c, c.ids, "after a restart of the caught-up node")
    }

    @Test func replicasThatLostTheirLogOrTheirSnapshotsAreCaughtUp() throws {
        let c = try cluster()
        try put(c, 300)
        // An election after the drop: the replicas save a commit index past their logs' start, which is
        // what Raft raises its applied index to at open (so "applied" says nothing about the state then).
        // (Leaders are stopped until node 1 leads again: the test then leaves it alone with the others down.)
        var elections = 0
        repeat {
            let x = try #require(c.leader)
            c.stop(x)
            try c.tick(c.ids.filter { $0 != x }, 60) { c.leader != nil }
            try c.open(x)
            try c.heartbeats()
            elections += 1
        } while c.leader != NodeID(1) && elections < 8
        try #require(c.leader == NodeID(1) && elections >= 2)
        // Node 3 loses its log and snapshots (its term, vote and group survive: a lost data disk).
        c.stop(NodeID(3))
        for n in try PosixDisk().list(c.dir(NodeID(3))) where n.hasSuffix(".seg") || n.hasSuffix(".idx") || n.hasSuffix(".hwm") || n.hasPrefix("fence") {
            try PosixDisk().remove(c.dir(NodeID(3)) + "/" + n)
        }
        for n in try PosixDisk().list(c.dir(NodeID(3)) + "/snapshots") { try PosixDisk().remove(c.dir(NodeID(3)) + "/snapshots/" + n) }
        // Node 2 loses only its snapshots: its log starts past index 1, so it cannot rebuild its state.
        c.stop(NodeID(2))
        for n in try PosixDisk().list(c.dir(NodeID(2)) + "/snapshots") { try PosixDisk().remove(c.dir(NodeID(2)) + "/snapshots/" + n) }
        try c.open(NodeID(2))
        #expect(c.replica(NodeID(2)).isRecovering, "no snapshot reaches its log's start: it refetches")
        #expect(c.replica(NodeID(2)).repairEvents.contains { $0.contains("no usable snapshot") })
        #expect(c.replica(NodeID(2)).machine.stateHash == KeyValueMachine().stateHash, "it applies nothing from a state it does not have")
        let aside = try PosixDisk().list(c.dir(NodeID(2))).filter { $0.hasPrefix("set-aside-") }
        #expect(aside.count == 1, "its log is kept aside, not deleted")
        try c.open(NodeID(3))
        #expect(c.replica(NodeID(3)).isRecovering, "\(c.replica(NodeID(3)).repairEvents)")
        try put(c, 20, from: 300)
        // A catch-up the leader started while node 3 was down times out first (20 election timeouts).
        let l = try #require(c.leader)
        try c.tick([l], 300) { c.replica(NodeID(3)).raft.applied == c.replica(l).raft.applied }
        expectSameState(c, c.ids, "after both caught up")
        #expect(!c.replica(NodeID(2)).isRecovering)
    }

    @Test func policies() {
        func span(_ base: LogIndex, _ last: LogIndex, _ bytes: UInt64, sealed: Bool = true) -> SegmentStore.SegmentSpan {
            .init(base: base, lastIndex: last, bytes: bytes, sealed: sealed)
        }
        let spans = [span(1, 10, 100), span(11, 20, 100), span(21, 30, 100), span(31, 35, 50, sealed: false)]
        #expect(RetentionPolicy.off.dropThrough(spans, nowMicros: 0) { _ in 0 } == 0)
        #expect(RetentionPolicy(bytesMax: 350).dropThrough(spans, nowMicros: 0) { _ in 0 } == 0)
        #expect(RetentionPolicy(bytesMax: 349).dropThrough(spans, nowMicros: 0) { _ in 0 } == 10)
        #expect(RetentionPolicy(bytesMax: 150).dropThrough(spans, nowMicros: 0) { _ in 0 } == 20)
        #expect(RetentionPolicy(bytesMax: 0).dropThrough(spans, nowMicros: 0) { _ in 0 } == 30, "never the active segment")
        // Ages: segments ending at timestamps 10, 20, 30 (index * 1); now 100, keep 75 µs.
        #expect(RetentionPolicy(ageMicrosMax: 75).dropThrough(spans, nowMicros: 100) { Int64($0) } == 20)
        #expect(RetentionPolicy(ageMicrosMax: 75).dropThrough(spans, nowMicros: 100) { $0 == 10 ? nil : Int64($0) } == 0, "unreadable: kept")
        #expect(RetentionPolicy(bytesMax: 249, ageMicrosMax: 85).dropThrough(spans, nowMicros: 100) { Int64($0) } == 20, "either limit")
    }
}

/// Issue 10: the newest snapshot read and decoded while the log opens gives the same state as reading it
/// after; a prefetched snapshot that does not fit the log is not used.
@Suite struct SnapshotPrefetchTests {
    @Test func aPrefetchedSnapshotRestoresTheSameStateAndAnUnusableOneIsSkipped() throws {
        let c = try ReplicaCluster()
        c.machine = KeyValueMachine.self
        c.snapshotEvery = 10
        c.prefetchSnapshots = true
        for id in c.ids { try c.restart(id) }
        try c.elect(NodeID(1))
        for k in 0..<35 {
            c.replica(NodeID(1)).propose([Proposal(stream: StreamID(1), payload: KeyValueMachine.put(Array("k\(k % 5)".utf8), Array("v\(k)".utf8)))]) { _ in }
            try c.settle()
        }
        try c.heartbeats()
        let snapAt = c.replica(NodeID(2)).lastSnapshotIndex
        try c.restart(NodeID(2))
        #expect(c.replica(NodeID(2)).raft.applied == snapAt, "restored from the prefetched snapshot")
        try c.heartbeats()
        try c.settle()
        #expect(c.replica(NodeID(2)).machine.stateHash == c.replica(NodeID(1)).machine.stateHash)
        // A newest snapshot past the log's end (the log was cut behind it): prefetched, then refused; the
        // older one is used.
        c.stop(NodeID(3))
        let r3 = try SnapshotFiles(shardDirectory: c.dir(NodeID(3)), disk: PosixDisk())
        let newest = try #require(try r3.indexes().first)
        let older = try #require(try r3.indexes().dropFirst().first)
        var far = try r3.load(newest)
        far.index = 10_000
        try r3.write(index: 10_000, bytes: far.encode())
        try c.open(NodeID(3))
        let again = c.replica(NodeID(3))
        #expect(again.raft.applied == newest || again.raft.applied == older, "a snapshot that fits the log: \(again.raft.applied)")
        #expect(again.repairEvents.contains { $0.contains("past the end of the log") }, "\(again.repairEvents)")
        try c.heartbeats()
        try c.settle()
        #expect(again.machine.stateHash == c.replica(NodeID(1)).machine.stateHash)
    }
}
