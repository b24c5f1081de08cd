import WeftCore

public enum ProposalError: Error, Equatable, Sendable {
    /// Not the leader; the known leader if any.
    case notLeader(NodeID?)
    /// A leadership transfer is in progress: retry on the new leader.
    case transferring
    /// A membership change is still pending, or the leader has not committed an entry of its term yet.
    case configChangePending
    /// The log has a suffix waiting to be truncated by the driver (call `ready`/`advance` first).
    case notReady
    /// A record type Raft itself interprets (`noop`, `config`): membership changes go through
    /// `proposeConfigChange` only, no-ops are the leader's own.
    case reservedType(RecordType)
    /// The stream's seq is at its maximum (2^64-1): it can take no more records.
    case streamExhausted(StreamID)
}

/// What a client proposes: the leader fills in index, term and (for streams) the next stream seq.
public struct Proposal: Sendable {
    public var stream: StreamID
    public var type: RecordType
    public var timestampMicros: Int64
    public var payload: [UInt8]
    public init(stream: StreamID = .none, type: RecordType = .data, timestampMicros: Int64 = 0, payload: [UInt8]) {
        self.stream = stream
        self.type = type
        self.timestampMicros = timestampMicros
        self.payload = payload
    }
}

/// The Raft consensus state machine for one group, as a value (etcd's raft): inputs are `tick`,
/// `step(message)`, proposals and reads; outputs come from `ready()`. No IO, no clock, no threads.
///
/// Election: randomized timeouts, pre-vote (a node that cannot win does not bump terms) and check-quorum
/// (a leader that has not heard from a quorum for an election timeout steps down; followers that hear
/// from a leader ignore vote requests for that long). Replication: pipelined appends (a window per
/// follower), conflict hints (the follower names the last index whose term could match), commit only of
/// current-term entries by quorum. Membership: one server at a time, taking effect when committed and
/// applied, never two pending, and not before the leader has committed an entry of its term.
public struct Raft {
    public let id: NodeID
    let cfg: RaftConfig
    /// The durable log (read-only here).
    let log: any RaftLogReader

    public private(set) var term: Term
    public private(set) var vote: NodeID?
    public private(set) var commit: LogIndex
    /// Highest index handed out in `Ready.committed` and acknowledged with `advance`.
    public private(set) var applied: LogIndex
    public private(set) var role: Role = .follower
    public private(set) var leader: NodeID?
    public private(set) var membership: Membership

    /// Entries not yet persisted. `unstableOffset` is the index of the first; when it is <= the durable
    /// log's last index, the driver must truncate the durable log there before appending.
    var unstable: [Record] = []
    var unstableOffset: LogIndex
    /// Highest index handed to the driver in a Ready (unstable entries up to it are being persisted).
    var handedOut: LogIndex = 0
    var committedHandedOut: LogIndex

    var progress: [NodeID: Progress] = [:]
    var votes: [NodeID: Bool] = [:]
    var electionElapsed = 0
    var heartbeatElapsed = 0
    var randomizedElectionTicks: Int
    var rng: UInt64
    var messages: [Message] = []
    var pendingConfigIndex: LogIndex = 0
    public private(set) var transferee: NodeID?
    var pendingReads: [(context: UInt64, id: UInt64, index: LogIndex, acks: Set<NodeID>)] = []
    var readContext: UInt64 = 0
    var readStates: [ReadState] = []
    var dropped: [UInt64] = []
    /// A catch-up the driver must install (cleared by any change of term or leader).
    var pendingInstall: InstallRequest?
    /// Numbers this leader's catch-up transfers: `term << 32 | transferSeq`, so a follower can tell a
    /// newer transfer from an older one and a newer leader's from a stale leader's.
    var transferSeq: UInt64 = 0
    var lastHardState: HardState

    /// Context value on vote requests of a campaign started by leadership transfer: bypasses leases.
    static let transferContext: UInt64 = 1
    /// Context value on an append rejection from a recovering follower: its log was cut back, so what it
    /// acknowledged before may be gone (the leader forgets its match above the hint).
    static let lostEntriesContext: UInt64 = 2
    /// Context value on an append that only carries the commit index to a follower that acknowledged
    /// every entry: it accepts it without an answer (the answer would tell the leader nothing new; a
    /// rejection is still answered). See `broadcastCommit`. Per commit that is one message fewer per
    /// follower, and a wake-up of the leader's thread fewer.
    static let commitOnlyContext: UInt64 = 3

    /// Index of the last configuration entry already reflected in `membership` (0: none): entries up to it
    /// are not applied again when the log is replayed after a restart.
    public private(set) var membershipIndex: LogIndex

    /// Set while this node's log may lack entries it once acknowledged (its storage lost or damaged part of
    /// the log, and the driver cut the log back to what is intact). Such a node must not help elect
    /// anyone, since its vote could elect a leader missing those entries; it neither votes nor campaigns
    /// until it holds the committed log up to the last index of the first leader that contacts it
    /// (`recoveryTarget`): that leader's log holds every entry committed before the damage, so from then
    /// on this node's log again holds everything it acknowledged. Protocol-aware recovery
    /// (Alagappan et al., FAST'18), reduced to the one rule Raft needs.
    public private(set) var recovering: Bool
    /// While recovering: the index the committed log must reach (0: no leader has been heard yet), and
    /// the term of the leader that set it.
    public private(set) var recoveryTarget: LogIndex = 0
    var recoveryTargetTerm: Term = 0

