import Raft
import ShardState
import WeftCore

/// An in-memory durable Raft log for the simulation (what a node finds after a restart). With retention,
/// entries through `base` are gone (as whole segments are from a segment store) and `droppedSeqs` keeps
/// the last seq of each stream among them (the store's `streams.hwm`).
public final class MemoryRaftLog: RaftLogReader {
    /// Entries `base + 1 ... lastIndex`.
    public var records: [Record] = []
    public var base: LogIndex = 0
    public var droppedSeqs: [StreamID: StreamSeq] = [:]
    public var hardState = HardState()
    /// Whether the whole log can be shipped as files (catch-up), as sealed segments can.
    public var shipsFiles = false
    public init() {}
    public var firstIndex: LogIndex { base + 1 }
    public var lastIndex: LogIndex { base + LogIndex(records.count) }
    public var catchUpIndex: LogIndex { shipsFiles ? lastIndex : 0 }
    /// The entry at `index` (nil: dropped or past the end).
    public func record(at index: LogIndex) -> Record? {
        index > base && index <= lastIndex ? records[Int(index - base - 1)] : nil
    }
    public func term(at index: LogIndex) -> Term? {
        if index == 0 { return 0 }
        return record(at: index)?.term
    }
    public func entries(from: LogIndex, to: LogIndex, maxBytes: Int) -> [Record]? {
        guard from > base, to <= lastIndex + 1 else { return nil }
        var out: [Record] = []
        var bytes = 0
        for i in from..<to {
            let r = records[Int(i - base - 1)]
            if !out.isEmpty && bytes + r.payload.count > maxBytes { break }
            out.append(r)
            bytes += r.payload.count
        }
        return out
    }
    public func lastSeq(of stream: StreamID) -> StreamSeq {
        records.last(where: { $0.stream == stream })?.seq ?? droppedSeqs[stream] ?? 0
    }
    /// What the driver does with `Ready.entries`: truncate from the first one's index, then append.
    public func persist(_ entries: [Record]) {
        guard let first = entries.first else { return }
        precondition(first.index > base && first.index <= lastIndex + 1, "gap: append at \(first.index) after \(lastIndex) (base \(base))")
        records.removeSubrange(Int(first.index - base - 1)...)
        records.append(contentsOf: entries)
    }
    /// Retention: drops the entries through `index` (keeping their streams' last seqs).
    public func drop(through index: LogIndex) {
        let n = Int(min(index, lastIndex) - min(index, base))
        guard n > 0 else { return }
        for r in records.prefix(n) where r.stream != .none { droppedSeqs[r.stream] = r.seq }
        records.removeFirst(n)
        base += LogIndex(n)
    }
    /// Empties the log (a replica that cannot rebuild its state from it).
    public func reset() {
        records = []
        base = 0
        droppedSeqs = [:]
    }
}

/// A seeded, deterministic cluster of Raft nodes on a simulated network (TigerBeetle's VOPR in spirit):
/// messages are delayed, reordered, dropped and duplicated; links are cut in one or both directions;
/// nodes crash (losing whatever a Ready had not yet made durable) and restart. Every step checks the
/// Raft safety properties; `finish` heals everything and checks that no acknowledged write was lost.
public final class RaftSimulation {
    public struct Failure: Error, CustomStringConvertible {
        public var seed: UInt64
        public var step: Int
        public var message: String
        public var description: String { "seed \(seed) step \(step): \(message)" }
    }

    struct Node {
        var raft: Raft?
        let log: MemoryRaftLog
        /// Entries applied, in order (index -> record).
        var applied: [Record] = []
        /// Its storage lost part of the log and it has not caught up yet (the durable marker a real
        /// replica keeps in its directory).
        var damaged = false
        /// The key-value state (with `stateMachine`), derived from `applied`.
        var machine = KeyValueMachine()
        /// Its durable snapshots, oldest first: the state's bytes at an applied index, and a digest of
        /// the bytes as written (a snapshot file's checksum; a damaged one fails it).
        var snapshots: [SimSnapshot] = []
    }

    struct SimSnapshot {
        var index: LogIndex
        var term: Term
        var bytes: [UInt8]
        var digest: UInt64
    }

