import Raft
import ShardState
import WeftCore

/// What a peer frame's payload carries (Docs/replication.md, "Forwarding"): a Raft message for the
/// frame's shard, or a write forwarded to the shard's leader and its answer.
///
/// A request id is `u64 incarnation | u64 sequence`: the incarnation is random per process start, so an
/// answer to a request sent before a restart can never be taken for the answer to a new one.
///
/// ```
/// 1 raft    | MessageCodec bytes
/// 2 forward | request id | u32 n | n x (u64 stream | u16 type | i64 timestamp | u32 len | payload)
/// 4 config  | request id | ConfigChange bytes (u8 kind | u64 node)
/// 5 file    | u64 transfer | u8 name length | name (UTF-8) | u64 offset | u64 total | bytes (rest)
/// 6 fileAck | u64 transfer | u8 ok | u64 received | u8 name length | name (UTF-8)
/// 7 readIndex | request id        (answered ok with one ref whose index is the read index)
/// 8 forwardKeyed | request id | u8 key length | key | then as forward: u32 n | n x record
/// 9 relayBatch | request id | u32 header length | RelayMarks.Header bytes | then as forward: u32 n | n x record
/// 14 presence | u8 on | u32 n | n x u64 user
/// 15 typing | u64 from | u64 to | u8 route
/// 16 inbox  | u32 n | n x record (as a read's answer: index | term | stream | seq | u16 type | i64 time | u32 len | payload)
/// 17 leader | u64 term
/// 18 replicaStopped (nothing more: the frame's shard)
/// 19 via    | request id | u64 target node | u32 ms the sender waits | inner envelope (rest): a
///           request to pass on to the target, whose answer comes back under this request id
///           (Docs/replication.md, "Forwarding through another node")
/// 20 replicaServing (nothing more: the frame's shard): the sender's replica serves its sessions again
/// answer statuses 6 partial: u32 count | u32 n | n x ref; 7 replayed: u32 n | n x ref;
///                 8 relay: u8 kind (0 written, 1 already applied, 2 stale) | u64 mark
/// 3 answer  | request id | u8 status
///           | 0 ok: u32 n | n x (u64 index | u64 term | u64 stream | u64 seq)
///           | 1 not leader: u64 leader (0 unknown) | u64 term of that view (absent before stop 27)
///           | 2 failed (nothing written) | 3 invalid | 4 change pending | 5 outcome unknown:
///           |   u32 len | UTF-8 message
/// ```
enum Envelope: Equatable {
    case raft(Message)
    case forward(request: RequestID, proposals: [ForwardedProposal])
    case answer(request: RequestID, ForwardAnswer)
    /// A membership change for the shard's leader; answered like a forward (ok carries the entry's index).
    case configChange(request: RequestID, change: ConfigChange)
    /// Part of a sealed segment or index file a leader ships to a follower that needs it (catch-up).
    case file(transfer: UInt64, name: String, offset: UInt64, total: UInt64, bytes: [UInt8])
    /// The follower staged `received` bytes of `name` (flow control of the catch-up); `ok` false: it
    /// could not write them.
    case fileAck(transfer: UInt64, name: String, received: UInt64, ok: Bool)
    /// A linearizable read point from the shard's leader (ReadIndex): answered `ok` with one ref whose
    /// index is the read index, once the leader has confirmed its leadership and applied up to it.
    case readIndex(request: RequestID)
    /// A write under a client's request key (idempotent): answered `ok`, `replayed` or `partial`.
    case forwardKeyed(request: RequestID, key: [UInt8], proposals: [ForwardedProposal])
    /// A relay batch for the shard's leader (the destination): answered `relay`.
    case relayBatch(request: RequestID, header: RelayMarks.Header, proposals: [ForwardedProposal])
    /// Messaging records from a node's messaging API (Docs/messaging.md), under a request key when `key`
    /// is not empty: answered like `forward` / `forwardKeyed`, with apply outcomes, or `refused`.
    case forwardMessaging(request: RequestID, key: [UInt8], proposals: [ForwardedProposal])
    /// Takes a rate-limit token for a user from the node that keeps their buckets: answered `ok([])` or
    /// `refused("rate_limited", seconds to wait)`.
    case rateTake(request: RequestID, user: UInt64, kind: UInt8, perMinute: UInt32)
    /// A messaging state query for a node that holds a replica of the shard (the asking node holds none):
    /// `consistency` as `ReadPoint.encode`, the query as `MessagingQuery.encode`. Answered `bytes`.
    case stateQuery(request: RequestID, consistency: [UInt8], query: [UInt8])
    /// A read of a shard's records for a node that holds a replica: `consistency` as `ReadPoint.encode`,
    /// the read as `ReadPoint.encodeQuery`. Answered `bytes` (`ReadPoint.encodeResult`).
    case readForward(request: RequestID, consistency: [UInt8], query: [UInt8])
    /// These users have (`on`) or no longer have sessions on the sending node: for the presence directory
    /// of the nodes their home shard is placed on (Docs/delivery.md, "Typing"). Not answered.
    case presence(on: Bool, users: [UInt64])
    /// `from` is typing to `to`. `route`: to a directory node of `to`, which sends it on (route false)
    /// to every node with a session of `to`. Not answered; lost frames are lost (typing is ephemeral).
    case typing(from: UInt64, to: UInt64, route: Bool)
    /// Inbox records of the frame's shard, applied by the sending node's replica, for users with sessions
    /// on the receiving node, which holds no replica of that shard (Docs/delivery.md, "Sessions away from
    /// the home shard"). Not answered; a lost frame shows as a gap the sessions read, or is found by the
    /// heads check.
    case inbox(records: [Record])
    /// The sending node's replica leads the frame's shard in `term`: for nodes without a replica of it,
    /// which learn of a new leader from nothing else (Docs/replication.md, "Forwarding"). Not answered.
    case leader(term: Term)
    /// The sending node's replica of the frame's shard stopped (a storage failure): though placed on the
    /// shard, the node has no tail of it, so the shard's replicas forward inbox records of its sessions'
    /// users to it (Docs/delivery.md). Repeated every 2 s while it lasts; not answered.
    case replicaStopped
    /// The sender's replica of the frame's shard, announced stopped or cut off before, serves its
    /// sessions again: stop forwarding to it. Sent once; not answered.
    case replicaServing
    /// A request (`inner`, an encoded forward, read or query) for `target`, sent to this node because the
    /// sender cannot reach the target: passed on once, and the answer returned under `request`.
    case via(request: RequestID, target: NodeID, withinMillis: UInt32, inner: [UInt8])