    public init(
        config: RaftConfig, log: any RaftLogReader, hardState: HardState, membership: Membership, applied: LogIndex,
        membershipIndex: LogIndex = 0, recovering: Bool = false
    ) {
        self.recovering = recovering
        id = config.id
        cfg = config
        self.log = log
        self.membershipIndex = membershipIndex
        term = hardState.term
        vote = hardState.vote
        commit = min(hardState.commit, log.lastIndex)
        self.applied = min(max(applied, log.firstIndex - 1), commit)
        committedHandedOut = self.applied
        self.membership = membership
        unstableOffset = log.lastIndex + 1
        lastHardState = hardState
        rng = config.seed ^ (config.id.rawValue &* 0x9E37_79B9_7F4A_7C15)
        randomizedElectionTicks = config.electionTicks
        resetRandomizedTimeout()
    }

    // MARK: Log view (durable + unstable)

    public var lastIndex: LogIndex { unstable.isEmpty ? log.lastIndex : unstableOffset + UInt64(unstable.count) - 1 }
    public var lastTerm: Term { termAt(lastIndex) ?? 0 }

    func termAt(_ i: LogIndex) -> Term? {
        if i == 0 { return 0 }
        if !unstable.isEmpty, i >= unstableOffset {
            let k = Int(i - unstableOffset)
            return k < unstable.count ? unstable[k].term : nil
        }
        guard i <= log.lastIndex, i + 1 >= log.firstIndex else { return nil }
        return log.term(at: i)
    }

    /// Entries `from ..< to` across the durable log and the unstable tail.
    func entries(from: LogIndex, to: LogIndex, maxBytes: Int) -> [Record]? {
        guard from < to else { return [] }
        guard from >= log.firstIndex else { return nil }
        var out: [Record] = []
        var bytes = 0
        let stableEnd = unstable.isEmpty ? to : min(to, unstableOffset)
        if from < stableEnd {
            guard let e = log.entries(from: from, to: stableEnd, maxBytes: maxBytes) else { return nil }
            out = e
            bytes = e.reduce(0) { $0 + $1.payload.count }
            if out.count < Int(stableEnd - from) { return out }
        }
        if !unstable.isEmpty, to > unstableOffset {
            var i = max(from, unstableOffset)
            while i < to {
                let e = unstable[Int(i - unstableOffset)]
                if !out.isEmpty && bytes + e.payload.count > maxBytes { break }
                out.append(e)
                bytes += e.payload.count
                i += 1
            }
        }
        return out
    }

    /// Term of the entry at `index` in this node's log (durable or not), nil if it has none.
    public func logTerm(at index: LogIndex) -> Term? { termAt(index) }

    func isUpToDate(lastIndex li: LogIndex, lastTerm lt: Term) -> Bool {
        lt > lastTerm || (lt == lastTerm && li >= lastIndex)
    }

    /// The largest index <= `index` whose term is <= `term` (etcd's findConflictByTerm).
    func matchHint(index: LogIndex, term t: Term) -> LogIndex {
        var i = index
        while i > 0 {
            guard let it = termAt(i) else { return i }
            if it <= t { return i }
            i -= 1
        }
        return 0
    }

    // MARK: Inputs

    var promotable: Bool { membership.voters.contains(id) && !recovering }

    /// The driver found part of this log damaged while running: stop leading (a leader cannot cut its own
    /// log) and stop voting until the log is repaired. The driver then cuts the log back to what is intact
    /// and restarts the state machine with `recovering: true`.
    public mutating func beginRecovery() {
        if role != .follower { becomeFollower(term: term, leader: nil) }
        recovering = true
        recoveryTarget = 0
        recoveryTargetTerm = 0
    }

    /// A leader told this recovering node its last index: the first leader of each term sets the target
    /// (a later leader's log may have dropped an uncommitted tail of an earlier one's, and holds every
    /// committed entry as well).
    mutating func learnRecoveryTarget(_ m: Message) {
        guard recovering, m.hint > 0, m.term > recoveryTargetTerm else { return }
        recoveryTarget = m.hint
        recoveryTargetTerm = m.term
    }

    /// Leaves recovery once the committed log reaches the target set by the first leader heard.
    mutating func checkRecovered() {
        if recovering, recoveryTarget > 0, commit >= recoveryTarget {
            recovering = false
            recoveryTarget = 0
        }
    }