    /// A catch-up the leader shipped: its log as files (from `base + 1`) and, when that does not start
    /// at index 1, a snapshot at or after `base`.
    struct Transfer {
        var base: LogIndex
        var records: [Record]
        var droppedSeqs: [StreamID: StreamSeq]
        var snapshot: SimSnapshot?
    }

    struct InFlight {
        var message: Message
        var deliverAt: Int
    }

    public let seed: UInt64
    var rng: SeededRNG
    let ids: [NodeID]
    var nodes: [NodeID: Node] = [:]
    var network: [InFlight] = []
    /// Directed links that drop everything: (from, to).
    var cut: Set<[UInt64]> = []
    public private(set) var now = 0
    var step = 0
    var nextPayload: UInt64 = 1
    /// Payload ids a leader acknowledged (its own applied entry carried them).
    public private(set) var acknowledged: Set<UInt64> = []
    /// Highest known committed entry per index (from any node's applied entries): index -> term.
    var committed: [LogIndex: Term] = [:]
    var leaders: [Term: NodeID] = [:]
    public private(set) var stats = Stats()
    var faults = true

    public struct Stats: Sendable {
        public var crashes = 0
        public var partitions = 0
        public var dropped = 0
        public var duplicated = 0
        public var elections = 0
        public var proposals = 0
        public var configChanges = 0
        public var diskFaults = 0
        public init() {}
    }

    /// Fault probabilities per scheduler step.
    public var dropRate = 0.05
    public var duplicateRate = 0.03
    public var crashRate = 0.004
    public var partitionRate = 0.01

    /// Voters at start; the other nodes begin outside the group and may be added by membership changes.
    let initialVoters: Set<NodeID>
    /// Propose single-server membership changes (add or remove a voter) now and then.
    public var membershipChanges = false
    /// Some crashes also destroy a random suffix of the node's durable log, acknowledged entries included
    /// (a truncated or deleted segment), on one node at a time.
    public var diskFaults = false
    /// Restart a damaged node in recovery (no votes until caught up). Off only to show that the faults
    /// above lose acknowledged writes without it.
    public var recoveryProtection = true
    /// Drive a key-value state machine (puts and compare-and-sets on a few keys) with snapshots taken at
    /// random applied indexes, restarts from the newest usable snapshot (some damaged by crashes: they
    /// fall back to an older one or to the log), and check that replicas at the same applied index have
    /// the same state hash.
    public var stateMachine = false
    /// A bug to show the checks work: snapshots are labelled one index too low (as a driver that took
    /// them before applying the last entry would), so a restart applies that entry twice.
    public var offByOneSnapshots = false
    /// Retention: nodes now and then drop their log up to their oldest intact snapshot, and a follower
    /// that needs dropped entries is caught up with the leader's log and a snapshot (needs
    /// `stateMachine`; not with `membershipChanges`, whose restarts replay configuration entries).
    public var retention = false {
        didSet { for id in ids { nodes[id]?.log.shipsFiles = retention } }
    }
    /// Catch-ups shipped and waiting for their message, by transfer id.
    var transfers: [UInt64: Transfer] = [:]
    /// Every committed entry (from whichever node applied it first): what a node restored from a
    /// snapshot has applied before it.
    var committedRecords: [LogIndex: Record] = [:]
    /// State hash after applying each index (from the first replica that applied it).
    var hashes: [LogIndex: UInt64] = [:]
    public private(set) var snapshotStats = (taken: 0, restored: 0, damaged: 0, skipped: 0)
    public private(set) var retentionStats = (dropped: 0, installs: 0, installsWithSnapshot: 0, resets: 0)

    public init(seed: UInt64, nodes count: Int = 3, initialVoters voters: Int? = nil) {
        self.seed = seed
        rng = SeededRNG(seed: seed)
        ids = (1...UInt64(count)).map { NodeID($0) }
        initialVoters = Set(ids.prefix(voters ?? count))
        for id in ids {
            nodes[id] = Node(raft: nil, log: MemoryRaftLog())
            start(id)
        }
    }

    func config(_ id: NodeID) -> RaftConfig {
        var c = RaftConfig(id: id, seed: seed)
        c.electionTicks = 10
        c.heartbeatTicks = 2
        c.inflightAppendsMax = 4
        c.appendBytesMax = 64
        return c
    }

