import Foundation
import Raft
import SegmentFormat
import SegmentStore
import ShardState
import WeftCore

/// The durable log of a shard as Raft's read-only view.
///
/// Raft asks for terms constantly (every append it sends or checks, every commit); the terms of entries
/// written since the replica started are kept in memory as runs of equal term, so those answers need no
/// block read. Older entries are read from the store.
///
/// The entries appended last (at most `recentCountMax` records and `recentBytesMax` payload bytes) stay
/// in memory too: Raft hands out committed entries moments after they were persisted, and resends to a
/// follower that is slightly behind; both would otherwise read back (pread, checksum, LZ4) the blocks
/// this replica just wrote. The copy is the one that was written, so serving it is as correct as the
/// read it saves; damage to the file is still found by reads of older entries and by the scrubber.
final class StoreLogReader: RaftLogReader {
    let store: SegmentStore
    /// (first index, term) of each run of equal terms, for indexes >= `coveredFrom`.
    var termRuns: [(start: LogIndex, term: Term)] = []
    var coveredFrom: LogIndex
    /// The newest appended records, contiguous, ending at `store.lastIndex` (empty: none kept).
    var recent: [Record] = []
    /// Index of `recent[recentStart]` is `recent[recentStart].index`; records before `recentStart` are
    /// dropped lazily (compacted when they outnumber the live ones).
    var recentStart = 0
    var recentBytes = 0
    static let recentCountMax = 8192
    static let recentBytesMax = 8 << 20

    init(_ store: SegmentStore) {
        self.store = store
        coveredFrom = store.lastIndex + 1
    }

    var firstIndex: LogIndex { store.firstIndex }
    var lastIndex: LogIndex { store.lastIndex }

    func term(at index: LogIndex) -> Term? {
        if index >= coveredFrom, index <= store.lastIndex, let run = termRuns.last(where: { $0.start <= index }) {
            return run.term
        }
        return try? store.term(at: index)
    }

    func didAppend(_ records: [Record]) {
        for r in records where termRuns.last?.term != r.term || termRuns.isEmpty {
            termRuns.append((r.index, r.term))
        }
        guard let first = records.first else { return }
        if recentStart < recent.count, recent[recent.count - 1].index + 1 != first.index {
            dropRecent()
        }
        recent += records
        for r in records { recentBytes += r.payload.count }
        while recent.count - recentStart > Self.recentCountMax || (recentBytes > Self.recentBytesMax && recent.count - recentStart > 1) {
            recentBytes -= recent[recentStart].payload.count
            recentStart += 1
        }
        if recentStart > 1024 && recentStart * 2 > recent.count {
            recent.removeFirst(recentStart)
            recentStart = 0
        }
    }

    func dropRecent() {
        recent = []
        recentStart = 0
        recentBytes = 0
    }

    func didTruncate(from index: LogIndex) {
        termRuns.removeAll { $0.start >= index }
        coveredFrom = min(coveredFrom, index)
        // Truncation is rare (a new leader overwrote an uncommitted tail): start the cache afresh.
        dropRecent()
    }

    /// The last read that failed with an I/O error (not damage: damage is repaired), until a read succeeds.
    var readFailure: String?

    func entries(from: LogIndex, to: LogIndex, maxBytes: Int) -> [Record]? {
        guard from < to else { return [] }
        if recentStart < recent.count, from >= recent[recentStart].index, from >= store.firstIndex,
            to - 1 <= recent[recent.count - 1].index, recent[recent.count - 1].index == store.lastIndex
        {
            var k = recentStart + Int(from - recent[recentStart].index)
            let end = recentStart + Int(to - recent[recentStart].index)
            var out: [Record] = []
            out.reserveCapacity(min(end - k, 4096))
            var bytes = 0
            while k < end, out.count < 4096 {
                if !out.isEmpty && bytes + recent[k].payload.count > maxBytes { break }
                bytes += recent[k].payload.count
                out.append(recent[k])
                k += 1
            }
            return out
        }
        let all: [Record]
        do {
            all = try store.read(from: from, to: to - 1, limit: 4096)
            readFailure = nil
        } catch StoreError.disk(let e) {
            readFailure = "reading entries \(from)..<\(to): \(e)"
            return nil
        } catch {
            return nil
        }
        guard all.first?.index == from else { return nil }
        var bytes = 0
        var n = 0
        for r in all {
            if n > 0 && bytes + r.payload.count > maxBytes { break }
            bytes += r.payload.count
            n += 1
        }
        return Array(all.prefix(n))
    }
    func lastSeq(of stream: StreamID) -> StreamSeq { store.lastSeq(of: stream) }
    var catchUpIndex: LogIndex { store.sealedLastIndex }
}

/// What a replica did since it opened: counters for `/metrics`, `/api/v1/cluster/status` and the
/// benchmarks (records per fdatasync, messages per record, turns per request).
public struct ReplicaStats: Sendable, Equatable, Codable {
    /// Times the shard thread woke with inputs to handle.
    public var wakeups: UInt64 = 0
    /// Inputs handled (peer messages, proposals, reads, ...).
    public var inputs: UInt64 = 0
    /// Client requests proposed on this replica as leader, and the records in them.
    public var requests: UInt64 = 0
    public var recordsProposed: UInt64 = 0
    /// `store.append` calls: one pwrite each, and under `fsync = "every_batch"` one fdatasync each or a
    /// share of the driver lane's flush (`sharedSyncs`).
    public var storeAppends: UInt64 = 0
    public var recordsAppended: UInt64 = 0
    /// Store appends made durable by their lane's shared flush (a write-back and another file's
    /// fdatasync) rather than an fdatasync of their own (Docs/storage.md, "Shared flushes").
    public var sharedSyncs: UInt64 = 0
    /// Raft messages sent, and the appends among them (with or without entries).
    public var messagesSent: UInt64 = 0
    public var appendsSent: UInt64 = 0
    /// Raft messages received.
    public var messagesReceived: UInt64 = 0
    /// Committed entries handed to apply.
    public var recordsCommitted: UInt64 = 0
    /// Segments retention dropped.
    public var segmentsDropped: UInt64 = 0
    /// Catch-ups installed from a leader's files (with a snapshot, when its log no longer starts at 1).
    public var catchUpsInstalled: UInt64 = 0
    public var snapshotsInstalled: UInt64 = 0

    public init() {}
}

/// A committed record as its proposer learns it: where it landed and what apply did with it.
public struct Applied: Sendable, Equatable {
    public var record: Record
    public var outcome: ApplyOutcome
    public init(record: Record, outcome: ApplyOutcome) {
        self.record = record
        self.outcome = outcome
    }
}

/// The snapshot being written off the shard thread, and the last one that finished.
/// `@unchecked Sendable`: every field is guarded by `lock`.
final class SnapshotJobState: @unchecked Sendable {
    let lock = NSCondition()
    var running = false
    /// Set by the job when it ends: the index it wrote, or why it failed.
    var finished: (index: LogIndex, error: String?)?