    /// One unit of logical time.
    public mutating func tick() {
        if role == .leader {
            if !unstable.isEmpty { releaseHeld = true }
            heartbeatElapsed += 1
            electionElapsed += 1
            for (n, p) in progress where p.state == .snapshot {
                progress[n]?.snapshotTicks += 1
                if p.snapshotTicks + 1 >= 20 * cfg.electionTicks { progress[n]?.becomeProbe() }
            }
            if electionElapsed >= cfg.electionTicks {
                electionElapsed = 0
                if cfg.checkQuorum {
                    let active = membership.voters.filter { $0 == id || progress[$0]?.recentActive == true }.count
                    for k in progress.keys { progress[k]?.recentActive = false }
                    if active < membership.quorum {
                        becomeFollower(term: term, leader: nil)
                        return
                    }
                }
                if transferee != nil { transferee = nil }
            }
            if heartbeatElapsed >= cfg.heartbeatTicks {
                heartbeatElapsed = 0
                broadcastHeartbeat(context: 0)
            }
            return
        }
        electionElapsed += 1
        if promotable && electionElapsed >= randomizedElectionTicks {
            electionElapsed = 0
            campaign(preVote: cfg.preVote, transfer: false)
        }
    }

    /// Starts an election now (tests, and a single-node group at start).
    public mutating func campaignNow() {
        if role != .leader && promotable { campaign(preVote: cfg.preVote, transfer: false) }
    }

    /// Proposes entries; returns the indexes they got. Only the leader accepts.
    @discardableResult
    public mutating func propose(_ proposals: [Proposal]) throws(ProposalError) -> ClosedRange<LogIndex>? {
        guard role == .leader else { throw .notLeader(leader) }
        guard transferee == nil else { throw .transferring }
        guard unstable.isEmpty || unstableOffset > log.lastIndex else { throw .notReady }
        guard !proposals.isEmpty else { return nil }
        if let p = proposals.first(where: { $0.type == .config || $0.type == .noop }) { throw .reservedType(p.type) }
        let first = lastIndex + 1
        var pendingSeq: [StreamID: StreamSeq] = [:]
        var records: [Record] = []
        records.reserveCapacity(proposals.count)
        for (k, p) in proposals.enumerated() {
            var seq: StreamSeq = 0
            if p.stream != .none {
                let last = pendingSeq[p.stream] ?? lastSeq(of: p.stream)
                guard last < StreamSeq.max else { throw .streamExhausted(p.stream) }
                seq = last + 1
                pendingSeq[p.stream] = seq
            }
            records.append(
                Record(
                    index: first + UInt64(k), term: term, stream: p.stream, seq: seq, type: p.type,
                    timestampMicros: p.timestampMicros, payload: p.payload))
        }
        appendAsLeader(records)
        return first...(first + UInt64(records.count) - 1)
    }

    /// Proposes a membership change (one server at a time).
    public mutating func proposeConfigChange(_ change: ConfigChange, timestampMicros: Int64 = 0) throws(ProposalError) -> LogIndex {
        guard role == .leader else { throw .notLeader(leader) }
        guard transferee == nil else { throw .transferring }
        guard pendingConfigIndex <= applied, termAt(commit) == term else { throw .configChangePending }
        guard unstable.isEmpty || unstableOffset > log.lastIndex else { throw .notReady }
        let index = lastIndex + 1
        appendAsLeader([
            Record(index: index, term: term, stream: .none, seq: 0, type: .config, timestampMicros: timestampMicros, payload: change.encode())
        ])
        pendingConfigIndex = index
        return index
    }

    /// Asks for a linearizable read point; answered in `Ready.readStates` with the same id once a quorum
    /// confirmed this node is still the leader. Dropped (in `Ready.dropped`) when not possible.
    public mutating func readIndex(id requestID: UInt64) {
        guard role == .leader, termAt(commit) == term else {
            dropped.append(requestID)
            return
        }
        if membership.quorum <= 1 {
            readStates.append(ReadState(id: requestID, index: commit))
            return
        }
        readContext += 1
        pendingReads.append((readContext, requestID, commit, [id]))
        broadcastHeartbeat(context: readContext)
    }

    /// Hands leadership to `target` once its log is caught up.
    public mutating func transferLeadership(to target: NodeID) {
        guard role == .leader, target != id, membership.voters.contains(target), let pr = progress[target] else { return }
        transferee = target
        electionElapsed = 0
        if pr.match == lastIndex {
            send(Message(kind: .timeoutNow, from: id, to: target, term: term))
        } else {
            sendAppend(to: target)
        }
    }

    /// Processes a message from a peer.
    public mutating func step(_ m: Message) {
        guard m.to == id, m.from != id else { return }
        if m.term > term {
            if m.kind == .preVote || m.kind == .vote {
                let force = m.context == Raft.transferContext
                let inLease = cfg.checkQuorum && leader != nil && electionElapsed < cfg.electionTicks
                if inLease && !force { return }
            }
            if m.kind == .preVote || (m.kind == .preVoteResponse && !m.reject) {
                // Pre-votes never change terms.
            } else if m.kind == .append || m.kind == .heartbeat || m.kind == .snapshot {
                becomeFollower(term: m.term, leader: m.from)
            } else {
                becomeFollower(term: m.term, leader: nil)
            }
        } else if m.term < term {
            if (cfg.checkQuorum || cfg.preVote) && (m.kind == .append || m.kind == .heartbeat) {
                // A stale leader (e.g. just back from a partition): tell it the term so it steps down.
                send(Message(kind: .appendResponse, from: id, to: m.from, term: term))
            } else if m.kind == .preVote {
                var r = Message(kind: .preVoteResponse, from: id, to: m.from, term: term)
                r.reject = true
                send(r)
            }
            return
        }

        switch m.kind {
        case .preVote, .vote:
            let canVote = vote == m.from || (vote == nil && leader == nil) || (m.kind == .preVote && m.term > term)
            let responseKind: MessageKind = m.kind == .vote ? .voteResponse : .preVoteResponse
            if canVote && !recovering && isUpToDate(lastIndex: m.index, lastTerm: m.logTerm) {
                send(Message(kind: responseKind, from: id, to: m.from, term: m.term))
                if m.kind == .vote {
                    electionElapsed = 0
                    vote = m.from
                }
            } else {
                var r = Message(kind: responseKind, from: id, to: m.from, term: term)
                r.reject = true
                send(r)
            }
        default:
            switch role {
            case .leader: stepLeader(m)
            case .candidate, .preCandidate: stepCandidate(m)
            case .follower: stepFollower(m)
            }
        }
    }