    /// Users in one presence frame at most.
    static let presenceUsersMax = 1 << 16

    struct ForwardedProposal: Equatable {
        var stream: StreamID
        var type: RecordType
        var timestampMicros: Int64
        var payload: [UInt8]
    }

    /// Who sent a request: the sender's incarnation (random per process start) and a sequence number.
    struct RequestID: Hashable, Sendable {
        var incarnation: UInt64
        var sequence: UInt64
    }

    /// The outcome of a forwarded request. Every failure says whether the write may have happened.
    enum ForwardAnswer: Equatable, Sendable {
        case ok([RecordRef])
        /// A keyed request written before: the first attempt's records; nothing was written now.
        case replayed([RecordRef])
        /// A keyed request whose first attempt was cut short by a leader change: these of its `count`
        /// records committed; nothing is written now.
        case partial([RecordRef], count: Int)
        /// What a relay batch did: 0 written, 1 already applied, 2 stale; the source's mark now.
        case relay(kind: UInt8, mark: LogIndex)
        /// Not the leader; the leader as the answering replica knows it, and the term of that view (0:
        /// not known, a local answer).
        case notLeader(NodeID?, term: Term = 0)
        /// Not written, and nothing of it will be: a retry is safe (no quorum, replaced by another
        /// leader's entry before commit, the replica is not there or was not running).
        case failed(String)
        /// The request itself is refused (a reserved record type, a limit): retrying cannot help.
        case invalid(String)
        /// Another membership change of the shard is still pending.
        case changePending(String)
        /// It may or may not have been written (proposed, then the answer was lost, the deadline passed,
        /// or the replica stopped): never retried automatically.
        case outcomeUnknown(String)
        /// The shard's state refused it before anything was written.
        case refused(code: String, message: String)
        /// The answer to a state query or a forwarded read.
        case bytes([UInt8])
    }