    func begin() -> Bool {
        lock.lock()
        defer { lock.unlock() }
        if running { return false }
        running = true
        return true
    }

    func end(_ index: LogIndex, _ error: String?) {
        lock.lock()
        running = false
        finished = (index, error)
        lock.broadcast()
        lock.unlock()
    }

    func take() -> (index: LogIndex, error: String?)? {
        lock.lock()
        defer { lock.unlock() }
        defer { finished = nil }
        return finished
    }

    /// Waits until no job runs, at most until `end`; false if one still runs.
    func waitIdle(until end: Date) -> Bool {
        lock.lock()
        defer { lock.unlock() }
        while running {
            if !lock.wait(until: end) { break }
        }
        return !running
    }
}

/// One result of a `DispatchQueue.concurrentPerform` branch. `@unchecked Sendable`: each slot is written
/// by one branch and read only after `concurrentPerform` returned (which orders the two).
final class ParallelSlot<T: Sendable>: @unchecked Sendable {
    var value: T?
}

/// A snapshot's work handed to another thread: the copied state and where to write it.
/// `@unchecked Sendable`: `files` is written by at most one job at a time (`SnapshotJobState.running`);
/// the replica meanwhile only lists and reads its files, and pins and prunes under `SnapshotFiles`'s
/// lock; its disk must be safe to use from another thread (`PosixDisk` keeps no state; tests run jobs
/// inline).
struct SnapshotJob: @unchecked Sendable {
    let files: SnapshotFiles
    let state: any ShardStateMachine
    let index: LogIndex
    let term: Term
    let membership: Membership
    let membershipIndex: LogIndex
    let seqs: BucketedMap<UInt64, UInt64>
    let requests: RequestWindow
    let relays: RelayMarks
    let retainThrough: LogIndex
    let status: SnapshotJobState

    func run() {
        var streams: [(stream: StreamID, seq: StreamSeq)] = []
        streams.reserveCapacity(seqs.count)
        seqs.forEach { s, q in streams.append((StreamID(s), q)) }
        streams.sort { $0.stream.rawValue < $1.stream.rawValue }
        let snap = StateSnapshot(
            index: index, term: term, membership: membership, membershipIndex: membershipIndex, streamSeqs: streams, state: state.snapshot(),
            requests: requests.encode(), relays: relays.encode(), retainThrough: retainThrough)
        do {
            try files.write(index: index, bytes: snap.encode())
            status.end(index, nil)
        } catch {
            status.end(index, "\(error)")
        }
    }
}

/// Why a proposal did not commit.
public enum ReplicationError: Error, Equatable, Sendable {
    case notLeader(NodeID?)
    case transferring
    case configChangePending
    /// Another leader's entry replaced it (the proposing leader lost its term before committing).
    case superseded
    case storage(String)
    case stopped
    /// The replica stopped waiting for it (it found its own log damaged and is repairing it): the entry
    /// may still commit through the other replicas. Never retried automatically.
    case outcomeUnknown(String)
    /// Refused before it reached Raft (a reserved record type): nothing was written.
    case invalid(String)
    /// Never proposed (the replica was not running, or stopped before it took the request): nothing
    /// was written, a retry is safe.
    case unavailable(String)
    /// The state machine refused it on the leader before it was proposed (`ShardStateMachine.admit`):
    /// nothing was written.
    case refused(code: String, message: String)
}

extension ReplicationError: CustomStringConvertible {
    /// Plain text for logs and API error messages.
    public var description: String {
        switch self {
        case .notLeader(let l): l.map { "not the leader (node \($0) is)" } ?? "not the leader (no leader known)"
        case .transferring: "leadership is being transferred"
        case .configChangePending: "another membership change is pending"
        case .superseded: "replaced by another leader's entry before it committed"
        case .storage(let s): "storage failed: \(s)"
        case .stopped: "the replica stopped"
        case .outcomeUnknown(let s), .invalid(let s), .unavailable(let s): s
        case .refused(let code, let s): "\(code): \(s)"
        }
    }
}

