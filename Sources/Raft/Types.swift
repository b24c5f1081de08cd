import WeftCore

/// What a Raft node persists besides its log: the term, its vote in that term, and the commit index.
/// Term and vote must be durable before any message that depends on them is sent (`Ready.mustSync`).
public struct HardState: Equatable, Sendable {
    public var term: Term
    public var vote: NodeID?
    public var commit: LogIndex
    public init(term: Term = 0, vote: NodeID? = nil, commit: LogIndex = 0) {
        self.term = term
        self.vote = vote
        self.commit = commit
    }
}

/// The voting members of a group (single-server changes only: configurations differ by one voter).
public struct Membership: Equatable, Sendable {
    public var voters: Set<NodeID>
    public var learners: Set<NodeID>
    public init(voters: Set<NodeID>, learners: Set<NodeID> = []) {
        self.voters = voters
        self.learners = learners
    }
    public var quorum: Int { voters.count / 2 + 1 }
    public var all: Set<NodeID> { voters.union(learners) }
}

/// A membership change, carried in a log entry of type `.config` (payload: `encode()`).
public enum ConfigChange: Equatable, Sendable {
    case addVoter(NodeID)
    case removeVoter(NodeID)
    case addLearner(NodeID)

    public func encode() -> [UInt8] {
        let (kind, id): (UInt8, NodeID) =
            switch self {
            case .addVoter(let n): (1, n)
            case .removeVoter(let n): (2, n)
            case .addLearner(let n): (3, n)
            }
        var b: [UInt8] = [kind]
        withUnsafeBytes(of: id.rawValue.littleEndian) { b.append(contentsOf: $0) }
        return b
    }

    public static func decode(_ b: [UInt8]) -> ConfigChange? {
        guard b.count == 9 else { return nil }
        var v: UInt64 = 0
        for i in 0..<8 { v |= UInt64(b[1 + i]) << (8 * UInt64(i)) }
        switch b[0] {
        case 1: return .addVoter(NodeID(v))
        case 2: return .removeVoter(NodeID(v))
        case 3: return .addLearner(NodeID(v))
        default: return nil
        }
    }

    public func applied(to m: Membership) -> Membership {
        var m = m
        switch self {
        case .addVoter(let n):
            m.learners.remove(n)
            m.voters.insert(n)
        case .removeVoter(let n):
            m.voters.remove(n)
            m.learners.remove(n)
        case .addLearner(let n):
            if !m.voters.contains(n) { m.learners.insert(n) }
        }
        return m
    }
}

public enum MessageKind: UInt8, Sendable {
    case preVote = 1
    case preVoteResponse
    case vote
    case voteResponse
    case append
    case appendResponse
    case heartbeat
    case heartbeatResponse
    /// Tells a caught-up follower to campaign at once (leadership transfer).
    case timeoutNow
    /// Tells a follower its log is behind the leader's first index: it must fetch a snapshot.
    case snapshot
    case snapshotResponse
}

/// A Raft message between members of one group. Fields unused by a kind are zero.
public struct Message: Equatable, Sendable {
    public var kind: MessageKind
    public var from: NodeID
    public var to: NodeID
    public var term: Term
    /// append: term of the entry before `entries`; vote: candidate's last term;
    /// appendResponse (reject): term of the follower's entry at `hint`.
    public var logTerm: Term = 0
    /// append: index of the entry before `entries`; vote: candidate's last index;
    /// appendResponse: the follower's last matching index (accept) or the rejected index (reject).
    public var index: LogIndex = 0
    public var entries: [Record] = []
    public var commit: LogIndex = 0
    public var reject = false
    /// appendResponse (reject): where the leader should look next; append and heartbeat: the leader's
    /// last index (a recovering follower learns from it how far it must catch up).
    public var hint: LogIndex = 0
    /// heartbeat / heartbeatResponse: the ReadIndex round it confirms (0: none).
    public var context: UInt64 = 0

    public init(kind: MessageKind, from: NodeID, to: NodeID, term: Term) {
        self.kind = kind
        self.from = from
        self.to = to
        self.term = term
    }
}

/// A linearizable read that may be served once `index` is applied.
public struct ReadState: Equatable, Sendable {
    public var id: UInt64
    public var index: LogIndex
}

