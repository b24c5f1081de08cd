import Raft
import SegmentFormat
import SegmentStore
import ShardState
import Testing
import WeftCore
import WeftTesting

@testable import Replication

/// Three replicas of one shard (nodes 1-3, bootstrapped as voters) over a `Disk`, messages passed by
/// hand: the harness of the replica and repair tests.
final class ReplicaCluster {
    let disk: any Disk
    /// Replica `id` lives in `<root>/n<id>`.
    let root: String
    /// Runs when the cluster goes away (removes a temporary root).
    let cleanup: () -> Void
    var replicas: [NodeID: ShardReplica] = [:]
    var queue: [Message] = []
    /// Snapshot messages sent after their files (moved to `queue` by `settle`).
    var catchUpMessages: [Message] = []
    var applied: [NodeID: [Record]] = [:]
    let ids = [NodeID(1), NodeID(2), NodeID(3)]
    /// Messages for which this is true are lost (partitions).
    var drop: (Message) -> Bool = { _ in false }
    let options: StoreOptions
    var rng = SeededRNG(seed: 99)
    /// The state machine every replica runs, and how often it snapshots (set before `restart`).
    var machine: any ShardStateMachine.Type = NoState.self
    var snapshotEvery: UInt64 = 100_000
    /// Retention every replica runs (set before `restart`), checked every `retentionTicks` ticks.
    var retention = RetentionPolicy.off
    var retentionTicks = 200
    /// Open replicas with their newest snapshot read on another thread meanwhile (real disk only).
    var prefetchSnapshots = false
    /// Drive the replicas as one driver lane does: appends deferred, made durable by one shared flush
    /// per round (`SegmentStore.syncTogether`), then the turns finished.
    var sharedFlush = false

    init(disk: any Disk, root: String, options: StoreOptions, cleanup: @escaping () -> Void = {}) throws {
        self.disk = disk
        self.root = root
        self.options = options
        self.cleanup = cleanup
        for id in ids { try open(id) }
    }

    /// Real files in a new directory under /tmp, no fsync (the repair tests stop replicas cleanly).
    convenience init() throws {
        let tmp = try TempDirectory(prefix: "weft-repair-test")
        try self.init(
            disk: PosixDisk(), root: tmp.path, options: StoreOptions(segmentBytesMax: 4096, blockBytesTarget: 512, durability: .never),
            cleanup: { tmp.remove() })
    }

    deinit {
        for r in replicas.values { r.close() }
        cleanup()
    }

    func dir(_ id: NodeID) -> String { root + "/n\(id.rawValue)" }
    func marker(_ id: NodeID) -> String { dir(id) + "/recovering" }
    func replica(_ id: NodeID) -> ShardReplica { replicas[id]! }

    func open(_ id: NodeID) throws {
        let dir = dir(id)
        let store = try SegmentStore(directory: dir, options: options, disk: disk)
        let hs = try HardStateFile(path: dir + "/raft.state", disk: disk)
        var cfg = RaftConfig(id: id, seed: 7)
        cfg.electionTicks = 10
        let r = try ShardReplica(
            shard: ShardID(0), id: id, store: store, hardState: hs, membershipFile: MembershipFile(directory: dir, disk: disk),
            bootstrap: Membership(voters: Set(ids)), config: cfg, machine: machine,
            prefetch: prefetchSnapshots ? SnapshotPrefetch.start(shardDirectory: dir, machine: machine) : nil)
        r.snapshotEveryRecords = snapshotEvery
        r.retention = retention
        r.retentionCheckTicks = retentionTicks
        applied[id] = []
        r.onApply = { [unowned self] rec in self.applied[id, default: []].append(rec) }
        // Catch-up from files: each file goes straight into the follower's staging directory (unless the
        // network drops it), then the snapshot message is queued behind it.
        r.startCatchUp = { [unowned self] to, transfer, files, snapshot in
            if !self.drop(Message(kind: .snapshot, from: id, to: to, term: 0)) {
                for (name, path) in files {
                    guard let f = try? self.disk.open(path, create: false), let n = try? f.size(), let bytes = try? f.read(at: 0, count: Int(n)) else {
                        continue
                    }
                    f.close()
                    _ = try? self.replicas[to]?.stage(transfer: transfer, name: name, offset: 0, bytes: bytes)
                }
            }
            self.catchUpMessages.append(snapshot)
        }
        replicas[id] = r
    }

    /// A clean stop (the store is closed, so its fence is up to date).
    func stop(_ id: NodeID) {
        replicas[id]?.close()
        replicas[id] = nil
        queue.removeAll { $0.to == id || $0.from == id }
    }

    func restart(_ id: NodeID) throws {
        stop(id)
        try open(id)
    }