/// One shard's replica on this node: the Raft state machine driven over the segment store.
/// Single-threaded: its owner (a `ShardRunner`, or a test) calls it from one thread.
///
/// The driver order is etcd's: persist entries (truncating a conflicting suffix with the store's
/// `truncateSuffix`, appending with one pwrite + fdatasync) and the hard state (pwrite + fdatasync),
/// and only then hand out messages; committed entries are applied, and each completes the proposal that
/// created it (if its term matches).
public final class ShardReplica {
    public let shard: ShardID
    public let id: NodeID
    public internal(set) var raft: Raft
    var store: SegmentStore
    var reader: StoreLogReader
    let hardState: HardStateFile
    let raftConfig: RaftConfig
    /// Starts shipping this log's sealed files to a follower that needs them (catch-up transfer
    /// `transfer`), then `snapshot` once the follower has acknowledged them all: set by the node
    /// (`CatchUpShipper`: off this thread, flow-controlled). Progress and failure come back through
    /// `reportCatchUp`.
    public var startCatchUp: (_ to: NodeID, _ transfer: UInt64, _ files: [(name: String, path: String)], _ snapshot: Message) -> Void = {
        _, _, _, _ in
    }
    /// The catch-up transfer whose files are being staged (nil: none). Kept in memory only: the staging
    /// directory is emptied at open, so nothing staged before a restart is ever installed.
    var currentTransfer: UInt64?
    /// Bytes staged so far per file of `currentTransfer` (a chunk must continue its file).
    var stagedBytes: [String: UInt64] = [:]
    /// Cancels the catch-ups this replica started as leader (it stopped leading); set by the node.
    public var cancelCatchUps: () -> Void = {}
    /// Told when this replica starts (true) or stops (false) leading: the node runs the shard's relays on
    /// its leader. Called on the shard's thread; must not block.
    public var onLeadership: (Bool) -> Void = { _ in }
    var wasLeader = false
    /// Told when the leader this replica knows of changes (nil: none known, an election is on), with the
    /// term, so the node can send writes for the shard there at once rather than to a leader it last
    /// heard of, which may be paused or cut off. Called on the shard's thread; must not block.
    public var onLeaderKnown: (NodeID?, Term) -> Void = { _, _ in }
    var reportedLeader: NodeID?
    /// index -> (term it was proposed in, completion).
    var waiting: [LogIndex: (Term, (Result<Applied, ReplicationError>) -> Void)] = [:]
    /// The shard's state, derived from the committed log up to `raft.applied` (Docs/state.md).
    public private(set) var machine: any ShardStateMachine
    let machineType: any ShardStateMachine.Type
    /// Highest seq applied per stream (stream id -> seq), for snapshots.
    var appliedSeqs = BucketedMap<UInt64, UInt64>()
    /// Outcomes of the last keyed requests (idempotent writes), derived from the log.
    public internal(set) var requests = RequestWindow()
    /// On the leader: request keys in its log not yet applied (key -> index of the key record, and the
    /// request's record count), so a retry that arrives before the first is applied waits for it
    /// instead of writing it again. Rebuilt from the unapplied tail when the replica becomes leader.
    var pendingKeys: [[UInt8]: (index: LogIndex, count: Int)] = [:]
    /// The term `pendingKeys` was gathered in (0: not gathered; a leader of a newer term gathers again).
    var pendingKeysTerm: Term = 0
    /// Per source shard, the highest source index whose derived records this shard applied (relays).
    public internal(set) var relayMarks = RelayMarks()
    /// On the leader: relay batches in its log not applied yet, per source shard: the batch's last source
    /// index and the log index of its last record (gathered with `pendingKeys`).
    var pendingRelays: [UInt64: (last: LogIndex, end: LogIndex)] = [:]
    /// Term of the entry at `raft.applied`.
    var appliedTerm: Term = 0
    /// The highest index the applied `retain` records let replicas drop (Retention.swift); replicated
    /// state, carried by snapshots.
    public internal(set) var retainThrough: LogIndex = 0
    /// What the leader's retention keeps (Docs/state.md, "Retention"); off by default.
    public var retention = RetentionPolicy.off
    /// The lowest relay mark of this shard's relays as the node running them knows it (nil: no relay
    /// runs here for this shard; 0: not known yet). Set by the node; read on the shard thread.
    public var relayFloor: () -> LogIndex? = { nil }
    /// Whether this shard's records feed relays at all (the node runs them on the leader): then the
    /// leader's retention waits for `relayFloor`.
    public var hasRelays = false
    /// The newest snapshot, read and decoded on another thread while the log opened (used once, at open).
    var prefetch: SnapshotPrefetch?
    /// Catch-ups this leader is shipping with a snapshot: transfer -> the (pinned) snapshot's index.
    var outgoingSnapshots: [UInt64: LogIndex] = [:]
    /// Ticks between two retention checks.
    public var retentionCheckTicks = 200
    var ticksSinceRetention = 0
    /// Snapshot files of this replica.
    let snapshots: SnapshotFiles
    /// A snapshot is written once this many entries were applied since the last one.
    public var snapshotEveryRecords: UInt64 = 100_000
    /// Whether snapshot files are written on another thread (the node's replicas, on the real disk) or in
    /// the driver's turn (tests on a simulated disk, which is not thread-safe).
    public var snapshotsInBackground = false
    /// Index of the newest snapshot on disk (0: none).
    public internal(set) var lastSnapshotIndex: LogIndex = 0
    let snapshotJob = SnapshotJobState()
    static let snapshotQueue = DispatchQueue(label: "weft-snapshots", qos: .utility)
    /// The clock the leader stamps proposals with (microseconds since the epoch); tests set their own.
    public var clockMicros: () -> Int64 = { Int64(Date().timeIntervalSince1970 * 1_000_000) }
    /// The highest timestamp in this replica's log: a leader never stamps below it, so timestamps only
    /// grow along the log (across leader changes too: a new leader holds every committed entry).
    var lastStampMicros: Int64 = 0
    var reads: [UInt64: (Result<LogIndex, ReplicationError>) -> Void] = [:]
    /// Callers waiting for an applied index, sorted by it (`whenApplied`; at most `appliedWaitersMax`).
    var appliedWaiters: [(index: LogIndex, token: UInt64, done: (Result<LogIndex, ReplicationError>) -> Void)] = []
    /// Read-index requests waiting at most; past it a new one fails at once.
    public static let readsMax = 65_536
    var pendingReads: [(id: UInt64, index: LogIndex)] = []
    var nextReadID: UInt64 = 1
    /// Counters (read with `status()`).
    public internal(set) var stats = ReplicaStats()
    /// Called with every committed record, in log order, on the shard's thread.
    public var onApply: (Record) -> Void = { _ in }
    /// The shard's relay rule, for the records the leader writes inline (Inline.swift); nil: none.
    public var inlineRule: (any RelayRule)?
    /// On the leader, per order key: the index of the last record of that key left to the own relay lane
    /// (Inline.swift); and the log's end when this term's first inline decision was made.
    var inlineOwed: [StreamID: LogIndex] = [:]
    var inlineFloor: (term: Term, index: LogIndex) = (0, 0)
    /// Committed records for subscribers on other threads (the delivery tier, relays).
    public let tail: ShardTail

    let membershipFile: MembershipFile
    var savedMembershipIndex: LogIndex

    /// What this replica found damaged and did about it, newest last (at most 50; for status and logs).
    public private(set) var repairEvents: [String] = []
    /// Damage repairs since the replica opened, and records refetched by them (cut and sent again).
    public private(set) var repairs = 0
    /// Present while the replica is recovering (its log lost entries and has not caught up yet), so that a
    /// restart in the middle of a repair keeps it out of elections.
    var markerPath: String { store.directory + "/recovering" }
    /// Whether the marker file exists (known without a stat on every driver turn).
    var markerPresent = false
    /// Bytes of sealed segments the scrubber verifies per call of `scrub`.
    public var scrubBytesPerTick = 1 << 20
    /// Pause between two full scrub passes (the first pass starts when the replica opens).
    public var scrubPause: Duration = .seconds(600)
    var nextScrub = ContinuousClock.now

    /// The driver could not read committed entries (an I/O error, not damage) for this long: the replica
    /// stops with the reason (its node keeps serving the other shards). Until then it retries once per
    /// tick (the runner does not call `process` again before the next tick or input).
    public var readStallMax: Duration = .seconds(10)
    var readStallSince: ContinuousClock.Instant?
    /// Records per store append: a batch past the store's count limit (`Limits.appendBatchCountMax`) or
    /// this many payload bytes is split, so a follower that fell far behind never hands the store more
    /// than it takes (a limit is not a failure).
    public var persistBatchBytesMax = 32 << 20
    /// Readies one `process` call handles at most; the rest waits for the next turn, so a long replay of
    /// committed entries (a restart applies the log from index 1) never holds up ticks, heartbeats,
    /// votes or stop for long.
    public var readiesPerProcessMax = 16
    /// Whether `process` left work it could do now (the runner calls it again before waiting).
    public private(set) var hasPendingWork = false

    public struct Stalled: Error, CustomStringConvertible {
        public var description: String
    }

    public enum OpenError: Error, CustomStringConvertible {
        case membershipMissing(String)
        case hardStateLost(String)
        public var description: String {
            switch self {
            case .membershipMissing(let p): "\(p) is missing but the shard's log is not empty: the replica does not know its group"
            case .hardStateLost(let why):
                "\(why): this replica's term and vote are unknown, and it could vote twice in a term. Remove the replica from the shard's group, delete its directory, and add it back (it then catches up from the others)"
            }
        }
    }