    func start(_ id: NodeID) {
        guard var n = nodes[id] else { return }
        // State machine restarts empty and replays committed entries from the log...
        n.applied = []
        n.machine = KeyValueMachine()
        var applied: LogIndex = 0
        var hs = n.log.hardState
        // ...or from the newest snapshot that reads back whole and matches this log (same term at its
        // index: the same history up to it).
        if stateMachine {
            // A damaged file is set aside (the replica renames it `.damaged`): it no longer counts.
            let intact = n.snapshots.filter { FNV1a.hash($0.bytes) == $0.digest }
            snapshotStats.damaged += n.snapshots.count - intact.count
            n.snapshots = intact
            for snap in n.snapshots.reversed() {
                // Inside the log with the log's term there, or right before a log retention cut.
                let fits = snap.index == n.log.base || n.log.term(at: snap.index) == snap.term
                guard snap.index <= n.log.lastIndex, snap.index >= n.log.base, fits, let m = try? KeyValueMachine(snapshot: snap.bytes) else {
                    snapshotStats.skipped += 1
                    continue
                }
                n.machine = m
                applied = snap.index
                // What the snapshot covers is the committed prefix, applied already.
                n.applied = (0..<Int(snap.index)).map { committedRecords[LogIndex($0 + 1)]! }
                hs.commit = max(hs.commit, snap.index)
                snapshotStats.restored += 1
                break
            }
            if n.log.base > 0 && applied < n.log.base {
                // Retention dropped the log's start and no snapshot reaches it: never guess a state;
                // empty the log and recover from the leader (as the replica does).
                n.log.reset()
                n.damaged = true
                retentionStats.resets += 1
            }
        }
        n.raft = Raft(
            config: config(id), log: n.log, hardState: hs, membership: Membership(voters: initialVoters), applied: applied,
            recovering: n.damaged && recoveryProtection)
        nodes[id] = n
        if applied > 0, let h = hashes[applied], h != n.machine.stateHash {
            failure = fail("node \(id) restored a snapshot at index \(applied) whose state hash differs from what was applied there")
        }
    }

    /// A broken invariant found where nothing can throw (a restart); reported by the next step.
    var failure: Failure?

    func chance(_ p: Double) -> Bool { Double(rng.next() % 1_000_000) / 1_000_000 < p }
    func pick<T>(_ xs: [T]) -> T { xs[Int(rng.next() % UInt64(xs.count))] }

    /// Runs `steps` scheduler steps with faults, then heals and runs until every acknowledged write is
    /// applied everywhere. Throws the first broken invariant.
    public func run(steps: Int) throws {
        for _ in 0..<steps { try schedulerStep(faults: true) }
        try finish()
    }