    /// Runs every replica's driver and delivers messages until quiet, losing those `drop` (or `lose`,
    /// when given) says.
    func settle(drop lose: ((Message) -> Bool)? = nil) throws {
        let drop = lose ?? self.drop
        var rounds = 0
        repeat {
            rounds += 1
            queue += try drive()
            queue += catchUpMessages
            catchUpMessages = []
            let batch = queue
            queue = []
            for m in batch where !drop(m) { replicas[m.to]?.step(m) }
            queue += try drive()
            queue += catchUpMessages
            catchUpMessages = []
        } while (!queue.isEmpty || replicas.values.contains { $0.hasPendingWork }) && rounds < 1000
    }

    /// One turn of every replica: its messages. With `sharedFlush`, in two halves around one shared
    /// flush; `between` runs after the turns (`.turned`) and after the flush (`.flushed`), before the finish.
    func drive(between: (DrivePhase) throws -> Void = { _ in }) throws -> [Message] {
        var out: [Message] = []
        guard sharedFlush else {
            for id in ids { if let r = replicas[id] { out += try r.process() } }
            return out
        }
        for id in ids { if let r = replicas[id] { try r.process(send: { out += $0 }, deferSync: true) } }
        try between(.turned)
        let waiting = ids.compactMap { replicas[$0] }.filter(\.awaitingSync)
        ShardReplica.syncTogether(waiting)
        try between(.flushed)
        for r in waiting { try r.finishDeferredSync(send: { out += $0 }) }
        return out
    }

    enum DrivePhase { case turned, flushed }

    /// `n` ticks of the given replicas, settling after each.
    func tick(_ who: [NodeID], _ n: Int, until done: () -> Bool = { false }) throws {
        for _ in 0..<n {
            for id in who { replicas[id]?.tick() }
            try settle()
            if done() { return }
        }
    }

    var leader: NodeID? { ids.first { replicas[$0]?.raft.role == .leader } }

    func elect(_ id: NodeID) throws {
        replica(id).campaign()
        try settle()
        #expect(leader == id)
    }

    /// Proposes `n` records one at a time on the leader; returns those acknowledged as committed.
    func propose(_ n: Int, tag: String) throws -> [Record] {
        let l = try #require(leader)
        var acked: [Record] = []
        for k in 0..<n {
            // Incompressible bodies, so a few dozen fill several 4 KiB segments.
            let body = Array("\(tag) \(k) ".utf8) + (0..<200).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            replica(l).propose([Proposal(stream: StreamID(UInt64(k % 3 + 1)), payload: body)]) {
                if case .success(let rs) = $0 { acked += rs }
            }
            try settle()
        }
        return acked
    }

    /// Heartbeats from the leader, so followers learn the commit index.
    func heartbeats(_ n: Int = 3) throws {
        let l = try #require(leader)
        try tick([l], n)
    }

    func log(_ id: NodeID) throws -> [Record] {
        let s = replica(id).store
        return try s.read(from: s.firstIndex, to: .max)
    }

    /// The segment files of a replica, oldest first: (path, bytes, blocks).
    func segments(_ id: NodeID) throws -> [(path: String, bytes: [UInt8], blocks: [ScannedBlock])] {
        try disk.list(dir(id)).filter { $0.hasSuffix(".seg") }.sorted().map { name in
            let path = dir(id) + "/" + name
            let f = try disk.open(path, create: false)
            defer { f.close() }
            let bytes = try f.read(at: 0, count: Int(try f.size()))
            var scanner = try SegmentScanner(MemoryByteSource(name: name, bytes: bytes))
            var blocks: [ScannedBlock] = []
            while true {
                let at = scanner.offset
                guard let item = try scanner.next() else { break }
                // The active segment may end in zeros written ahead of its data (`preallocateBytes`).
                if case .damaged(_, nil) = item, try scanner.isZero(from: at) { break }
                guard case .block(let b) = item else { throw StoreError.invalidBatch("damage in \(name)") }
                blocks.append(b)
            }
            return (path, bytes, blocks)
        }
    }

    func truncateFile(_ path: String, to size: UInt64) throws {
        let f = try disk.open(path, create: false)
        defer { f.close() }
        try f.truncate(to: size)
    }

    /// Flips one byte in place (the file stays the same inode, so an open store sees it).
    func flipByte(_ path: String, at offset: UInt64) throws {
        let f = try disk.open(path, create: false)
        defer { f.close() }
        let b = try f.read(at: offset, count: 1)
        try f.write([b[0] ^ 0x20], at: offset)
    }

    /// Asks `to` for a pre-vote as a candidate with a log far ahead of everyone's, at the next term; the
    /// answer (nil: none) is kept from the network.
    func preVote(to: NodeID, from: NodeID) throws -> Message? {
        let r = replica(to)
        var m = Message(kind: .preVote, from: from, to: to, term: r.raft.term + 1)
        m.index = 1_000_000
        m.logTerm = r.raft.term + 10
        r.step(m)
        let out = try r.process()
        queue += out.filter { !($0.kind == .preVoteResponse && $0.to == from) }
        return out.first { $0.kind == .preVoteResponse && $0.to == from }
    }
}