    /// Opens a replica. A new shard whose initial group (`bootstrap`) includes this node writes the group
    /// as the first entries of its log (one `addVoter` per member, term 1, committed), identically on every
    /// initial member, as etcd does; a node outside the initial group starts with an empty log and no
    /// group, cannot campaign, and learns the group from the entries a leader sends it (joining).
    public init(
        shard: ShardID, id: NodeID, store: SegmentStore, hardState: HardStateFile, membershipFile: MembershipFile,
        bootstrap: Membership?, config: RaftConfig, machine: any ShardStateMachine.Type = NoState.self, prefetch: SnapshotPrefetch? = nil
    ) throws {
        self.prefetch = prefetch
        self.machineType = machine
        self.machine = machine.init()
        self.snapshots = try SnapshotFiles(shardDirectory: store.directory, disk: store.fileSystem)
        self.tail = ShardTail(shard: shard, directory: store.directory)
        self.shard = shard
        self.id = id
        self.store = store
        self.hardState = hardState
        self.membershipFile = membershipFile
        // Raft amnesia cannot be repaired locally: a node that forgot its term could accept a stale
        // leader's entries over committed ones, or vote twice. Refuse to open (Docs/faults.md).
        if hardState.damaged {
            throw OpenError.hardStateLost("\(hardState.path) is damaged (neither slot is valid)")
        }
        if hardState.state.term < store.lastTerm {
            throw OpenError.hardStateLost("\(hardState.path) says term \(hardState.state.term) but the log has entries of term \(store.lastTerm)")
        }
        var cfg = config
        cfg.id = id
        var membership = Membership(voters: [])
        var membershipIndex: LogIndex = 0
        var loaded: (Membership, LogIndex)?
        do {
            loaded = try membershipFile.load()
        } catch {
            // The file only caches what the log's configuration entries say: rebuild it from them below.
            loaded = nil
            if store.lastIndex == 0 { throw error }
        }
        if let (m, index) = loaded {
            membership = m
            membershipIndex = index
        } else if store.lastIndex > 0, store.firstIndex == 1 {
            // A replica that joined (or whose membership file is damaged) and stopped before saving the
            // group: the log holds every configuration entry from index 1, and replaying it (applied
            // starts at 0) rebuilds the group. Until then the replica is in no group: it cannot campaign.
            membership = Membership(voters: [])
            membershipIndex = 0
        } else if store.lastIndex == 0 {
            if let bootstrap, bootstrap.voters.contains(id) {
                let members = bootstrap.voters.sorted()
                membership = Membership(voters: Set(members))
                membershipIndex = LogIndex(members.count)
                try membershipFile.save(membership, index: membershipIndex)
                // Term before entries, always: a log whose last term is above the saved term means the
                // hard state was lost (checked below).
                try hardState.save(HardState(term: 1, vote: nil, commit: membershipIndex))
                try store.append(
                    members.enumerated().map { k, n in
                        Record(index: LogIndex(k + 1), term: 1, stream: .none, seq: 0, type: .config, timestampMicros: 0, payload: ConfigChange.addVoter(n).encode())
                    })
            }
        } else {
            throw OpenError.membershipMissing(membershipFile.path)
        }
        savedMembershipIndex = membershipIndex
        raftConfig = cfg
        reader = StoreLogReader(store)
        raft = Raft(
            config: cfg, log: reader, hardState: hardState.state, membership: membership, applied: 0, membershipIndex: membershipIndex)
        let findings = store.findings
        for n in findings.notes { record("at open: \(n)") }
        let wasRecovering = store.fileSystem.exists(markerPath)
        markerPresent = wasRecovering
        // Free proofs that the log once went further: the commit index saved with the term, the index of
        // the last membership change applied, and the newest snapshot (only applied, so durable, entries
        // are ever snapshotted). They catch a log whose segments *and* fence are gone.
        let newestSnapshot = (try? snapshots.indexes().first) ?? 0
        let knownEnd = max(hardState.state.commit, membershipIndex, newestSnapshot)
        var provenLoss = false
        if knownEnd > store.lastIndex, findings.damagedFrom == nil {
            provenLoss = true
            record("at open: the log ends at index \(store.lastIndex) but this replica had index \(knownEnd) (saved commit / membership / snapshot): records were lost")
        }
        if findings.highWaterUnknown {
            // Retention dropped segments and the saved stream high-water marks are gone or damaged: this
            // log could number a stream's next record with a seq already used. Refetch the log (and the
            // marks with it) from the leader, and lead nothing meanwhile.
            record("at open: stream high-water marks unknown after retention: refetching the log from the leader")
        }
        let highWaterCut: LogIndex? = findings.highWaterUnknown ? store.firstIndex : nil
        if findings.damagedFrom != nil || findings.tailUnverified || wasRecovering || provenLoss || highWaterCut != nil {
            if wasRecovering && findings.damagedFrom == nil && !findings.tailUnverified {
                record("a repair was under way when the replica stopped: recovering again")
            }
            // A repair cut the marker names but that did not happen before a crash happens now.
            let markerFrom = wasRecovering ? markerIndex().flatMap { $0 <= store.lastIndex ? $0 : nil } : nil
            let from = [findings.damagedFrom, markerFrom, highWaterCut].compactMap { $0 }.min()
            try enterRecovery(cutFrom: from)
        }
        // Files staged for a catch-up before a restart belong to a transfer this replica no longer knows.
        try clearStaging()
        let restoredAt = try restoreFromSnapshot()
        if self.store.firstIndex > 1 && (restoredAt ?? 0) + 1 < self.store.firstIndex {
            // Retention dropped the log's start and no snapshot reaches it: the state cannot be rebuilt
            // here (Raft's applied index, raised to the log's start, says nothing of the state). Never
            // guess: set the log aside (kept for an operator, never deleted) and take the leader's files
            // and snapshot.
            let aside = "set-aside-\(Int(Date().timeIntervalSince1970))-\(getpid())"
            record("no usable snapshot reaches back to index \(self.store.firstIndex - 1), where the log starts: log moved to \(aside)/, refetching from the leader")
            raft.beginRecovery()
            try reopenStore { try SegmentStore.setAside(in: $0, into: aside, disk: $1) }
            try enterRecovery(cutFrom: self.store.firstIndex)
        }
        if self.store.lastIndex >= self.store.firstIndex,
            let last = try? self.store.read(from: self.store.lastIndex, to: self.store.lastIndex, limit: 1).last
        {
            lastStampMicros = last.timestampMicros
        }
    }

    /// The empty state, before index 1 (Raft was just recreated with applied 0).
    func resetState() {
        machine = machineType.init()
        tail.noteRejected(machine.relayRejected)
        requests = RequestWindow()
        relayMarks = RelayMarks()
        pendingKeys = [:]
        pendingRelays = [:]
        pendingKeysTerm = 0
        appliedSeqs = BucketedMap()
        appliedTerm = 0
        retainThrough = 0
    }