    struct DecodeError: Error, CustomStringConvertible {
        var description: String
    }

    /// A request that waits for an answer (what `via` may carry).
    var isRequest: Bool {
        switch self {
        case .forward, .forwardKeyed, .relayBatch, .forwardMessaging, .readIndex, .configChange, .rateTake, .stateQuery, .readForward: true
        case .raft, .answer, .file, .fileAck, .presence, .typing, .inbox, .leader, .replicaStopped, .replicaServing, .via: false
        }
    }

    func encode() -> [UInt8] {
        var b: [UInt8] = []
        switch self {
        case .raft(let m):
            b.append(1)
            MessageCodec.encode(m, into: &b)
        case .forward(let id, let ps):
            b.append(2)
            put(id, &b)
            Self.putProposals(ps, &b)
        case .relayBatch(let id, let header, let ps):
            b.append(9)
            put(id, &b)
            let h = header.encode()
            put(UInt32(h.count), &b)
            b += h
            Self.putProposals(ps, &b)
        case .forwardKeyed(let id, let key, let ps):
            b.append(8)
            put(id, &b)
            b.append(UInt8(min(key.count, 255)))
            b += key.prefix(255)
            Self.putProposals(ps, &b)
        case .stateQuery(let id, let c, let q), .readForward(let id, let c, let q):
            if case .stateQuery = self { b.append(12) } else { b.append(13) }
            put(id, &b)
            b.append(UInt8(min(c.count, 255)))
            b += c.prefix(255)
            put(UInt32(q.count), &b)
            b += q
        case .presence(let on, let users):
            b.append(14)
            b.append(on ? 1 : 0)
            put(UInt32(users.count), &b)
            for u in users { put(u, &b) }
        case .typing(let from, let to, let route):
            b.append(15)
            put(from, &b)
            put(to, &b)
            b.append(route ? 1 : 0)
        case .inbox(let records):
            b.append(16)
            Self.putRecords(records, &b)
        case .leader(let term):
            b.append(17)
            put(term, &b)
        case .replicaStopped:
            b.append(18)
        case .replicaServing:
            b.append(20)
        case .via(let id, let target, let within, let inner):
            b.append(19)
            put(id, &b)
            put(target.rawValue, &b)
            put(within, &b)
            b += inner
        case .rateTake(let id, let user, let kind, let perMinute):
            b.append(11)
            put(id, &b)
            put(user, &b)
            b.append(kind)
            put(perMinute, &b)
        case .forwardMessaging(let id, let key, let ps):
            b.append(10)
            put(id, &b)
            b.append(UInt8(min(key.count, 255)))
            b += key.prefix(255)
            Self.putProposals(ps, &b)
        case .file(let transfer, let name, let offset, let total, let bytes):
            b.append(5)
            put(transfer, &b)
            let n = Array(name.utf8.prefix(255))
            b.append(UInt8(n.count))
            b += n
            put(offset, &b)
            put(total, &b)
            b += bytes
        case .fileAck(let transfer, let name, let received, let ok):
            b.append(6)
            put(transfer, &b)
            b.append(ok ? 1 : 0)
            put(received, &b)
            let n = Array(name.utf8.prefix(255))
            b.append(UInt8(n.count))
            b += n
        case .configChange(let id, let c):
            b.append(4)
            put(id, &b)
            b += c.encode()
        case .readIndex(let id):
            b.append(7)
            put(id, &b)
        case .answer(let id, let a):
            b.append(3)
            put(id, &b)
            switch a {
            case .ok(let refs):
                b.append(0)
                Self.putRefs(refs, &b)
            case .replayed(let refs):
                b.append(7)
                Self.putRefs(refs, &b)
            case .relay(let kind, let mark):
                b.append(8)
                b.append(kind)
                put(mark, &b)
            case .partial(let refs, let count):
                b.append(6)
                put(UInt32(clamping: count), &b)
                Self.putRefs(refs, &b)
            case .notLeader(let l, let term):
                b.append(1)
                put(l?.rawValue ?? 0, &b)
                put(term, &b)
            case .failed(let why): Self.putText(2, why, &b)
            case .invalid(let why): Self.putText(3, why, &b)
            case .changePending(let why): Self.putText(4, why, &b)
            case .outcomeUnknown(let why): Self.putText(5, why, &b)
            case .bytes(let bytes):
                b.append(10)
                put(UInt32(bytes.count), &b)
                b += bytes
            case .refused(let code, let message):
                Self.putText(9, code, &b)
                let u = Array(message.utf8.prefix(4096))
                put(UInt32(u.count), &b)
                b += u
            }
        }
        return b
    }