    func schedulerStep(faults: Bool) throws {
        step += 1
        let r = rng.next() % 100
        if faults && chance(crashRate) {
            let victim = pick(ids)
            if nodes[victim]?.raft != nil {
                stats.crashes += 1
                nodes[victim]?.raft = nil
                // With retention a damaged snapshot can leave a node unable to rebuild its state (a storage
                // fault like a cut log): only one node at a time, as for disk faults.
                let othersDamaged = ids.contains { $0 != victim && nodes[$0]!.damaged }
                if stateMachine, chance(0.3), !(retention && othersDamaged), let k = nodes[victim]?.snapshots.indices.last {
                    // The newest snapshot file is damaged on disk.
                    nodes[victim]!.snapshots[k].bytes.append(0xEE)
                }
                network.removeAll { $0.message.to == victim }
                if diskFaults, chance(0.5), !ids.contains(where: { nodes[$0]!.damaged }), let log = nodes[victim]?.log, !log.records.isEmpty {
                    let keep = Int(rng.next() % UInt64(log.records.count))
                    log.records.removeSubrange(keep...)
                    nodes[victim]!.damaged = true
                    stats.diskFaults += 1
                }
                if retention, let n = nodes[victim], n.log.base > 0,
                    !n.snapshots.contains(where: { FNV1a.hash($0.bytes) == $0.digest && $0.index >= n.log.base && $0.index <= n.log.lastIndex })
                {
                    // It will find no snapshot that reaches its log's start: it recovers from the leader.
                    nodes[victim]!.damaged = true
                }
            }
        } else if faults && chance(partitionRate) {
            stats.partitions += 1
            cut = []
            switch rng.next() % 4 {
            case 0:  // isolate one node both ways
                let a = pick(ids)
                for b in ids where b != a {
                    cut.insert([a.rawValue, b.rawValue])
                    cut.insert([b.rawValue, a.rawValue])
                }
            case 1:  // one-way: a cannot reach b
                let a = pick(ids)
                let b = pick(ids.filter { $0 != a })
                cut.insert([a.rawValue, b.rawValue])
            case 2:  // leader isolated
                if let l = currentLeader() {
                    for b in ids where b != l {
                        cut.insert([l.rawValue, b.rawValue])
                        cut.insert([b.rawValue, l.rawValue])
                    }
                }
            default:  // heal
                break
            }
        }
        // Restart crashed nodes after a while.
        if r < 3, let down = ids.first(where: { nodes[$0]?.raft == nil }) {
            start(down)
        }
        if retention, chance(0.02) { dropPrefix(pick(ids)) }
        if r < 45 {
            deliverOne()
        } else if r < 80 {
            let id = pick(ids)
            if nodes[id]?.raft != nil {
                nodes[id]!.raft!.tick()
                try process(id)
            }
            now += 1
        } else if r < 95 {
            try propose()
        } else if let l = currentLeader(), r < 97 {
            nodes[l]!.raft!.readIndex(id: UInt64(step))
            try process(l)
        } else if membershipChanges, let l = currentLeader(), faults, r < 98, chance(0.3) {
            let voters = nodes[l]!.raft!.membership.voters
            let change: ConfigChange
            if let outsider = ids.first(where: { !voters.contains($0) }), voters.count <= 3 || chance(0.5) {
                change = .addVoter(outsider)
            } else if voters.count > 3 {
                change = .removeVoter(pick(voters.sorted()))
            } else {
                return try checkInvariants()
            }
            if (try? nodes[l]!.raft!.proposeConfigChange(change)) != nil { stats.configChanges += 1 }
            try process(l)
        } else if let l = currentLeader(), faults, r < 98 {
            let target = pick(ids.filter { $0 != l })
            nodes[l]!.raft!.transferLeadership(to: target)
            try process(l)
        } else {
            deliverOne()
        }
        try checkInvariants()
    }

    func currentLeader() -> NodeID? {
        ids.filter { nodes[$0]?.raft?.role == .leader }.max { (nodes[$0]!.raft!.term) < (nodes[$1]!.raft!.term) }
    }

    func propose() throws {
        guard let l = currentLeader() else { return }
        let n = 1 + Int(rng.next() % 3)
        var ps: [Proposal] = []
        for _ in 0..<n {
            var payload: [UInt8] = []
            withUnsafeBytes(of: nextPayload.littleEndian) { payload.append(contentsOf: $0) }
            nextPayload += 1
            if stateMachine {
                // A put or a compare-and-set (often on a stale version: rejected) on one of a few keys; the
                // payload id is the value's last 8 bytes.
                let key = Array("k\(rng.next() % 5)".utf8)
                payload = chance(0.3) ? KeyValueMachine.cas(key, expected: rng.next() % 40, payload) : KeyValueMachine.put(key, payload)
            }
            ps.append(Proposal(stream: StreamID(1 + rng.next() % 3), timestampMicros: Int64(now), payload: payload))
        }
        if (try? nodes[l]!.raft!.propose(ps)) != nil { stats.proposals += ps.count }
        try process(l)
    }

    func deliverOne() {
        guard !network.isEmpty else { return }
        let k = Int(rng.next() % UInt64(network.count))
        let f = network.remove(at: k)
        let m = f.message
        if cut.contains([m.from.rawValue, m.to.rawValue]) || chance(dropRate) {
            stats.dropped += 1
            return
        }
        if chance(duplicateRate) {
            stats.duplicated += 1
            network.append(f)
        }
        guard nodes[m.to]?.raft != nil else { return }
        nodes[m.to]!.raft!.step(m)
        try? process(m.to)
    }