    /// Loads the newest usable snapshot (its entry is in this log with the same term, and the state
    /// machine reads its bytes): the state and `applied` start there and only the entries after it are
    /// replayed. Without one, the state starts empty and the whole log is replayed.
    @discardableResult
    func restoreFromSnapshot(context: String = "at open") throws -> LogIndex? {
        var problems: [String] = []
        var restored: (any ShardStateMachine)?
        var window = RequestWindow()
        var marks = RelayMarks()
        var seqs = BucketedMap<UInt64, UInt64>()
        let lastIndex = store.lastIndex
        let firstIndex = store.firstIndex
        let type = machineType
        let prefetched = prefetch?.take()
        prefetch = nil
        let snap = snapshots.newest(
            preloaded: prefetched?.snapshot,
            usable: { s in
                guard s.index <= lastIndex else { return "it is past the end of the log (\(lastIndex))" }
                // Retention dropped the entries after it: the log cannot bring it up to date.
                guard s.index + 1 >= firstIndex else { return "the log starts at \(firstIndex), after the entries that follow it" }
                if s.index >= store.firstIndex {
                    guard let t = try? store.term(at: s.index), t == s.term else {
                        return "the log's entry \(s.index) is not of term \(s.term)"
                    }
                }
                do {
                    // Decoded already while the log opened (`SnapshotPrefetch`), when it is this file.
                    let decoded =
                        try prefetched.flatMap { p in
                            p.snapshot.index == s.index && p.snapshot.term == s.term && p.snapshot.state == s.state
                                && ObjectIdentifier(p.machineType) == ObjectIdentifier(type) ? (p.machine, p.seqs) : nil
                        } ?? SnapshotPrefetch.decode(s, type)
                    restored = decoded.0
                    seqs = decoded.1
                    window = s.requests.isEmpty ? RequestWindow() : try RequestWindow(encoded: s.requests)
                    marks = s.relays.isEmpty ? RelayMarks() : try RelayMarks(encoded: s.relays)
                } catch {
                    return "the state machine cannot read it: \(error)"
                }
                return nil
            }, problems: &problems)
        for p in problems { record("\(context): \(p)") }
        guard let snap, let restored else { return nil }
        // Every write that can fail comes before any state changes: a failure leaves the replica as it was.
        var membership = raft.membership
        var membershipIndex = raft.membershipIndex
        if snap.membershipIndex > membershipIndex {
            // The configuration entries up to the snapshot are not replayed: take the group from it.
            membership = snap.membership
            membershipIndex = snap.membershipIndex
            try membershipFile.save(membership, index: membershipIndex)
            savedMembershipIndex = membershipIndex
        }
        machine = restored
        tail.noteRejected(restored.relayRejected)
        requests = window
        relayMarks = marks
        appliedSeqs = seqs
        appliedTerm = snap.term
        retainThrough = snap.retainThrough
        lastSnapshotIndex = snap.index
        tail.startAt(snap.index)
        // The snapshot's index is committed (only applied state is written): commit starts at least there.
        var hs = hardState.state
        hs.commit = max(hs.commit, snap.index)
        raft = Raft(
            config: raftConfig, log: reader, hardState: hs, membership: membership, applied: snap.index, membershipIndex: membershipIndex,
            recovering: raft.recovering)
        log("state restored from the snapshot at index \(snap.index); entries after it are replayed")
        return snap.index
    }

    /// The index the marker file says the damage started at (nil: unknown or unreadable).
    func markerIndex() -> LogIndex? {
        guard let f = try? store.fileSystem.open(markerPath, create: false), let n = try? f.size(),
            let b = try? f.read(at: 0, count: Int(min(n, 200)))
        else { return nil }
        f.close()
        let text = String(decoding: b, as: UTF8.self)
        if text.contains("cut done") { return nil }
        return text.split(separator: " ").compactMap { LogIndex($0.trimmingCharacters(in: .whitespacesAndNewlines)) }.first
    }

    func record(_ event: String) {
        log(event)
        repairEvents.append(event)
        if repairEvents.count > 50 { repairEvents.removeFirst(repairEvents.count - 50) }
    }

    /// The log lost or damaged entries from `cutFrom` (nil: it cannot tell, nothing to cut): make the
    /// recovery durable (marker file), cut the log back to its intact prefix, and restart the state
    /// machine in recovery — no votes, no campaigns — until it has caught up from a leader. The entries
    /// cut are sent again by the leader, each checked by Raft's log matching and by its block checksum.
    func enterRecovery(cutFrom: LogIndex?) throws {
        let disk = store.fileSystem
        func writeMarker(_ text: String) throws {
            let f = try disk.open(markerPath, create: true)
            try f.truncate(to: 0)
            try f.write(Array(text.utf8), at: 0)
            try f.sync()
            f.close()
            try disk.syncDirectory(store.directory)
            markerPresent = true
        }
        if !markerPresent || cutFrom != nil {
            try writeMarker("log damaged from index \(cutFrom.map(String.init) ?? "unknown")\n")
        }
        failAll(.outcomeUnknown("replica \(id) of shard \(shard) is repairing its log"))
        if let from = cutFrom {
            let before = store.lastIndex
            if from <= store.firstIndex {
                try resetLog()
                record("cut the whole log (was \(before) entries): damage at index \(from); refetching it from the leader")
            } else {
                try store.truncateSuffix(from: from)
                record("cut the log from index \(from) (was \(before)): damaged or lost there; refetching from the leader")
            }
            repairs += 1
        }
        if let from = cutFrom {
            // Cut: a restart from here on must not cut again (the leader may already have refilled it).
            try writeMarker("log damaged from index \(from); cut done\n")
        }
        // The loss is on record (marker) and the log cut: the fence may now describe the log as it is.
        try store.acceptFindings()
        reader = StoreLogReader(store)
        raft = Raft(
            config: raftConfig, log: reader, hardState: hardState.state, membership: raft.membership, applied: 0,
            membershipIndex: raft.membershipIndex, recovering: true)
        // Applied starts again from 0: so does the state (rebuilt from the log as it is replayed).
        resetState()
        record("recovering: not voting until caught up with a leader")
    }

    /// Empties the log (every segment, index, intent and the fence) and reopens it.
    func resetLog() throws {
        try reopenStore { try SegmentStore.removeLog(in: $0, disk: $1) }
    }

    /// Closes the store, lets `body` change its directory's files, and opens it again.
    func reopenStore(_ body: (_ directory: String, _ disk: any Disk) throws -> Void) throws {
        let disk = store.fileSystem
        let dir = store.directory
        let options = store.options
        store.close()
        try body(dir, disk)
        store = try SegmentStore(directory: dir, options: options, disk: disk, log: log)
    }

    /// Damage found while running (a read or the scrubber hit a bad block): repair as at open.
    func repairIfDamaged() throws {
        guard let from = store.damagedFrom else { return }
        record("damage found at index \(from) while running\(raft.role == .leader ? " (was leader: stepping down)" : "")")
        raft.beginRecovery()
        try enterRecovery(cutFrom: from)
    }

    /// Verifies the next sealed blocks (a background scrub: every sealed block is read and checked once
    /// per pass, a pass right after open and then one every `scrubPause`); damage found is repaired by the
    /// next `process`.
    public func scrub() {
        guard store.damagedFrom == nil, ContinuousClock.now >= nextScrub else { return }
        if store.scrub(maxBytes: scrubBytesPerTick) { nextScrub = ContinuousClock.now + scrubPause }
    }