    // MARK: Roles

    mutating func resetRandomizedTimeout() {
        rng &+= 0x9E37_79B9_7F4A_7C15
        var z = rng
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        z ^= z >> 31
        randomizedElectionTicks = cfg.electionTicks + Int(z % UInt64(max(cfg.electionTicks, 1)))
    }

    mutating func reset(term t: Term) {
        if term != t {
            term = t
            vote = nil
        }
        leader = nil
        electionElapsed = 0
        heartbeatElapsed = 0
        resetRandomizedTimeout()
        votes = [:]
        transferee = nil
        pendingReads = []
        progress = [:]
        pendingInstall = nil
    }

    mutating func becomeFollower(term t: Term, leader l: NodeID?) {
        for r in pendingReads { dropped.append(r.id) }
        reset(term: t)
        role = .follower
        leader = l
    }

    mutating func campaign(preVote: Bool, transfer: Bool) {
        let voteTerm: Term
        let kind: MessageKind
        if preVote {
            // Pre-candidate: asks whether it could win at term+1 without changing anything yet.
            for r in pendingReads { dropped.append(r.id) }
            role = .preCandidate
            leader = nil
            votes = [:]
            electionElapsed = 0
            resetRandomizedTimeout()
            voteTerm = term + 1
            kind = .preVote
        } else {
            becomeFollower(term: term + 1, leader: nil)
            role = .candidate
            vote = id
            voteTerm = term
            kind = .vote
        }
        votes[id] = true
        if tally().granted >= membership.quorum {
            if preVote { campaign(preVote: false, transfer: transfer) } else { becomeLeader() }
            return
        }
        for v in membership.voters.sorted() where v != id {
            var m = Message(kind: kind, from: id, to: v, term: voteTerm)
            m.index = lastIndex
            m.logTerm = lastTerm
            if transfer { m.context = Raft.transferContext }
            send(m)
        }
    }

    func tally() -> (granted: Int, rejected: Int) {
        var g = 0
        var r = 0
        for v in membership.voters {
            if let x = votes[v] { if x { g += 1 } else { r += 1 } }
        }
        return (g, r)
    }

    mutating func becomeLeader() {
        reset(term: term)
        role = .leader
        leader = id
        vote = id
        for n in membership.all {
            var p = Progress(next: lastIndex + 1)
            if n == id {
                p.match = durableIndex
                p.state = .replicate
            }
            p.recentActive = true
            progress[n] = p
        }
        // Any configuration entry not yet applied may still be pending.
        pendingConfigIndex = lastIndex
        // The no-op of the new term: entries of older terms commit only once it does.
        appendAsLeader([Record(index: lastIndex + 1, term: term, stream: .none, seq: 0, type: .noop, timestampMicros: 0, payload: [])])
    }

    mutating func appendAsLeader(_ records: [Record]) {
        if unstable.isEmpty { unstableOffset = records[0].index }
        unstable.append(contentsOf: records)
        broadcastAppend()
    }

    // MARK: Leader