    /// The driver loop of one node: persist, "fsync", then send; apply committed; advance.
    /// With a small probability the node crashes after a partial, unsynced write of this Ready (before
    /// anything was sent), which loses a suffix of its entries and the hard state update.
    func process(_ id: NodeID) throws {
        var rounds = 0
        while var raft = nodes[id]?.raft, raft.hasReady {
            rounds += 1
            if rounds > 10_000 { throw fail("node \(id) never runs out of work:\n\(describe())") }
            let rd = raft.ready()
            let log = nodes[id]!.log
            if faults, chance(crashRate / 4), rd.mustSync {
                let keep = Int(rng.next() % UInt64(rd.entries.count + 1))
                log.persist(Array(rd.entries.prefix(keep)))
                stats.crashes += 1
                nodes[id]!.raft = nil
                network.removeAll { $0.message.to == id }
                return
            }
            log.persist(rd.entries)
            // As the real driver: term and vote are made durable; the commit index only rides along when
            // they change (a restarted node relearns commit from the leader).
            if let hs = rd.hardState, hs.term != log.hardState.term || hs.vote != log.hardState.vote { log.hardState = hs }
            for m in rd.messages {
                if m.kind == .snapshot && !ship(from: id, m) {
                    raft.reportCatchUp(to: m.to, transfer: m.context, failed: true)
                    continue
                }
                network.append(InFlight(message: m, deliverAt: now))
            }
            for e in rd.committed {
                try apply(id, e, isLeader: raft.role == .leader)
            }
            raft.advance(rd)
            if let request = rd.install { raft = try install(id, request, raft) }
            nodes[id]!.raft = raft
            if nodes[id]!.damaged && !raft.recovering { nodes[id]!.damaged = false }
            if raft.role == .leader, leaders[raft.term] == nil { stats.elections += 1 }
        }
    }

    /// The leader's side of a catch-up: its log as files and, when retention dropped its start, its
    /// newest intact snapshot at or after that point. False when it has none (the catch-up fails).
    func ship(from id: NodeID, _ m: Message) -> Bool {
        let n = nodes[id]!
        var snapshot: SimSnapshot?
        if n.log.base > 0 {
            guard let s = n.snapshots.last(where: { FNV1a.hash($0.bytes) == $0.digest && $0.index >= n.log.base && $0.index <= n.log.lastIndex }) else {
                return false
            }
            snapshot = s
        }
        transfers[m.context] = Transfer(base: n.log.base, records: n.log.records, droppedSeqs: n.log.droppedSeqs, snapshot: snapshot)
        return true
    }

    /// The follower's side: checks the shipped files against the request (they reach its index with its
    /// term; a snapshot lies within them or right before), replaces the log, restores the state from the
    /// snapshot (or empty), and answers with a Raft rebuilt over the new log, as the replica does.
    func install(_ id: NodeID, _ request: InstallRequest, _ raft: Raft) throws -> Raft {
        var raft = raft
        let log = nodes[id]!.log
        guard let t = transfers[request.transfer], t.base + LogIndex(t.records.count) >= request.index, request.index > t.base,
            t.records[Int(request.index - t.base - 1)].term == request.logTerm,
            t.snapshot.map({ $0.index >= t.base && $0.index <= request.index }) ?? (t.base == 0)
        else {
            raft.installDone(request, ok: false)
            return raft
        }
        log.base = t.base
        log.records = Array(t.records.prefix(Int(request.index - t.base)))
        log.droppedSeqs = t.droppedSeqs
        var n = nodes[id]!
        var applied: LogIndex = 0
        if let s = t.snapshot {
            guard let m = try? KeyValueMachine(snapshot: s.bytes) else { throw fail("node \(id) got a shipped snapshot it cannot read") }
            n.snapshots = [s]
            n.machine = m
            applied = s.index
            retentionStats.installsWithSnapshot += 1
        } else {
            n.machine = KeyValueMachine()
        }
        n.applied = (0..<Int(applied)).map { committedRecords[LogIndex($0 + 1)]! }
        nodes[id] = n
        if applied > 0, let h = hashes[applied], h != n.machine.stateHash {
            throw fail("node \(id) installed a snapshot at index \(applied) whose state hash differs from what was applied there")
        }
        var hs = log.hardState
        hs.commit = max(hs.commit, applied)
        var fresh = Raft(
            config: config(id), log: log, hardState: hs, membership: Membership(voters: initialVoters), applied: applied,
            recovering: raft.recovering)
        fresh.installDone(request, ok: true)
        retentionStats.installs += 1
        return fresh
    }