    /// Recovery ends when Raft says the log has caught up: the marker goes.
    func finishRecoveryIfDone() throws {
        guard !raft.recovering else { return }
        let disk = store.fileSystem
        guard markerPresent else { return }
        try disk.remove(markerPath)
        markerPresent = false
        try disk.syncDirectory(store.directory)
        record("repaired: the log holds the committed log up to index \(raft.commit); voting again")
    }

    public var isRecovering: Bool { raft.recovering }

    public func tick() {
        raft.tick()
        ticksSinceRetention += 1
        if ticksSinceRetention >= retentionCheckTicks {
            ticksSinceRetention = 0
            retentionCheck()
        }
    }

    public func step(_ m: Message) {
        stats.messagesReceived += 1
        raft.step(m)
    }

    public var log: (String) -> Void = { _ in }

    /// Proposes records; `done` runs (on the owner's thread) once they commit or fail.
    public func propose(_ proposals: [Proposal], done: @escaping (Result<[Record], ReplicationError>) -> Void) {
        proposeApplied(proposals) { done($0.map { $0.map(\.record) }) }
    }

    /// Proposes records; `done` gets each one's record and apply outcome once all committed and applied.
    public func proposeApplied(_ proposals: [Proposal], done: @escaping (Result<[Applied], ReplicationError>) -> Void) {
        if let bad = proposals.first(where: { Self.isReplicaType($0.type) }) {
            return done(.failure(.invalid("record type \(bad.type.rawValue) is reserved for the system")))
        }
        if let refusal = admission(proposals) { return done(.failure(refusal)) }
        stats.requests += 1
        stats.recordsProposed += UInt64(proposals.count)
        do {
            guard let range = try raft.propose(withInline([stamped(proposals)]).all) else { return done(.success([])) }
            // The request's own records (its inline records follow them, and commit with them).
            awaitCommit(range.lowerBound...(range.lowerBound + LogIndex(proposals.count) - 1), term: raft.term, done)
        } catch {
            done(.failure(Self.map(error)))
        }
    }

    /// The state machine's refusal of a request, checked on the leader only (a follower's proposal is
    /// refused as not the leader's anyway, and its state may lag).
    func admission(_ proposals: [Proposal]) -> ReplicationError? {
        // A new leader's applied state may lag entries of earlier terms that committed (its no-op, once
        // applied, brings them all): until then it admits everything and apply decides.
        guard raft.role == .leader, appliedTerm == raft.term else { return nil }
        for p in proposals {
            if case .rejected(let code, let message) = machine.admit(type: p.type, stream: p.stream, payload: p.payload) {
                return .refused(code: code, message: message)
            }
        }
        return nil
    }

    /// The proposals with the leader's timestamps: its clock, never below the last timestamp in the log
    /// (a clock that steps back, or a previous leader's clock ahead of this one, cannot make time in the
    /// log run backwards). Only a leader's proposals reach the log, so only leaders stamp.
    func stamped(_ proposals: [Proposal]) -> [Proposal] {
        guard raft.role == .leader else { return proposals }
        let now = max(clockMicros(), lastStampMicros)
        lastStampMicros = now
        var out = proposals
        for k in out.indices { out[k].timestampMicros = now }
        return out
    }

    /// Proposes several requests as one Raft proposal (one append per follower for all of them, LevelDB's
    /// write group); each `done` gets its own records. If the group is refused (not leader, a reserved type
    /// in one request, ...), each request is proposed on its own so one bad request fails only itself.
    public func proposeGroup(_ group: [(proposals: [Proposal], done: (Result<[Applied], ReplicationError>) -> Void)]) {
        // A request Raft would refuse fails alone, before the group is formed.
        var requests = group
        requests.removeAll { r in
            guard let bad = r.proposals.first(where: { $0.type == .config || $0.type == .noop || ShardReplica.isReplicaType($0.type) })
            else { return false }
            r.done(.failure(.invalid("record type \(bad.type.rawValue) is reserved for the system")))
            return true
        }
        requests.removeAll { r in
            guard let refusal = admission(r.proposals) else { return false }
            r.done(.failure(refusal))
            return true
        }
        guard requests.count > 1 else {
            for r in requests { proposeApplied(r.proposals, done: r.done) }
            return
        }
        do {
            stats.requests += UInt64(requests.count)
            for r in requests { stats.recordsProposed += UInt64(r.proposals.count) }
            // One stamp for the group, then each request with its inline records.
            var stampedAll = stamped(requests.flatMap(\.proposals))[...]
            var split: [[Proposal]] = []
            split.reserveCapacity(requests.count)
            for r in requests {
                split.append(Array(stampedAll.prefix(r.proposals.count)))
                stampedAll = stampedAll.dropFirst(r.proposals.count)
            }
            let (all, inline) = withInline(split)
            guard let range = try raft.propose(all) else {
                for r in requests { r.done(.success([])) }
                return
            }
            let term = raft.term
            var next = range.lowerBound
            for (k, r) in requests.enumerated() where !r.proposals.isEmpty {
                let last = next + LogIndex(r.proposals.count) - 1
                awaitCommit(next...last, term: term, r.done)
                next = last + 1 + LogIndex(inline[k])
            }
            for r in requests where r.proposals.isEmpty { r.done(.success([])) }
        } catch {
            stats.requests -= UInt64(requests.count)
            for r in requests { stats.recordsProposed -= UInt64(r.proposals.count) }
            for r in requests { proposeApplied(r.proposals, done: r.done) }
        }
    }

    /// Registers `done` for the entries `range` proposed in `term`: success with their records and
    /// outcomes once all are applied, or the first failure.
    func awaitCommit(_ range: ClosedRange<LogIndex>, term: Term, _ done: @escaping (Result<[Applied], ReplicationError>) -> Void) {
        var results: [Applied] = []
        results.reserveCapacity(range.count)
        var failed = false
        var remaining = range.count
        for i in range {
            waiting[i] = (
                term,
                { r in
                    switch r {
                    case .success(let a): results.append(a)
                    case .failure(let e):
                        // Part of the request already committed: a retry would write that part twice.
                        let why: ReplicationError =
                            results.isEmpty ? e : .outcomeUnknown("\(results.count) of \(range.count) records committed before the rest was replaced (\(e))")
                        if !failed { done(.failure(why)) }
                        failed = true
                    }
                    remaining -= 1
                    if remaining == 0 && !failed { done(.success(results)) }
                }
            )
        }
    }

    public func raftTransfer(_ to: NodeID) { raft.transferLeadership(to: to) }
    public func campaign() { raft.campaignNow() }

    /// Proposes a membership change; `done` gets its index once committed.
    public func proposeConfig(_ change: ConfigChange, done: @escaping (Result<LogIndex, ReplicationError>) -> Void) {
        do {
            let index = try raft.proposeConfigChange(change)
            let term = raft.term
            waiting[index] = (term, { r in done(r.map(\.record.index)) })
        } catch {
            done(.failure(Self.map(error)))
        }
    }