    mutating func stepLeader(_ m: Message) {
        guard var pr = progress[m.from] else { return }
        pr.recentActive = true
        switch m.kind {
        case .appendResponse:
            if m.reject {
                let hint = m.logTerm > 0 ? matchHint(index: m.hint, term: m.logTerm) : m.hint
                if m.context == Raft.lostEntriesContext, hint < pr.match {
                    pr.lostEntries(matchHint: hint)
                    progress[m.from] = pr
                    if hint == 0, log.catchUpIndex > 0 {
                        sendSnapshot(to: m.from, index: log.catchUpIndex)
                    } else {
                        sendAppend(to: m.from)
                    }
                    return
                }
                if hint == 0, pr.match == 0, log.catchUpIndex > 0 {
                    // The follower shares nothing with this log (new, or emptied): ship the sealed prefix
                    // as files rather than entry by entry.
                    progress[m.from] = pr
                    sendSnapshot(to: m.from, index: log.catchUpIndex)
                    return
                }
                if pr.maybeDecrease(rejected: m.index, matchHint: hint) {
                    if pr.state == .replicate { pr.becomeProbe() }
                    progress[m.from] = pr
                    sendAppend(to: m.from)
                } else {
                    progress[m.from] = pr
                }
                return
            }
            let wasPaused = pr.isPaused(window: cfg.inflightAppendsMax)
            if pr.maybeUpdate(m.index) {
                switch pr.state {
                case .probe: pr.becomeReplicate()
                case .snapshot: pr.becomeProbe()
                case .replicate: pr.freeInflight(upTo: m.index)
                }
                progress[m.from] = pr
                if maybeCommit() {
                    broadcastCommit()
                } else if wasPaused {
                    sendAppend(to: m.from)
                }
                while sendAppend(to: m.from, onlyWithEntries: true) {}
                // A follower whose answer came after the commit it helped (or not) learns it now.
                if let p = progress[m.from], p.state == .replicate, p.match == lastIndex, p.commitSent < commit { sendAppend(to: m.from) }
                if m.from == transferee, progress[m.from]?.match == lastIndex {
                    send(Message(kind: .timeoutNow, from: id, to: m.from, term: term))
                }
            } else {
                progress[m.from] = pr
            }
        case .heartbeatResponse:
            if m.reject, m.index < pr.match { pr.lostEntries(matchHint: m.index) }
            if pr.state == .replicate, m.index < m.hint, m.hint > pr.match, !pr.inflight.isEmpty {
                // Appends sent before the heartbeat never arrived (a dropped connection): send again
                // from what the follower acknowledged, rather than wait for the window to drain.
                pr.becomeProbe()
            }
            pr.probeSent = false
            // The follower holds everything sent before this heartbeat: those appends are done even if
            // their answers were lost (a tail append whose answer never comes would hold the tail).
            if pr.state == .replicate, m.hint > 0, m.index >= m.hint { pr.freeInflight(upTo: m.hint) }
            // A full window may be waiting on lost appends: free one slot so the next append goes out;
            // if entries were lost the follower rejects it and the leader falls back to probing.
            if pr.state == .replicate, pr.inflight.count >= cfg.inflightAppendsMax { pr.inflight.removeFirst() }
            progress[m.from] = pr
            if m.reject, m.index == 0, pr.match == 0, pr.state != .snapshot, log.catchUpIndex > 0 {
                // A recovering follower whose log is empty shares nothing with this one: ship the sealed
                // prefix as files (as for an append rejection) rather than every entry from index 1.
                sendSnapshot(to: m.from, index: log.catchUpIndex)
            } else if pr.match < lastIndex {
                sendAppend(to: m.from)
            }
            if m.context != 0 { acknowledgeRead(context: m.context, from: m.from) }
        case .snapshotResponse:
            // Accepted: the follower holds this log's prefix up to `m.index` (installed from the files, or
            // proven by log matching); match rises only to an index whose term agrees with this log.
            // Rejected (the files did not all arrive, or did not fit): probe again, which may lead to
            // another catch-up.
            var raised = false
            if !m.reject, m.index <= lastIndex, m.index > 0, termAt(m.index) == m.logTerm { raised = pr.maybeUpdate(m.index) }
            if raised {
                // A match raised by a catch-up counts toward the commit index like an append's answer
                // (otherwise an idle shard whose quorum was reached this way would not commit).
                progress[m.from] = pr
                if maybeCommit() { broadcastAppend() }
                guard let again = progress[m.from] else { return }
                pr = again
            }
            // Only the answer to the transfer under way ends it; a late answer to an abandoned one must
            // not disturb the follower's state.
            guard pr.state == .snapshot, m.context == pr.transfer else {
                progress[m.from] = pr
                return
            }
            pr.becomeProbe()
            progress[m.from] = pr
            sendAppend(to: m.from)
        default:
            progress[m.from] = pr
        }
    }

    mutating func acknowledgeRead(context: UInt64, from: NodeID) {
        guard let k = pendingReads.firstIndex(where: { $0.context == context }) else { return }
        pendingReads[k].acks.insert(from)
        guard pendingReads[k].acks.filter({ membership.voters.contains($0) }).count >= membership.quorum else { return }
        // A quorum still follows this leader as of `context`: that read and every earlier one are safe.
        for r in pendingReads[...k] { readStates.append(ReadState(id: r.id, index: r.index)) }
        pendingReads.removeFirst(k + 1)
    }

    /// Raises commit to the highest index a quorum of voters holds, if its term is the current one.
    mutating func maybeCommit() -> Bool {
        var matches: [LogIndex] = membership.voters.map { progress[$0]?.match ?? 0 }
        guard !matches.isEmpty else { return false }
        matches.sort(by: >)
        let candidate = matches[membership.quorum - 1]
        if candidate > commit, termAt(candidate) == term {
            commit = candidate
            return true
        }
        return false
    }