/// A catch-up the driver must install: the leader `from` shipped its log up to `index` (whose entry has
/// term `logTerm`) as files of transfer `transfer`. Asked only while this node follows `from` in `term`;
/// the driver answers with `Raft.installDone` (after replacing its log, or failing to).
public struct InstallRequest: Equatable, Sendable {
    public var from: NodeID
    public var term: Term
    public var index: LogIndex
    public var logTerm: Term
    public var transfer: UInt64
}

/// What the driver must do after a step: persist `entries` (truncating the log from the first one's
/// index if it is not past the end) and `hardState`; fdatasync if `mustSync`; only then send `messages`;
/// apply `committed`. Then call `advance`.
public struct Ready: Sendable {
    public var hardState: HardState?
    public var entries: [Record] = []
    public var committed: [Record] = []
    public var messages: [Message] = []
    public var readStates: [ReadState] = []
    /// Proposals that failed (no leader, transfer in progress, pending config change, ...).
    public var dropped: [UInt64] = []
    /// A catch-up from files to install, after the hard state is durable (then `installDone`).
    public var install: InstallRequest?
    public var mustSync: Bool { hardState != nil || !entries.isEmpty }
    public var isEmpty: Bool {
        hardState == nil && entries.isEmpty && committed.isEmpty && messages.isEmpty && readStates.isEmpty && dropped.isEmpty
            && install == nil
    }
}

/// The durable log as the core sees it (the shard's segment store, or a simulated one). Read-only:
/// the core never writes; the driver appends what `Ready.entries` says.
public protocol RaftLogReader {
    /// First index whose entry is available (after retention, the snapshot index + 1).
    var firstIndex: LogIndex { get }
    var lastIndex: LogIndex { get }
    /// Term of the entry at `index`; for `firstIndex - 1` the term of the snapshot it starts from.
    /// nil when not available (compacted, damaged).
    func term(at index: LogIndex) -> Term?
    /// Entries `from ..< to`, at most `maxBytes` of payload (at least one); nil when not available.
    func entries(from: LogIndex, to: LogIndex, maxBytes: Int) -> [Record]?
    /// Last seq of a stream in the durable log (0 if none), so the leader can number new records.
    func lastSeq(of stream: StreamID) -> StreamSeq
    /// Last index of the prefix this log can ship as whole files (sealed segments) to a follower that
    /// shares nothing with it; 0 when it cannot.
    var catchUpIndex: LogIndex { get }
}

extension RaftLogReader {
    public var catchUpIndex: LogIndex { 0 }
}

public struct RaftConfig: Sendable {
    public var id: NodeID
    /// Ticks without hearing from a leader before campaigning; randomized in [electionTicks, 2*electionTicks).
    public var electionTicks: Int = 10
    public var heartbeatTicks: Int = 1
    /// Append messages in flight per follower (pipelining window), for appends that are full
    /// (`appendBytesMax` or `appendEntriesMax`): a follower catching up streams.
    public var inflightAppendsMax: Int = 64
    /// Appends in flight per follower while the log's tail is being replicated (an append that is not
    /// full): more entries wait on the leader until one is acknowledged, and then go in one append. A
    /// follower then persists (one fdatasync) once per round trip whatever the request rate, instead of
    /// once per leader turn: group commit across the replicas. A heartbeat response frees the slot of an
    /// append that was lost.
    public var tailAppendsInflightMax: Int = 1
    /// A leader hands its new entries to the driver for persisting together with the append that sends
    /// them, not on every turn: while every follower that could take them has an append in flight, the
    /// entries proposed meanwhile wait (until the next ack sends them, or at most until the next tick).
    /// The leader's fdatasyncs then follow the followers' round trips, like theirs. Safe because a
    /// leader's own entries count toward commit only once persisted (a quorum of followers can commit
    /// without it, Raft thesis §10.2.1).
    public var leaderPersistsWithAppends = true
    /// Entries in one append at most (with `appendBytesMax`; what the log reader returns at once).
    public var appendEntriesMax: Int = 4096
    public var appendBytesMax: Int = 1 << 20
    public var committedBytesMax: Int = 4 << 20
    public var preVote = true
    public var checkQuorum = true
    public var seed: UInt64 = 0

    public init(id: NodeID, seed: UInt64 = 0) {
        self.id = id
        self.seed = seed
    }
}

public enum Role: String, Sendable {
    case follower, preCandidate, candidate, leader
}