    static func putText(_ status: UInt8, _ text: String, _ b: inout [UInt8]) {
        b.append(status)
        let u = Array(text.utf8.prefix(4096))
        put(UInt32(u.count), &b)
        b += u
    }

    static func decode(_ bytes: [UInt8]) throws -> Envelope {
        guard let kind = bytes.first else { throw DecodeError(description: "empty frame") }
        if kind == 1 { return .raft(try MessageCodec.decode(bytes[1...])) }
        var r = Cursor(bytes: bytes, pos: 1)
        switch kind {
        case 2:
            let id = try r.requestID()
            let ps = try Self.takeProposals(&r)
            try r.end()
            return .forward(request: id, proposals: ps)
        case 9:
            let id = try r.requestID()
            let hl = Int(try r.u32())
            guard hl <= r.remaining, let header = RelayMarks.Header.decode(try r.take(hl)) else { throw DecodeError(description: "bad relay batch header") }
            let ps = try Self.takeProposals(&r)
            try r.end()
            guard ps.count == header.sourceIndexes.count else { throw DecodeError(description: "relay batch of \(ps.count) records lists \(header.sourceIndexes.count)") }
            return .relayBatch(request: id, header: header, proposals: ps)
        case 8:
            let id = try r.requestID()
            let kl = Int(try r.take(1)[0])
            let key = try r.take(kl)
            let ps = try Self.takeProposals(&r)
            try r.end()
            return .forwardKeyed(request: id, key: key, proposals: ps)
        case 10:
            let id = try r.requestID()
            let kl = Int(try r.take(1)[0])
            let key = try r.take(kl)
            let ps = try Self.takeProposals(&r)
            try r.end()
            return .forwardMessaging(request: id, key: key, proposals: ps)
        case 12, 13:
            let id = try r.requestID()
            let c = try r.take(Int(try r.take(1)[0]))
            let n = Int(try r.u32())
            guard n <= r.remaining else { throw DecodeError(description: "query of \(n) bytes") }
            let q = try r.take(n)
            try r.end()
            return kind == 12 ? .stateQuery(request: id, consistency: c, query: q) : .readForward(request: id, consistency: c, query: q)
        case 14:
            let on = try r.take(1)[0]
            let n = Int(try r.u32())
            guard on <= 1, n <= Self.presenceUsersMax, n * 8 == r.remaining else { throw DecodeError(description: "presence of \(n) users in \(r.remaining) bytes") }
            var users: [UInt64] = []
            users.reserveCapacity(n)
            for _ in 0..<n { users.append(try r.u64()) }
            return .presence(on: on == 1, users: users)
        case 15:
            let from = try r.u64()
            let to = try r.u64()
            let route = try r.take(1)[0]
            try r.end()
            guard route <= 1 else { throw DecodeError(description: "typing route \(route)") }
            return .typing(from: from, to: to, route: route == 1)
        case 16:
            let records = try Self.takeRecords(&r)
            try r.end()
            return .inbox(records: records)
        case 17:
            let term = try r.u64()
            try r.end()
            return .leader(term: term)
        case 18:
            try r.end()
            return .replicaStopped
        case 20:
            try r.end()
            return .replicaServing
        case 19:
            let id = try r.requestID()
            let target = NodeID(try r.u64())
            let within = try r.u32()
            let inner = Array(try r.take(r.remaining))
            guard !inner.isEmpty else { throw DecodeError(description: "via without a request") }
            return .via(request: id, target: target, withinMillis: within, inner: inner)
        case 11:
            let id = try r.requestID()
            let user = try r.u64()
            let kind = try r.take(1)[0]
            let perMinute = try r.u32()
            try r.end()
            return .rateTake(request: id, user: user, kind: kind, perMinute: perMinute)
        case 3:
            let id = try r.requestID()
            let status = try r.take(1)[0]
            switch status {
            case 0:
                let refs = try Self.takeRefs(&r)
                try r.end()
                return .answer(request: id, .ok(refs))
            case 7:
                let refs = try Self.takeRefs(&r)
                try r.end()
                return .answer(request: id, .replayed(refs))
            case 8:
                let kind = try r.take(1)[0]
                guard kind <= 2 else { throw DecodeError(description: "relay answer kind \(kind)") }
                let mark = try r.u64()
                try r.end()
                return .answer(request: id, .relay(kind: kind, mark: mark))
            case 6:
                let count = Int(try r.u32())
                let refs = try Self.takeRefs(&r)
                try r.end()
                return .answer(request: id, .partial(refs, count: count))
            case 1:
                let l = try r.u64()
                let term: Term = r.remaining == 8 ? try r.u64() : 0
                try r.end()
                return .answer(request: id, .notLeader(l == 0 ? nil : NodeID(l), term: term))
            case 2, 3, 4, 5:
                let len = Int(try r.u32())
                guard len <= 4096 else { throw DecodeError(description: "answer text of \(len) bytes") }
                let s = String(decoding: try r.take(len), as: UTF8.self)
                try r.end()
                let a: ForwardAnswer =
                    switch status {
                    case 2: .failed(s)
                    case 3: .invalid(s)
                    case 4: .changePending(s)
                    default: .outcomeUnknown(s)
                    }
                return .answer(request: id, a)
            case 10:
                let n = Int(try r.u32())
                guard n <= r.remaining else { throw DecodeError(description: "answer of \(n) bytes") }
                let bytes = try r.take(n)
                try r.end()
                return .answer(request: id, .bytes(bytes))
            case 9:
                let s = try r.text()
                let m = try r.text()
                try r.end()
                return .answer(request: id, .refused(code: s, message: m))
            default:
                throw DecodeError(description: "answer status \(status)")
            }
        case 5:
            let transfer = try r.u64()
            let len = Int(try r.take(1)[0])
            let name = String(decoding: try r.take(len), as: UTF8.self)
            let offset = try r.u64()
            let total = try r.u64()
            return .file(transfer: transfer, name: name, offset: offset, total: total, bytes: try r.take(r.remaining))
        case 6:
            let transfer = try r.u64()
            let ok = try r.take(1)[0]
            guard ok <= 1 else { throw DecodeError(description: "file ack flag \(ok)") }
            let received = try r.u64()
            let len = Int(try r.take(1)[0])
            let name = String(decoding: try r.take(len), as: UTF8.self)
            try r.end()
            return .fileAck(transfer: transfer, name: name, received: received, ok: ok == 1)
        case 4:
            let id = try r.requestID()
            guard let c = ConfigChange.decode(try r.take(r.remaining)) else { throw DecodeError(description: "bad membership change") }
            return .configChange(request: id, change: c)
        case 7:
            let id = try r.requestID()
            try r.end()
            return .readIndex(request: id)
        default:
            throw DecodeError(description: "frame kind \(kind)")
        }
    }