    /// A linearizable read point: `done` gets an index; reads of state applied up to it are current.
    public func readIndex(done: @escaping (Result<LogIndex, ReplicationError>) -> Void) {
        guard reads.count < Self.readsMax else {
            return done(.failure(.unavailable("\(Self.readsMax) read-index requests are already waiting on shard \(shard) of node \(id)")))
        }
        let rid = nextReadID
        nextReadID += 1
        reads[rid] = done
        raft.readIndex(id: rid)
    }

    static func map(_ e: ProposalError) -> ReplicationError {
        switch e {
        case .notLeader(let l): .notLeader(l)
        case .transferring: .transferring
        case .configChangePending: .configChangePending
        case .notReady: .notLeader(nil)
        case .reservedType(let t): .invalid("record type \(t.rawValue) is reserved for the system")
        case .streamExhausted(let s): .invalid("stream \(s) has reached the largest seq")
        }
    }

    public var lastApplied: LogIndex { raft.applied }
    /// Applied everything this replica knows committed, knows a leader of its term (a restarted replica
    /// knows only the commit index it saved, which can be far behind, until a leader reaches it), and not
    /// repairing its log (a replica replaying from scratch, or refetching, serves an older state).
    public var isCaughtUp: Bool { raft.applied >= raft.commit && raft.leader != nil && !raft.recovering }

    /// Runs the driver loop until Raft has nothing more to do, handing messages to `send`.
    /// Throws when the store fails (the replica must then stop: its disk state is unknown).
    ///
    /// A leader's appends and heartbeats go out *before* its own fdatasync (Raft thesis §10.2.1): its
    /// term is already durable, and it counts its own entries toward commit only once they are persisted,
    /// so the followers' fsyncs overlap the leader's. Everything else waits until the Ready is durable.
    ///
    /// `deferSync`: a Ready whose entries were appended leaves them unsynced (`SegmentStore.append`'s
    /// `deferSync`) and the turn stops there (`awaitingSync`): the driver lane makes the deferred appends
    /// of all its replicas durable with one device flush (`SegmentStore.syncTogether`), then calls
    /// `finishDeferredSync(send:)` on each, which sends what had to wait for durability (a follower's
    /// answers) and hands the Ready back to Raft.
    public func process(send deliver: ([Message]) -> Void, deferSync: Bool = false) throws {
        func send(_ ms: [Message]) { emit(ms, deliver) }
        // A deferred Ready is finished first (its lane normally does that right after the turn).
        try finishDeferredSync(send: deliver)
        try repairIfDamaged()
        reader.readFailure = nil
        var readies = 0
        var stalled = false
        while raft.hasReady {
            guard readies < readiesPerProcessMax else { break }
            readies += 1
            let rd = raft.ready()
            if rd.isEmpty {
                // Raft has committed entries to hand out but could not read them (an I/O error): try again
                // next turn rather than spin here.
                stalled = true
                break
            }
            // A `snapshot` message goes out only after its files, from the shipper.
            var later = rd.messages.filter { $0.kind != .snapshot }
            for m in rd.messages where m.kind == .snapshot { beginCatchUp(m) }
            if raft.role == .leader, rd.hardState.map({ $0.term == hardState.state.term && $0.vote == hardState.state.vote }) ?? true {
                let early = later.filter { $0.kind == .append || $0.kind == .heartbeat }
                if !early.isEmpty {
                    send(early)
                    later = later.filter { $0.kind != .append && $0.kind != .heartbeat }
                }
            }
            // Term and vote must be durable before anything is sent, and before entries of that term are
            // appended (so the saved term is never below the log's last term: `OpenError.hardStateLost`);
            // the commit index need not be (a restarted replica relearns it from the leader), so a
            // commit-only change costs no fsync.
            if let hs = rd.hardState, hs.term != hardState.state.term || hs.vote != hardState.state.vote {
                try hardState.save(hs)
            }
            // Committed entries are already durable here (Raft hands out only entries up to the durable
            // index): complete their proposals now, not after this Ready's own fdatasync, so an
            // acknowledgement never waits for the next batch's sync.
            stats.recordsCommitted += UInt64(rd.committed.count)
            if !rd.committed.isEmpty {
                let outcomes = machine.apply(rd.committed[...])
                precondition(outcomes.count == rd.committed.count, "\(type(of: machine)).apply returned \(outcomes.count) outcomes for \(rd.committed.count) records")
                for (k, e) in rd.committed.enumerated() {
                    if e.stream != .none { appliedSeqs[e.stream.rawValue] = e.seq }
                    requests.apply(e, outcome: outcomes[k])
                    relayMarks.apply(e)
                    if e.type == .retain, let through = Self.retainedThrough(e.payload) { retainThrough = max(retainThrough, through) }
                    if !pendingRelays.isEmpty, let done = pendingRelays.first(where: { $0.value.end <= e.index })?.key {
                        pendingRelays[done] = nil
                    }
                    if e.type == .requestKey, !pendingKeys.isEmpty, let (key, _) = RequestWindow.parseKey(e.payload), pendingKeys[key]?.index == e.index {
                        pendingKeys[key] = nil
                    }
                    onApply(e)
                    if let (term, done) = waiting.removeValue(forKey: e.index) {
                        done(term == e.term ? .success(Applied(record: e, outcome: outcomes[k])) : .failure(.superseded))
                    }
                }
                appliedTerm = rd.committed[rd.committed.count - 1].term
                // Before the records reach the tail: a relay must never see a record without knowing
                // whether apply rejected it.
                tail.noteRejected(machine.relayRejected)
                tail.append(rd.committed)
            }
            if let first = rd.entries.first {
                if first.index <= store.lastIndex {
                    try store.truncateSuffix(from: first.index)
                    reader.didTruncate(from: first.index)
                }
                try persist(rd.entries.filter { $0.index > store.lastIndex }, deferSync: deferSync)
            }
            if store.syncPending {
                deferredReady = (rd, later)
                break
            }
            try finishReady(rd, later: later, send: send)
        }
        try afterReadies(stalled: stalled)
    }

    /// A Ready whose entries wait for the lane's shared flush, with the messages that wait with them.
    var deferredReady: (ready: Ready, later: [Message])?

    /// Whether the last `process(send:deferSync: true)` left appended entries to be synced by the lane.
    public var awaitingSync: Bool { deferredReady != nil }

    /// A driver lane's shared flush (after its round of turns, before `finishDeferredSync` on each): the
    /// deferred appends of those of `replicas` awaiting it made durable together.
    public static func syncTogether(_ replicas: [ShardReplica]) {
        SegmentStore.syncTogether(replicas.filter(\.awaitingSync).map(\.store))
    }