    /// Sends an append (or a probe) to `to` if its window allows; true if it sent entries.
    @discardableResult
    mutating func sendAppend(to: NodeID, onlyWithEntries: Bool = false) -> Bool {
        guard var pr = progress[to], to != id, !pr.isPaused(window: cfg.inflightAppendsMax) else { return false }
        let prev = pr.next - 1
        guard let prevTerm = termAt(prev), let ents = entries(from: pr.next, to: lastIndex + 1, maxBytes: cfg.appendBytesMax) else {
            // The follower needs entries this log no longer has (retention dropped them): catch-up from
            // files. Entries this log has but could not read (an I/O error) are not a reason to ship the
            // whole log: the next heartbeat response tries again.
            if pr.next < log.firstIndex || (prev >= 1 && prev < log.firstIndex) {
                sendSnapshot(to: to, index: max(log.firstIndex - 1, log.catchUpIndex))
            }
            return false
        }
        if ents.isEmpty && onlyWithEntries { return false }
        if pr.state == .replicate, pr.inflight.count >= cfg.tailAppendsInflightMax, !ents.isEmpty, !isFull(ents) {
            // The tail waits for the append in flight (see `tailAppendsInflightMax`); it carries the
            // commit index with it one round trip later. An append without entries (a follower that has
            // everything sent: only the commit index is news) goes now: followers learn commits
            // promptly (they apply, serve reads and, through the membership entries, learn whether they
            // vote), and it costs them no fdatasync.
            return false
        }
        var m = Message(kind: .append, from: id, to: to, term: term)
        m.index = prev
        m.logTerm = prevTerm
        m.entries = ents
        m.commit = commit
        m.hint = lastIndex
        pr.commitSent = max(pr.commitSent, commit)
        if ents.isEmpty, pr.state == .replicate, pr.match == lastIndex { m.context = Raft.commitOnlyContext }
        if let last = ents.last {
            switch pr.state {
            case .replicate:
                pr.next = last.index + 1
                pr.inflight.append(last.index)
            case .probe:
                pr.probeSent = true
            case .snapshot:
                break
            }
        } else if pr.state == .probe {
            pr.probeSent = true
        }
        progress[to] = pr
        send(m)
        return !ents.isEmpty
    }

    /// Whether an append of `ents` is as large as one may be (a follower catching up, not the tail).
    func isFull(_ ents: [Record]) -> Bool {
        if ents.count >= cfg.appendEntriesMax { return true }
        var bytes = 0
        for e in ents { bytes += e.payload.count }
        return bytes * 2 >= cfg.appendBytesMax
    }

    /// On the leader: the catch-up transfers under way (followers in snapshot state).
    public var catchUpTransfers: Set<UInt64> {
        guard role == .leader else { return [] }
        return Set(progress.values.filter { $0.state == .snapshot }.map(\.transfer))
    }

    /// Asks the driver to ship this log's prefix up to `index` to `to` as files; the `snapshot` message
    /// itself goes last, after the files, and the follower answers it once they are in place.

    mutating func sendSnapshot(to: NodeID, index: LogIndex) {
        guard var pr = progress[to] else { return }
        var m = Message(kind: .snapshot, from: id, to: to, term: term)
        m.index = index
        m.logTerm = log.term(at: index) ?? 0
        m.commit = commit
        transferSeq += 1
        m.context = term << 32 | (transferSeq & 0xFFFF_FFFF)
        pr.state = .snapshot
        pr.snapshotTicks = 0
        pr.transfer = m.context
        progress[to] = pr
        send(m)
    }

    /// After the commit index rose: to each follower what it lacks, or the commit index alone. A follower
    /// that was sent every entry and has not answered for all of them is skipped: its answer is on the
    /// way, and the commit index goes to it then (`stepLeader`), without an answer of its own. So a
    /// commit costs per follower one append and one answer, not two of each. An answer that is lost is
    /// found by the heartbeats (whose answer leads to an append), and heartbeats carry the commit index.
    mutating func broadcastCommit() {
        for n in membership.all.sorted() where n != id {
            if let pr = progress[n], pr.state == .replicate, pr.next == lastIndex + 1, pr.match < lastIndex { continue }
            sendAppend(to: n)
        }
    }

    mutating func broadcastAppend() {
        for n in membership.all.sorted() where n != id { sendAppend(to: n) }
    }

    mutating func broadcastHeartbeat(context: UInt64) {
        for n in membership.all.sorted() where n != id {
            var m = Message(kind: .heartbeat, from: id, to: n, term: term)
            m.commit = min(progress[n]?.match ?? 0, commit)
            m.hint = lastIndex
            // What the appends sent so far reach: the answer says whether they all arrived.
            m.index = (progress[n]?.next ?? 1) - 1
            m.context = context
            send(m)
        }
    }

    // MARK: Candidate and follower

    mutating func stepCandidate(_ m: Message) {
        switch m.kind {
        case .append:
            becomeFollower(term: m.term, leader: m.from)
            handleAppend(m)
        case .heartbeat:
            becomeFollower(term: m.term, leader: m.from)
            handleHeartbeat(m)
        case .preVoteResponse where role == .preCandidate, .voteResponse where role == .candidate:
            votes[m.from] = !m.reject
            let t = tally()
            if t.granted >= membership.quorum {
                if role == .preCandidate { campaign(preVote: false, transfer: false) } else { becomeLeader() }
            } else if t.rejected >= membership.quorum {
                becomeFollower(term: term, leader: nil)
            }
        case .timeoutNow:
            break
        default:
            break
        }
    }