    /// Proposals as a forward carries them.
    static func forwarded(_ proposals: [Proposal]) -> [ForwardedProposal] {
        proposals.map { ForwardedProposal(stream: $0.stream, type: $0.type, timestampMicros: $0.timestampMicros, payload: $0.payload) }
    }

    static func putProposals(_ ps: [ForwardedProposal], _ b: inout [UInt8]) {
        put(UInt32(ps.count), &b)
        for p in ps {
            put(p.stream.rawValue, &b)
            put(p.type.rawValue, &b)
            put(UInt64(bitPattern: p.timestampMicros), &b)
            put(UInt32(p.payload.count), &b)
            b += p.payload
        }
    }

    static func takeProposals(_ r: inout Cursor) throws -> [ForwardedProposal] {
        let n = Int(try r.u32())
        guard n <= Limits.appendBatchCountMax, n <= r.remaining / 22 else { throw DecodeError(description: "forward of \(n) records") }
        var ps: [ForwardedProposal] = []
        for _ in 0..<n {
            let stream = StreamID(try r.u64())
            let type = RecordType(try r.u16())
            let ts = Int64(bitPattern: try r.u64())
            let len = Int(try r.u32())
            guard len <= Limits.recordPayloadBytesMax else { throw DecodeError(description: "payload too large") }
            ps.append(ForwardedProposal(stream: stream, type: type, timestampMicros: ts, payload: try r.take(len)))
        }
        return ps
    }