    /// The second half of a deferred turn, after `SegmentStore.syncTogether` (or without it: the store
    /// then syncs itself): the entries are durable, so the Ready's remaining messages go and Raft learns
    /// of the persisted entries.
    public func finishDeferredSync(send deliver: ([Message]) -> Void) throws {
        guard let (rd, later) = deferredReady else { return }
        deferredReady = nil
        if try store.finishDeferredSync() { stats.sharedSyncs += 1 }
        try finishReady(rd, later: later) { emit($0, deliver) }
        try afterReadies(stalled: false)
    }

    func emit(_ ms: [Message], _ deliver: ([Message]) -> Void) {
        stats.messagesSent += UInt64(ms.count)
        for m in ms where m.kind == .append { stats.appendsSent += 1 }
        deliver(ms)
    }

    /// The rest of a Ready once its entries are durable: messages that had to wait, reads, `advance`.
    func finishReady(_ rd: Ready, later: [Message], send: ([Message]) -> Void) throws {
        if !later.isEmpty { send(later) }
        for rs in rd.readStates { pendingReads.append((rs.id, rs.index)) }
        for id in rd.dropped { reads.removeValue(forKey: id)?(.failure(.notLeader(raft.leader))) }
        raft.advance(rd)
        if raft.membershipIndex > savedMembershipIndex {
            try membershipFile.save(raft.membership, index: raft.membershipIndex)
            savedMembershipIndex = raft.membershipIndex
        }
        // A catch-up to install: the term it belongs to is durable (saved above, before anything).
        if let request = rd.install { try install(request) }
        // A read in this round (entries to send or apply) may have hit a damaged block: repair now,
        // or Raft would ask for the same unreadable entries forever.
        try repairIfDamaged()
    }

    /// What follows a turn's Readies: snapshots, leadership changes, reads and waiters that are now due.
    func afterReadies(stalled: Bool) throws {
        hasPendingWork = raft.hasReady && !stalled && deferredReady == nil
        releaseEndedTransfers()
        try maybeSnapshot()
        if stalled, let why = reader.readFailure {
            let since = readStallSince ?? ContinuousClock.now
            readStallSince = since
            if ContinuousClock.now - since >= readStallMax {
                throw Stalled(description: "committed entries unreadable for \(ContinuousClock.now - since): \(why)")
            }
        } else if !stalled {
            readStallSince = nil
        }
        if wasLeader != (raft.role == .leader) { onLeadership(raft.role == .leader) }
        if reportedLeader != raft.leader {
            reportedLeader = raft.leader
            onLeaderKnown(raft.leader, raft.term)
        }
        if wasLeader && raft.role != .leader {
            cancelCatchUps()
            pendingKeys = [:]
            pendingRelays = [:]
            pendingKeysTerm = 0
        }
        if raft.role == .leader && pendingKeysTerm != raft.term { rebuildPendingKeys() }
        wasLeader = raft.role == .leader
        // Reads are served once the state they must see is applied.
        while let r = pendingReads.first, r.index <= raft.applied {
            pendingReads.removeFirst()
            reads.removeValue(forKey: r.id)?(.success(r.index))
        }
        fireAppliedWaiters()
        // Proposals whose index was overwritten by another term fail now rather than wait forever.
        if raft.role != .leader, !waiting.isEmpty {
            for (i, w) in waiting where i > raft.lastIndex || (raft.logTerm(at: i).map { $0 != w.0 } ?? false) {
                // Overwritten here, but another replica holding it may still get it committed.
                waiting.removeValue(forKey: i)?.1(.failure(.outcomeUnknown("entry \(i) was replaced on replica \(id) before it committed")))
            }
        }
        try finishRecoveryIfDone()
    }

    /// Appends entries to the store in batches it accepts: at most `Limits.appendBatchCountMax` records
    /// and `persistBatchBytesMax` payload bytes each (one write and, by the fsync policy, one fdatasync
    /// per batch).
    func persist(_ entries: [Record], deferSync: Bool = false) throws {
        var start = 0
        while start < entries.count {
            var end = start
            var bytes = 0
            while end < entries.count, end - start < Limits.appendBatchCountMax,
                end == start || bytes + entries[end].payload.count <= persistBatchBytesMax
            {
                bytes += entries[end].payload.count
                end += 1
            }
            let batch = Array(entries[start..<end])
            try store.append(batch, deferSync: deferSync)
            for r in batch where r.timestampMicros > lastStampMicros { lastStampMicros = r.timestampMicros }
            stats.storeAppends += 1
            stats.recordsAppended += UInt64(batch.count)
            reader.didAppend(batch)
            start = end
        }
    }

    /// `process` collecting the messages (tests).
    public func process() throws -> [Message] {
        var out: [Message] = []
        try process { out += $0 }
        return out
    }

    /// Fails everything still waiting (shutdown).
    public func failAll(_ e: ReplicationError) {
        for (_, w) in waiting { w.1(.failure(e)) }
        waiting = [:]
        for (_, r) in reads { r(.failure(e)) }
        reads = [:]
        let waiters = appliedWaiters
        appliedWaiters = []
        for w in waiters { w.done(.failure(e)) }
    }

    /// Starts a snapshot when `snapshotEveryRecords` entries were applied since the last one and none is
    /// being written: the state is copied here (O(1), copy-on-write) and serialised and written by the
    /// job, on another thread when `snapshotsInBackground`. A job's failure is recorded, never fatal (the
    /// log still holds everything; the next snapshot tries again).
    func maybeSnapshot() throws {
        if let done = snapshotJob.take() {
            if let why = done.error {
                record("snapshot at index \(done.index) not written: \(why)")
            } else {
                lastSnapshotIndex = max(lastSnapshotIndex, done.index)
            }
        }
        guard raft.applied >= lastSnapshotIndex + snapshotEveryRecords, raft.applied > 0, snapshotJob.begin() else { return }
        let job = SnapshotJob(
            files: snapshots, state: machine, index: raft.applied, term: appliedTerm, membership: raft.membership,
            membershipIndex: raft.membershipIndex, seqs: appliedSeqs, requests: requests, relays: relayMarks, retainThrough: retainThrough,
            status: snapshotJob)
        if snapshotsInBackground {
            Self.snapshotQueue.async { job.run() }
        } else {
            job.run()
            if let done = snapshotJob.take() {
                if let why = done.error { record("snapshot at index \(done.index) not written: \(why)") } else { lastSnapshotIndex = done.index }
            }
        }
    }

    public func close() {
        if wasLeader {
            wasLeader = false
            onLeadership(false)
        }
        // A closed replica knows no leader (the node stops announcing a shard it led, and forgets the hint).
        if reportedLeader != nil {
            reportedLeader = nil
            onLeaderKnown(nil, raft.term)
        }
        // A snapshot being written finishes first (bounded: a stuck disk must not hold a shutdown forever;
        // a half-written file is a `.tmp` the next open removes).
        if !snapshotJob.waitIdle(until: Date(timeIntervalSinceNow: 10)) { log("a snapshot was still being written at close") }
        failAll(.stopped)
        store.close()
        hardState.close()
    }
}