    mutating func stepFollower(_ m: Message) {
        switch m.kind {
        case .append:
            electionElapsed = 0
            leader = m.from
            learnRecoveryTarget(m)
            handleAppend(m)
            checkRecovered()
        case .heartbeat:
            electionElapsed = 0
            leader = m.from
            learnRecoveryTarget(m)
            handleHeartbeat(m)
            checkRecovered()
        case .timeoutNow:
            if promotable { campaign(preVote: false, transfer: true) }
        case .snapshot:
            electionElapsed = 0
            leader = m.from
            if m.index <= lastIndex, termAt(m.index) == m.logTerm {
                // Nothing to install: log matching proves this log holds the leader's prefix up to `m.index`.
                respondToCatchUp(to: m.from, transfer: m.context, index: m.index, logTerm: m.logTerm, ok: true)
            } else if m.index <= commit {
                // Committed here, so the same in the leader's log (whose term there the message did not
                // carry): this log holds the prefix up to the commit index.
                respondToCatchUp(to: m.from, transfer: m.context, index: commit, logTerm: termAt(commit) ?? 0, ok: true)
            } else {
                // Behind, or longer and different there: the entries that differ are above the commit
                // index (committed entries are in every leader's log), so the leader's files replace them
                // (the leader cannot send them one by one if retention dropped its log's start).
                pendingInstall = InstallRequest(from: m.from, term: term, index: m.index, logTerm: m.logTerm, transfer: m.context)
            }
        default:
            break
        }
    }

    mutating func respondToCatchUp(to: NodeID, transfer: UInt64, index: LogIndex, logTerm: Term, ok: Bool) {
        var r = Message(kind: .snapshotResponse, from: id, to: to, term: term)
        r.index = index
        r.logTerm = logTerm
        r.reject = !ok
        r.context = transfer
        send(r)
    }

    /// The driver installed (`ok`) the catch-up `request` asked for, or could not (the files were
    /// incomplete, damaged or did not end at the right entry). Call it on the state machine the driver
    /// uses after the install; answers the leader if this node still follows it in that term.
    public mutating func installDone(_ request: InstallRequest, ok: Bool) {
        guard role == .follower, term == request.term else { return }
        leader = request.from
        electionElapsed = 0
        if ok {
            respondToCatchUp(to: request.from, transfer: request.transfer, index: request.index, logTerm: request.logTerm, ok: true)
        } else {
            respondToCatchUp(to: request.from, transfer: request.transfer, index: lastIndex, logTerm: 0, ok: false)
        }
    }

    /// The driver's shipping of files to `to` made progress (the follower acknowledged a chunk): the
    /// catch-up is alive, so its timeout starts again. `failed`: the shipping stopped; probe again.
    public mutating func reportCatchUp(to: NodeID, transfer: UInt64, failed: Bool) {
        guard role == .leader, var pr = progress[to], pr.state == .snapshot, pr.transfer == transfer else { return }
        if failed {
            pr.becomeProbe()
        } else {
            pr.snapshotTicks = 0
        }
        progress[to] = pr
    }

    mutating func handleHeartbeat(_ m: Message) {
        if m.commit > commit { commit = min(m.commit, lastIndex) }
        var r = Message(kind: .heartbeatResponse, from: id, to: m.from, term: term)
        r.context = m.context
        // Where this log ends, and (echoed) how far the leader's appends before this heartbeat reached:
        // appends are delivered in order, so a log that ends short of that lost some of them.
        r.index = lastIndex
        r.hint = m.index
        if recovering {
            // The leader may believe this log holds entries it lost: say where it really ends.
            r.reject = true
            r.index = lastIndex
        }
        send(r)
    }

    mutating func handleAppend(_ m: Message) {
        var r = Message(kind: .appendResponse, from: id, to: m.from, term: term)
        if m.index < commit {
            r.index = commit
            send(r)
            return
        }
        // Committed entries are the same in every leader's log: the entry right before this log's first
        // (retention dropped it after applying it) matches whatever its term, if it is committed here.
        let dropped = m.index > 0 && m.index == log.firstIndex - 1 && m.index <= commit
        if dropped || termAt(m.index) == m.logTerm {
            let lastNew = m.index + UInt64(m.entries.count)
            if let conflict = m.entries.firstIndex(where: { termAt($0.index) != $0.term }) {
                precondition(m.entries[conflict].index > commit, "conflict at \(m.entries[conflict].index) at or below commit \(commit)")
                appendAsFollower(Array(m.entries[conflict...]))
            }
            let newCommit = min(m.commit, lastNew)
            if newCommit > commit { commit = newCommit }
            if m.entries.isEmpty, m.context == Raft.commitOnlyContext { return }
            r.index = lastNew
            send(r)
        } else {
            let hintIndex = matchHint(index: min(m.index, lastIndex), term: m.logTerm)
            r.reject = true
            r.index = m.index
            r.hint = hintIndex
            r.logTerm = termAt(hintIndex) ?? 0
            if recovering { r.context = Raft.lostEntriesContext }
            send(r)
        }
    }

    mutating func appendAsFollower(_ ents: [Record]) {
        let first = ents[0].index
        if first == lastIndex + 1 {
            if unstable.isEmpty { unstableOffset = first }
            unstable.append(contentsOf: ents)
        } else if !unstable.isEmpty, first > unstableOffset {
            unstable.removeSubrange(Int(first - unstableOffset)...)
            unstable.append(contentsOf: ents)
        } else {
            // Replaces durable entries from `first` on: the driver truncates its log there.
            unstableOffset = first
            unstable = ents
            handedOut = min(handedOut, first - 1)
        }
    }