    /// Retention on one node: drops its log through its oldest intact snapshot (never past what it
    /// applied, and keeping the last entry).
    func dropPrefix(_ id: NodeID) {
        guard let n = nodes[id], n.raft != nil, !n.damaged,
            let oldest = n.snapshots.first(where: { FNV1a.hash($0.bytes) == $0.digest })?.index
        else { return }
        let through = min(oldest, LogIndex(n.applied.count), n.log.lastIndex > 0 ? n.log.lastIndex - 1 : 0)
        guard through > n.log.base else { return }
        n.log.drop(through: through)
        retentionStats.dropped += 1
    }

    func apply(_ id: NodeID, _ e: Record, isLeader: Bool) throws {
        var n = nodes[id]!
        guard e.index == LogIndex(n.applied.count + 1) else {
            throw fail("node \(id) applied index \(e.index) after \(n.applied.count)")
        }
        n.applied.append(e)
        if committedRecords[e.index] == nil { committedRecords[e.index] = e }
        if stateMachine {
            _ = n.machine.apply([e][...])
            let h = n.machine.stateHash
            if let seen = hashes[e.index], seen != h {
                throw fail("replicas diverge: node \(id) has state hash \(h) at index \(e.index), another replica had \(seen)")
            }
            hashes[e.index] = h
            // A snapshot now and then, at the index just applied (two kept, as the replica keeps).
            if chance(0.02) {
                let bytes = n.machine.snapshot()
                let at = offByOneSnapshots && e.index > 1 ? e.index - 1 : e.index
                n.snapshots.append(SimSnapshot(index: at, term: n.log.term(at: at) ?? e.term, bytes: bytes, digest: FNV1a.hash(bytes)))
                if n.snapshots.count > 2 { n.snapshots.removeFirst() }
                snapshotStats.taken += 1
            }
        }
        nodes[id] = n
        if let t = committed[e.index], t != e.term {
            throw fail("state machine safety: index \(e.index) applied with term \(e.term) on node \(id), term \(t) elsewhere")
        }
        committed[e.index] = e.term
        if isLeader, e.type == .data, let v = Self.payloadID(e) {
            acknowledged.insert(v)
        }
    }

    /// One line per node: role, term, log and commit positions, and the leader's view of followers.
    public func describe() -> String {
        ids.map { id in
            guard let r = nodes[id]?.raft else { return "  \(id): down" }
            return "  \(id): \(r.role) term \(r.term) last \(r.lastIndex)/\(r.lastTerm) commit \(r.commit) applied \(nodes[id]!.applied.count) durable \(nodes[id]!.log.lastIndex) first \(nodes[id]!.log.firstIndex)\(r.recovering ? " recovering" : "") leader \(String(describing: r.leader)) \(r.debugProgress)"
        }.joined(separator: "\n")
    }

    func fail(_ message: String) -> Failure { Failure(seed: seed, step: step, message: message) }

    /// The proposal's id: its last 8 bytes (the whole payload without a state machine, a put's or a
    /// compare-and-set's value with one).
    static func payloadID(_ e: Record) -> UInt64? {
        guard e.payload.count >= 8 else { return nil }
        return e.payload.suffix(8).enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
    }

    func checkInvariants() throws {
        if let failure { throw failure }
        // Election safety: one leader per term.
        for id in ids {
            guard let r = nodes[id]?.raft, r.role == .leader else { continue }
            if let other = leaders[r.term], other != id {
                throw fail("election safety: \(other) and \(id) both lead term \(r.term)")
            }
            if leaders[r.term] == nil {
                leaders[r.term] = id
                // Leader completeness: a new leader holds every entry committed so far.
                for (i, t) in committed where i >= nodes[id]!.log.firstIndex && nodes[id]!.log.term(at: i) != t && r.lastIndex >= i {
                    throw fail("leader completeness: leader \(id) of term \(r.term) has term \(String(describing: nodes[id]!.log.term(at: i))) at committed index \(i) (term \(t))")
                }
                if let maxCommitted = committed.keys.max(), r.lastIndex < maxCommitted {
                    throw fail("leader completeness: leader \(id) of term \(r.term) ends at \(r.lastIndex), below committed \(maxCommitted)")
                }
            }
        }
        if step % 16 == 0 { try checkLogMatching() }
    }