    static func putRefs(_ refs: [RecordRef], _ b: inout [UInt8]) {
        put(UInt32(refs.count), &b)
        for ref in refs {
            put(ref.index, &b)
            put(ref.term, &b)
            put(ref.stream.rawValue, &b)
            put(ref.seq, &b)
            switch ref.outcome {
            case .accepted(let bytes):
                b.append(0)
                put(UInt32(bytes.count), &b)
                b += bytes
            case .rejected(let code, let message):
                b.append(1)
                for t in [code, message] {
                    let u = Array(t.utf8.prefix(4096))
                    put(UInt32(u.count), &b)
                    b += u
                }
            }
        }
    }

    static func takeRefs(_ r: inout Cursor) throws -> [RecordRef] {
        let n = Int(try r.u32())
        guard n <= r.remaining / 37 else { throw DecodeError(description: "answer of \(n) records") }
        var refs: [RecordRef] = []
        for _ in 0..<n {
            var ref = RecordRef(index: try r.u64(), term: try r.u64(), stream: StreamID(try r.u64()), seq: try r.u64())
            switch try r.take(1)[0] {
            case 0:
                let len = Int(try r.u32())
                guard len <= Limits.recordPayloadBytesMax else { throw DecodeError(description: "outcome of \(len) bytes") }
                ref.outcome = .accepted(try r.take(len))
            case 1:
                ref.outcome = .rejected(code: try r.text(), message: try r.text())
            case let k:
                throw DecodeError(description: "outcome kind \(k)")
            }
            refs.append(ref)
        }
        return refs
    }