    mutating func send(_ m: Message) { messages.append(m) }

    /// Last seq of a stream in this log, including entries not yet persisted.
    public func lastSeq(of s: StreamID) -> StreamSeq {
        if let e = unstable.last(where: { $0.stream == s }) { return e.seq }
        return log.lastSeq(of: s)
    }

    // MARK: Ready / advance

    /// A tick passed while the leader held entries back (`leaderPersistsWithAppends`): hand them out.
    var releaseHeld = false

    /// Whether the leader holds its unstable entries back from this Ready (`leaderPersistsWithAppends`):
    /// no append in this Ready carries entries, and a follower has an append in flight whose ack will
    /// send (and so persist) them.
    var holdsUnstable: Bool {
        guard cfg.leaderPersistsWithAppends, role == .leader, !unstable.isEmpty, !releaseHeld else { return false }
        if messages.contains(where: { $0.kind == .append && !$0.entries.isEmpty }) { return false }
        return progress.contains { n, p in n != id && membership.voters.contains(n) && p.state == .replicate && !p.inflight.isEmpty }
    }

    public var hasReady: Bool {
        !messages.isEmpty || (!unstable.isEmpty && !holdsUnstable) || !readStates.isEmpty || !dropped.isEmpty || pendingInstall != nil
            || HardState(term: term, vote: vote, commit: commit) != lastHardState || committableIndex > committedHandedOut
    }

    /// The last index persisted here (and not about to be truncated).
    var durableIndex: LogIndex { unstable.isEmpty ? log.lastIndex : min(log.lastIndex, unstableOffset - 1) }

    /// Committed entries may be applied once they are durable here.
    var committableIndex: LogIndex { min(commit, durableIndex) }

    /// Collects what the driver must do. Messages, read states and dropped proposals are handed over
    /// (not repeated); entries and hard state stay until `advance`.
    public mutating func ready() -> Ready {
        if let p = pendingInstall, lastIndex >= p.index, termAt(p.index) == p.logTerm {
            // Appends stepped after the snapshot message (same leader, same term) already brought the
            // log to the catch-up's index: installing files that end there would cut entries this node
            // is about to acknowledge. Answer by log matching instead.
            pendingInstall = nil
            respondToCatchUp(to: p.from, transfer: p.transfer, index: p.index, logTerm: p.logTerm, ok: true)
        }
        var rd = Ready()
        let hs = HardState(term: term, vote: vote, commit: commit)
        if hs != lastHardState { rd.hardState = hs }
        if holdsUnstable {
            rd.entries = []
        } else {
            rd.entries = unstable
            releaseHeld = false
        }
        let upTo = committableIndex
        if upTo > committedHandedOut, let c = entries(from: committedHandedOut + 1, to: upTo + 1, maxBytes: cfg.committedBytesMax) {
            rd.committed = c
        }
        rd.messages = messages
        messages = []
        rd.readStates = readStates
        readStates = []
        rd.dropped = dropped
        dropped = []
        rd.install = pendingInstall
        pendingInstall = nil
        committedHandedOut = rd.committed.last?.index ?? committedHandedOut
        return rd
    }

    /// The driver persisted `rd.entries` and `rd.hardState` and applied `rd.committed`.
    public mutating func advance(_ rd: Ready) {
        if let hs = rd.hardState { lastHardState = hs }
        if let last = rd.entries.last, !unstable.isEmpty, last.index >= unstableOffset {
            let k = Int(last.index - unstableOffset)
            if k < unstable.count, unstable[k].term == last.term {
                unstable.removeFirst(k + 1)
                unstableOffset = last.index + 1
            }
        }
        if role == .leader, var me = progress[id] {
            if me.maybeUpdate(durableIndex) {
                progress[id] = me
                if maybeCommit() { broadcastCommit() }
            }
        }
        for e in rd.committed {
            applied = max(applied, e.index)
            if e.type == .config, e.index > membershipIndex, let change = ConfigChange.decode(e.payload) {
                membershipIndex = e.index
                applyConfig(change)
            }
        }
    }

    /// The leader's view of each member's match index (empty unless leader).
    public var matchIndexes: [NodeID: LogIndex] { progress.mapValues(\.match) }

    /// The leader's follower table, for debugging output.
    public var debugProgress: String {
        progress.keys.sorted().map { n in
            let p = progress[n]!
            return "[\(n) match \(p.match) next \(p.next) \(p.state) probeSent \(p.probeSent) inflight \(p.inflight.count)]"
        }.joined(separator: " ")
    }

    mutating func applyConfig(_ change: ConfigChange) {
        membership = change.applied(to: membership)
        guard role == .leader else { return }
        for n in membership.all where progress[n] == nil {
            var p = Progress(next: lastIndex + 1)
            p.recentActive = true
            progress[n] = p
            sendAppend(to: n)
        }
        for n in progress.keys where !membership.all.contains(n) { progress[n] = nil }
        if !membership.voters.contains(id) {
            becomeFollower(term: term, leader: nil)
            return
        }
        if maybeCommit() { broadcastAppend() }
    }
}