    /// Log matching: two logs with the same term at an index are identical up to it.
    func checkLogMatching() throws {
        for (k, a) in ids.enumerated() {
            for b in ids[(k + 1)...] {
                let la = nodes[a]!.log
                let lb = nodes[b]!.log
                let lo = max(la.firstIndex, lb.firstIndex)
                let hi = min(la.lastIndex, lb.lastIndex)
                guard lo <= hi else { continue }
                var i = hi
                while i >= lo && la.term(at: i) != lb.term(at: i) { i -= 1 }
                if i >= lo, let k = (lo...i).first(where: { la.record(at: $0) != lb.record(at: $0) }) {
                    throw fail("log matching: \(a) and \(b) agree on term at index \(i) but differ at \(k)")
                }
            }
        }
    }

    /// Heals the network, restarts every node, runs without faults until a leader has committed an
    /// entry of its term and every node applied everything; then no acknowledged write may be missing.
    func finish() throws {
        var members = Set(ids)
        faults = false
        cut = []
        for id in ids where nodes[id]?.raft == nil { start(id) }
        var rounds = 0
        while true {
            rounds += 1
            if rounds > 5_000 { throw fail("no convergence after healing:\n\(describe())") }
            for id in ids {
                nodes[id]!.raft!.tick()
                try process(id)
            }
            now += 1
            var delivered = 0
            while !network.isEmpty {
                delivered += 1
                if delivered > 100_000 {
                    let tail = network.suffix(6).map { "\($0.message.kind) \($0.message.from)->\($0.message.to) t\($0.message.term) i\($0.message.index) lt\($0.message.logTerm) c\($0.message.commit) rej \($0.message.reject) hint \($0.message.hint) n\($0.message.entries.count)" }
                    throw fail("messages never settle after healing:\n\(describe())\n\(tail.joined(separator: "\n"))")
                }
                let f = network.removeFirst()
                guard nodes[f.message.to]?.raft != nil else { continue }
                nodes[f.message.to]!.raft!.step(f.message)
                try process(f.message.to)
            }
            try checkInvariants()
            if let l = currentLeader(), let lr = nodes[l]?.raft, lr.commit == lr.lastIndex, lr.lastTerm == lr.term,
                lr.membership.all.allSatisfy({ nodes[$0]!.applied.count == Int(lr.commit) })
            {
                members = lr.membership.all
                break
            }
        }
        try checkLogMatching()
        if stateMachine {
            let final = Set(ids.filter { members.contains($0) }.map { nodes[$0]!.machine.stateHash })
            if final.count != 1 { throw fail("replicas end with different states after applying the same log") }
        }
        for id in ids where members.contains(id) {
            let have = Set(nodes[id]!.applied.compactMap { e -> UInt64? in e.type == .data ? Self.payloadID(e) : nil })
            let lost = acknowledged.subtracting(have)
            if !lost.isEmpty { throw fail("acknowledged writes lost on node \(id): \(lost.sorted().prefix(5))") }
            // Exactly once and dense stream seqs.
            var seen = Set<UInt64>()
            var seqs: [StreamID: StreamSeq] = [:]
            for e in nodes[id]!.applied where e.type == .data {
                guard let v = Self.payloadID(e) else { throw fail("entry \(e.index) on node \(id) carries no payload id") }
                if !seen.insert(v).inserted { throw fail("payload \(v) applied twice on node \(id)") }
                let expected = (seqs[e.stream] ?? 0) + 1
                if e.seq != expected { throw fail("stream \(e.stream) seq \(e.seq) at index \(e.index), expected \(expected)") }
                seqs[e.stream] = e.seq
            }
        }
    }
}