    struct Cursor {
        let bytes: [UInt8]
        var pos: Int
        var remaining: Int { bytes.count - pos }
        mutating func take(_ n: Int) throws -> [UInt8] {
            guard n >= 0, remaining >= n else { throw DecodeError(description: "truncated at byte \(pos)") }
            defer { pos += n }
            return Array(bytes[pos..<(pos + n)])
        }
        mutating func int<T: FixedWidthInteger>(_: T.Type) throws -> T {
            var v: T = 0
            for (k, b) in try take(MemoryLayout<T>.size).enumerated() { v |= T(b) << (8 * k) }
            return v
        }
        mutating func u16() throws -> UInt16 { try int(UInt16.self) }
        mutating func u32() throws -> UInt32 { try int(UInt32.self) }
        mutating func u64() throws -> UInt64 { try int(UInt64.self) }
        mutating func requestID() throws -> RequestID { RequestID(incarnation: try u64(), sequence: try u64()) }
        mutating func text() throws -> String {
            let len = Int(try u32())
            guard len <= 4096 else { throw DecodeError(description: "text of \(len) bytes") }
            return String(decoding: try take(len), as: UTF8.self)
        }
        func end() throws { if remaining != 0 { throw DecodeError(description: "\(remaining) trailing bytes") } }
    }
}

/// Where an acknowledged record landed.
public struct RecordRef: Equatable, Sendable, Codable {
    public var index: LogIndex
    public var term: Term
    public var stream: StreamID
    public var seq: StreamSeq
    /// What apply said (on the wire between nodes; not in the raw API's JSON).
    public var outcome: ApplyOutcome

    enum CodingKeys: String, CodingKey { case index, term, stream, seq }
    public init(index: LogIndex, term: Term, stream: StreamID, seq: StreamSeq, outcome: ApplyOutcome = .ok) {
        self.index = index
        self.term = term
        self.stream = stream
        self.seq = seq
        self.outcome = outcome
    }
    public init(from d: any Decoder) throws {
        let c = try d.container(keyedBy: CodingKeys.self)
        index = try c.decode(UInt64.self, forKey: .index)
        term = try c.decode(UInt64.self, forKey: .term)
        stream = StreamID(try c.decode(UInt64.self, forKey: .stream))
        seq = try c.decode(UInt64.self, forKey: .seq)
        outcome = .ok
    }
    public func encode(to e: any Encoder) throws {
        var c = e.container(keyedBy: CodingKeys.self)
        try c.encode(index, forKey: .index)
        try c.encode(term, forKey: .term)
        try c.encode(stream.rawValue, forKey: .stream)
        try c.encode(seq, forKey: .seq)
    }
}

extension Envelope {
    /// `u32 n | n x (index | term | stream | seq | u16 type | i64 time | u32 len | payload)`.
    static func putRecords(_ records: [Record], _ b: inout [UInt8]) {
        put(UInt32(records.count), &b)
        for x in records {
            put(x.index, &b)
            put(x.term, &b)
            put(x.stream.rawValue, &b)
            put(x.seq, &b)
            put(x.type.rawValue, &b)
            put(UInt64(bitPattern: x.timestampMicros), &b)
            put(UInt32(x.payload.count), &b)
            b += x.payload
        }
    }

    static func takeRecords(_ r: inout Cursor) throws -> [Record] {
        let n = Int(try r.u32())
        guard n <= r.remaining / 46 else { throw DecodeError(description: "\(n) records in \(r.remaining) bytes") }
        var records: [Record] = []
        records.reserveCapacity(n)
        for _ in 0..<n {
            let index = try r.u64()
            let term = try r.u64()
            let stream = StreamID(try r.u64())
            let seq = try r.u64()
            let type = RecordType(try r.u16())
            let ts = Int64(bitPattern: try r.u64())
            let len = Int(try r.u32())
            guard len <= Limits.recordPayloadBytesMax else { throw DecodeError(description: "record payload of \(len) bytes") }
            records.append(Record(index: index, term: term, stream: stream, seq: seq, type: type, timestampMicros: ts, payload: try r.take(len)))
        }
        return records
    }
}

func put(_ id: Envelope.RequestID, _ b: inout [UInt8]) {
    put(id.incarnation, &b)
    put(id.sequence, &b)
}

func put<T: FixedWidthInteger>(_ v: T, _ b: inout [UInt8]) {
    withUnsafeBytes(of: v.littleEndian) { b.append(contentsOf: $0) }
}
