import Foundation
import Logging
import Raft
import SegmentStore
import Testing
import WeftCore
import WeftTesting

@testable import Replication

/// Issue 9: a node's replicas share driver threads (`DriverLane`). Three replicas of one shard on one
/// lane must elect, commit, and stop one at a time; a runner stopped before it started never runs.
@Suite struct DriverLaneTests {
    final class Runners: @unchecked Sendable {
        let lock = NSLock()
        var byNode: [NodeID: ShardRunner] = [:]
        subscript(_ id: NodeID) -> ShardRunner? {
            get { lock.withLock { byNode[id] } }
            set { lock.withLock { byNode[id] = newValue } }
        }
    }

    func propose(_ r: ShardRunner, _ payload: UInt8) async -> Result<[Record], ReplicationError> {
        await withCheckedContinuation { c in
            r.submit(.propose([Proposal(stream: StreamID(1), payload: [payload])]) { c.resume(returning: $0.map { $0.map(\.record) }) })
        }
    }

    func status(_ r: ShardRunner) async -> ShardStatus {
        await withCheckedContinuation { c in r.submit(.status { c.resume(returning: $0) }) }
    }

    func leader(_ runners: Runners, among ids: [NodeID]) async throws -> NodeID {
        for _ in 0..<400 {
            for id in ids {
                if let r = runners[id], await status(r).role == "leader" { return id }
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        throw ReplicationError.unavailable("no leader")
    }

    /// Takes the cluster's three replicas and starts them on `lane`, messages delivered between them.
    func startOnLane(_ cluster: ReplicaCluster, _ lane: DriverLane) throws -> Runners {
        let runners = Runners()
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        for id in cluster.ids {
            let taken = cluster.replicas.removeValue(forKey: id)
            let replica = try #require(taken)
            replica.onApply = { _ in }
            replica.startCatchUp = { _, _, _, _ in }
            runners[id] = ShardRunner(replica: replica, tick: .milliseconds(10), logger: logger, lane: lane) { msgs in
                for m in msgs { runners[m.to]?.submit(.message(m)) }
            }
        }
        for id in cluster.ids { runners[id]?.start() }
        return runners
    }

    @Test func replicasOnOneLaneElectCommitAndStopOneAtATime() async throws {
        let cluster = try ReplicaCluster()
        let lane = DriverLane(name: "test-lane", tick: .milliseconds(10))
        let runners = try startOnLane(cluster, lane)
        let l = try await leader(runners, among: cluster.ids)
        let leaderRunner = try #require(runners[l])
        for k in 0..<20 {
            guard case .success(let recs) = await propose(leaderRunner, UInt8(k)) else {
                Issue.record("proposal \(k) failed")
                return
            }
            #expect(recs.count == 1)
        }
        // One follower stops; the two others still commit (a quorum of three), on the same lane.
        let follower = try #require(cluster.ids.first { $0 != l })
        #expect(runners[follower]?.stop() == true)
        for k in 20..<30 {
            guard case .success = await propose(leaderRunner, UInt8(k)) else {
                Issue.record("proposal \(k) failed after a follower stopped")
                return
            }
        }
        // The stopped one refuses input as unavailable (nothing written).
        if let stopped = runners[follower], case .failure(.unavailable) = await propose(stopped, 99) {} else {
            Issue.record("a stopped runner took a proposal")
        }
        for id in cluster.ids where id != follower { #expect(runners[id]?.stop() == true) }
    }

    @Test func aRunnerStoppedBeforeItStartsNeverRuns() async throws {
        let cluster = try ReplicaCluster()
        let lane = DriverLane(name: "test-lane-2", tick: .milliseconds(10))
        let taken = cluster.replicas.removeValue(forKey: NodeID(1))
        let replica = try #require(taken)
        replica.onApply = { _ in }
        let r = ShardRunner(replica: replica, tick: .milliseconds(10), logger: Logger(label: "test"), lane: lane) { _ in }
        #expect(r.stop() == true)
        r.start()  // after the stop: nothing runs, nothing is closed twice
        let s = await status(r)
        #expect(s.role == "stopped")
        #expect(lane.runners.isEmpty)
        // The other replicas of the cluster close normally.
        for (_, other) in cluster.replicas { other.close() }
        cluster.replicas = [:]
    }

    /// A read waits for an index (`waitApplied`), then runs on the replica's thread: a replica that no
    /// longer has that index applied there (a repair rewound it in between) refuses the read instead of
    /// answering from the older state.
    @Test func aReadPastWhatTheReplicaAppliedIsRefusedWhereItRuns() async throws {
        let cluster = try ReplicaCluster()
        let lane = DriverLane(name: "test-lane-3", tick: .milliseconds(10))
        let taken = cluster.replicas.removeValue(forKey: NodeID(1))
        let replica = try #require(taken)
        replica.onApply = { _ in }
        let r = ShardRunner(replica: replica, tick: .milliseconds(10), logger: Logger(label: "test"), lane: lane) { _ in }
        r.start()
        let read: @Sendable (LogIndex) async -> Result<ReadResult, ReadError> = { atLeast in
            await withCheckedContinuation { c in r.submit(.read(.log(from: 1, limit: 10), atLeast: atLeast) { c.resume(returning: $0) }) }
        }
        let past = await read(1_000_000)
        guard case .failure(.unavailable(let why)) = past else {
            Issue.record("a read past the replica's applied index was answered: \(past)")
            return
        }
        #expect(why.contains("reset by a repair"))
        if case .failure(.unavailable(let why)) = await read(0) { #expect(!why.contains("reset by a repair")) }
        #expect(r.stop() == true)
        for (_, other) in cluster.replicas { other.close() }
        cluster.replicas = [:]
    }

    /// Three replicas of one shard on one lane, on real files with `fsync = every_batch`: the followers'
    /// appends of a round share one flush (where the filesystem allows it: `Disk.flushDomain`), every
    /// proposal commits, and every record is in each replica's files afterwards. With `sharedFlush`
    /// off, no append shares.
    @Test(arguments: [true, false])
    func aLaneSharesOneFlushAmongItsReplicas(shared: Bool) async throws {
        let tmp = try TempDirectory(prefix: "weft-lane-flush")
        defer { tmp.remove() }
        let options = StoreOptions(segmentBytesMax: 1 << 20, blockBytesTarget: 4096, durability: .everyBatch)
        let cluster = try ReplicaCluster(disk: PosixDisk(), root: tmp.path, options: options)
        let lane = DriverLane(name: "test-lane-4", tick: .milliseconds(10), sharedFlush: shared)
        let runners = try startOnLane(cluster, lane)
        let l = try await leader(runners, among: cluster.ids)
        let leaderRunner = try #require(runners[l])
        for k in 0..<40 {
            guard case .success = await propose(leaderRunner, UInt8(k)) else {
                Issue.record("proposal \(k) failed")
                return
            }
        }
        var sharedSyncs: UInt64 = 0
        for id in cluster.ids {
            if let r = runners[id] { sharedSyncs += await status(r).stats.sharedSyncs }
        }
        // A filesystem where flushes cannot be shared (say a tmpfs /tmp) shares none, rightly.
        if shared && PosixDisk().flushDomain(tmp.path) != nil {
            #expect(sharedSyncs > 0)
        } else {
            #expect(sharedSyncs == 0)
        }
        for id in cluster.ids { #expect(runners[id]?.stop() == true) }
        for id in cluster.ids {
            let store = try SegmentStore(directory: cluster.dir(id), options: options)
            let payloads = try store.read(from: 1, to: .max).filter { $0.stream == StreamID(1) }.map(\.payload)
            #expect(payloads == (0..<40).map { [UInt8($0)] }, "replica \(id)")
            store.close()
        }
    }
}
