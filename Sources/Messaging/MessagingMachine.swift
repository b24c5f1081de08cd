import ShardState
import WeftCore

/// Limits on what a messaging record may carry; the API checks them first (clear 4xx errors), apply
/// checks them again (a record over a limit is rejected as malformed).
public enum MessagingLimits {
    public static let textBytesMax = 4096
    public static let noteBytesMax = 256
    public static let displayNameBytesMax = 64
    public static let mediaURLBytesMax = 2048
    public static let mimeTypeBytesMax = 128
    public static let passwordHashBytesMax = 128
    public static let sealedSecretBytesMax = 256
    /// A message may be recalled by its sender this long after it was sent (WeChat's two minutes).
    public static let recallWindowMicros: Int64 = 120_000_000
    /// Unread message seqs kept per conversation (older ones are only counted).
    public static let unreadKeptMax = 1024
}

/// A user's account, in their home shard.
public struct Account: Sendable, Equatable {
    public var id: UInt64
    public var username: String
    public var displayName: String
    /// bcrypt hash (never the password).
    public var passwordHash: [UInt8]
    /// Tokens carry the version they were issued at; bumping it revokes them all.
    public var tokenVersion: UInt64
    /// 0 off, 1 enrolling, 2 on.
    public var totpState: UInt8
    /// The TOTP secret, sealed with the cluster's key (Docs/security.md).
    public var totpSealed: [UInt8]
    public var createdMicros: Int64
    /// Offline notifications may carry the message text (the user opted in).
    public var pushPreview = false
}

/// A user's offline-push position, in their home shard (Docs/delivery.md, "Offline push"): what their
/// devices acknowledged and what the push worker notified. The user is owed a notification while an
/// event worth one (a message or contact request from someone else) lies past both.
public struct PushState: Sendable, Equatable {
    /// The last inbox seq, and the last one worth a notification.
    public var inboxLast: StreamSeq = 0
    public var pushableLast: StreamSeq = 0
    /// The highest inbox seq a device acknowledged, and the highest the push worker notified.
    public var delivered: StreamSeq = 0
    public var notified: StreamSeq = 0
    /// Since when (record time) the user is owed a notification; 0 when not owed.
    public var owingSinceMicros: Int64 = 0

    public init() {}

    public var mark: StreamSeq { max(delivered, notified) }
    public var owing: Bool { pushableLast > mark }
}

/// A user the push worker should notify now: events after `fromSeq`, up to `pushableLast` at least.
public struct PushDue: Sendable, Equatable {
    public var user: UInt64
    public var fromSeq: StreamSeq
    public var pushableLast: StreamSeq
    public var owingSinceMicros: Int64
    public var preview: Bool
}

/// A pair of users as their conversation's shard knows them: relationship, blocks, recent messages (for
/// recall), recalled and void message seqs. The authority for "may a send b a message".
public struct Pair: Sendable, Equatable {
    public enum Relation: UInt8, Sendable { case none = 0, requestedByLo = 1, requestedByHi = 2, contacts = 3 }
    public var relation: Relation = .none
    public var note: String = ""
    public var blockedByLo = false
    public var blockedByHi = false
    /// The last seq of the dm stream (messages, accepted or not).
    public var lastSeq: StreamSeq = 0
    /// Messages of the last two minutes: (seq, sender, time), for recall.
    public var recent: [RecentMessage] = []
    /// Recalled message seqs, ascending.
    public var recalled: [StreamSeq] = []
    /// Seqs of message records apply rejected (a race with a block or removal), ascending: readers skip them.
    public var void: [StreamSeq] = []

    public init() {}

    public struct RecentMessage: Sendable, Equatable {
        public var seq: StreamSeq
        public var sender: UInt64
        public var micros: Int64
    }

    public func isBlocked() -> Bool { blockedByLo || blockedByHi }
    public func isRecalled(_ seq: StreamSeq) -> Bool { Self.contains(recalled, seq) }
    public func isVoid(_ seq: StreamSeq) -> Bool { Self.contains(void, seq) }
    static func contains(_ a: [StreamSeq], _ v: StreamSeq) -> Bool {
        var lo = 0
        var hi = a.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if a[mid] < v { lo = mid + 1 } else { hi = mid }
        }
        return lo < a.count && a[lo] == v
    }
}

/// One of a user's peers, as the user's home shard knows it from their inbox events: the contact list and
/// the conversation list (last message, read position, unread count).
public struct PeerView: Sendable, Equatable {
    public enum Relation: UInt8, Sendable { case none = 0, outgoing = 1, incoming = 2, contact = 3 }
    public var relation: Relation = .none
    /// The note of an incoming request.
    public var note: String = ""
    /// The user blocked this peer.
    public var blocked = false
    public var lastSeq: StreamSeq = 0
    public var lastMicros: Int64 = 0
    public var lastMessageID: UInt64 = 0
    public var lastFromMe = false
    public var lastRecalled = false
    public var readSeq: StreamSeq = 0
    /// The peer's messages after `readSeq`, ascending (at most `unreadKeptMax`; older ones counted in `unreadDropped`).
    public var unread: [StreamSeq] = []
    public var unreadDropped: UInt64 = 0
    /// The highest dropped seq (every dropped one is at or below it).
    public var lastDroppedSeq: StreamSeq = 0
    /// When the relation last changed.
    public var sinceMicros: Int64 = 0
    /// Groups: the last unread message that mentions the user (@them or @all); 0 when none is unread.
    public var mentionSeq: StreamSeq = 0

    public var unreadCount: UInt64 { UInt64(unread.count) + unreadDropped }

    public init() {}

    mutating func onMessage(seq: StreamSeq, fromMe: Bool, id: UInt64, now: Int64) {
        if seq > lastSeq {
            lastSeq = seq
            lastMicros = now
            lastMessageID = id
            lastFromMe = fromMe
            lastRecalled = false
        }
        if fromMe {
            // Sending is reading: what came before is read.
            markRead(through: seq)
        } else if seq > readSeq {
            let at = unread.firstIndex { $0 >= seq } ?? unread.count
            if at == unread.count || unread[at] != seq { unread.insert(seq, at: at) }
            if unread.count > MessagingLimits.unreadKeptMax {
                lastDroppedSeq = unread.removeFirst()
                unreadDropped += 1
            }
        }
    }

    mutating func markRead(through seq: StreamSeq) {
        guard seq > readSeq else { return }
        readSeq = seq
        if mentionSeq <= seq { mentionSeq = 0 }
        unread.removeAll { $0 <= seq }
        if seq >= lastDroppedSeq { unreadDropped = 0 }
    }

    mutating func recalled(_ seq: StreamSeq) {
        if lastSeq == seq { lastRecalled = true }
        if let at = unread.firstIndex(of: seq) { unread.remove(at: at) }
    }

    mutating func requested(fromMe: Bool, note: String, now: Int64) {
        guard relation != .contact else { return }
        if !fromMe && relation == .outgoing || fromMe && relation == .incoming {
            // Both asked: contacts (as the pair's shard decided).
            setRelation(.contact, now: now)
        } else {
            setRelation(fromMe ? .outgoing : .incoming, now: now)
            if !fromMe { self.note = note }
        }
    }

    mutating func setRelation(_ r: Relation, now: Int64) {
        relation = r
        note = ""
        sinceMicros = now
    }
}

/// The messaging state machine (Docs/messaging.md): every shard runs it. It applies `messaging` records
/// and accepts every other record unchanged (the raw log API goes on working beside it).
public struct MessagingMachine: ShardStateMachine {
    public internal(set) var accounts = BucketedMap<UInt64, Account>()
    /// Normalised username → user id, for the usernames that hash to this shard.
    public internal(set) var usernames = BucketedMap<[UInt8], UInt64>()
    /// Next id counter: ids are `nextLocal · shards + shard`.
    public internal(set) var nextLocal: UInt64 = 1
    public internal(set) var pairs = BucketedMap<UInt64, Pair>()
    /// Users homed here → their peers.
    public internal(set) var peers = BucketedMap<UInt64, [UInt64: PeerView]>()
    /// Log indexes of messaging records apply rejected, ascending (their relays derive nothing from them).
    public internal(set) var rejectedIndexes: [LogIndex] = []
    public internal(set) var clockMicros: Int64 = 0
    /// Users homed here → their push position; `owing`: the users owed a notification → since when
    /// (rebuilt from `push` when a snapshot is read).
    public internal(set) var push = BucketedMap<UInt64, PushState>()
    public internal(set) var owing = BucketedMap<UInt64, Int64>()
    /// Groups homed here (Docs/groups.md).
    public internal(set) var groups = BucketedMap<UInt64, Group>()

    public init() {}

    // MARK: Queries (on the shard thread, against applied state)

    public func account(_ id: UInt64) -> Account? { accounts[id] }
    public func userID(username: String) -> UInt64? { usernames[Array(username.utf8)] }
    public func pair(_ a: UInt64, _ b: UInt64) -> Pair? { pairs[Ids.pairKey(a, b)] }
    public func peers(of user: UInt64) -> [UInt64: PeerView] { peers[user] ?? [:] }

    /// A conversation this state (shard `shard` of `shards`) holds that `Ids.pairShard` places on another
    /// shard, as (lower, higher) user id; nil when none. Such a pair was written by a version before stop
    /// 30, which placed a conversation by a hash of the pair: this version looks for it on its lower
    /// user's home shard and never finds it there (Docs/messaging.md, upgrade note). Stops at the first;
    /// a full pass over the pairs otherwise (a startup check, not a per-request lookup).
    public func misplacedPair(shard: ShardID, shards: Int) -> (UInt64, UInt64)? {
        for b in 0..<BucketedMap<UInt64, Pair>.bucketCount {
            for key in pairs.entries(inBucket: b).keys where Ids.pairShard(key >> 32, key & 0xFFFF_FFFF, shards: shards) != shard {
                return (key >> 32, key & 0xFFFF_FFFF)
            }
        }
        return nil
    }

    /// Users owed a notification since at least `delayMicros` before `nowMicros`, at most `limit`;
    /// `skip`: users the worker is backing off from.
    public func pushDue(nowMicros: Int64, delayMicros: Int64, limit: Int, skip: Set<UInt64> = []) -> [PushDue] {
        // It runs on the shard's thread: it stops at `limit` users (in map order, not strictly the
        // longest-waiting; users in back-off are skipped, so every owed user comes up in turn) instead of
        // walking and sorting a set that a webhook outage can grow to every user of the shard.
        var due: [PushDue] = []
        for b in 0..<BucketedMap<UInt64, Int64>.bucketCount where due.count < limit {
            for (u, since) in owing.entries(inBucket: b) where due.count < limit {
                guard nowMicros - since >= delayMicros, !skip.contains(u), let p = push[u] else { continue }
                due.append(PushDue(user: u, fromSeq: p.mark + 1, pushableLast: p.pushableLast, owingSinceMicros: since, preview: accounts[u]?.pushPreview ?? false))
            }
        }
        due.sort { ($0.owingSinceMicros, $0.user) < ($1.owingSinceMicros, $1.user) }
        return due
    }

    // MARK: Apply

    public mutating func apply(_ records: ArraySlice<Record>) -> [ApplyOutcome] {
        var out: [ApplyOutcome] = []
        out.reserveCapacity(records.count)
        for r in records {
            clockMicros = max(clockMicros, r.timestampMicros)
            guard r.type == .messaging else {
                out.append(.ok)
                continue
            }
            let o = applyOne(r)
            if case .rejected = o {
                rejectedIndexes.append(r.index)
                // A refused message still took its seq in the dm stream (a group record in the group's
                // stream): readers skip it.
                if r.stream.rawValue >> 62 == 2 { voidMessage(r) } else if Ids.groupOf(r.stream) != nil { voidGroupRecord(r) }
            }
            out.append(o)
        }
        return out
    }

    static func reject(_ code: String, _ message: String) -> ApplyOutcome { .rejected(code: code, message: message) }

    mutating func applyOne(_ r: Record) -> ApplyOutcome {
        guard let op = MessagingOp.decode(r.payload) else { return Self.reject("malformed", "not a messaging operation at index \(r.index)") }
        guard op.stream == r.stream else { return Self.reject("malformed", "operation in stream \(r.stream), belongs in \(op.stream)") }
        if let bad = Self.check(op) { return bad }
        switch op {
        case .register(let name, let display, let hash, let shard, let shards):
            return register(name, display, hash, shard: shard, shards: shards, r)
        case .profile(let u, let display):
            guard accounts[u] != nil else { return Self.reject("unknown_user", "no user \(u) here") }
            accounts.update(u) { $0?.displayName = display }
            return .ok
        case .revokeTokens(let u):
            guard accounts[u] != nil else { return Self.reject("unknown_user", "no user \(u) here") }
            accounts.update(u) { $0?.tokenVersion += 1 }
            return .ok
        case .totp(let u, let state, let sealed):
            guard accounts[u] != nil else { return Self.reject("unknown_user", "no user \(u) here") }
            accounts.update(u) {
                $0?.totpState = state
                $0?.totpSealed = sealed
                // Turning a second factor on or off ends every other session.
                if state != 1 { $0?.tokenVersion += 1 }
            }
            return .ok
        case .contactRequest, .contactAccept, .contactRemove, .block, .message, .recall:
            if let refusal = admitPair(op, at: r.timestampMicros) { return refusal }
            applyPair(op, r)
            switch op {
            case .message:
                // The message's time, for the sender's answer (`created_at`), the same on a retry.
                var w = Writer()
                w.i64(r.timestampMicros)
                return .accepted(w.bytes)
            case .contactRequest(let from, let to, _):
                // 1: the request made them contacts (the other had asked too).
                return .accepted([pairs[Ids.pairKey(from, to)]?.relation == .contacts ? 1 : 0])
            default:
                return .ok
            }
        case .inbox(let u, let e):
            applyInbox(u, e, r)
            return .ok
        case .readMark(let u, let p, let seq):
            applyInbox(u, .read(peer: p, seq: seq), r)
            return .ok
        case .pushPreview(let u, let on):
            guard accounts[u] != nil else { return Self.reject("unknown_user", "no user \(u) here") }
            accounts.update(u) { $0?.pushPreview = on }
            return .ok
        case .delivered(let u, let seq), .notified(let u, let seq):
            guard accounts[u] != nil else { return Self.reject("unknown_user", "no user \(u) here") }
            updatePush(u, at: r.timestampMicros) { p in
                // Never past the inbox: a mark ahead of it would silence events not written yet.
                let s = min(seq, p.inboxLast)
                if case .delivered = op { p.delivered = max(p.delivered, s) } else { p.notified = max(p.notified, s) }
            }
            return .ok
        case .group(let g):
            return applyGroup(g, r)
        }
    }

    /// Changes a user's push position and keeps `owing` in step: a user newly owed is owed since `micros`
    /// (a mark that moves but leaves events owed restarts the wait: the devices had them).
    mutating func updatePush(_ u: UInt64, at micros: Int64, _ body: (inout PushState) -> Void) {
        var p = push[u] ?? PushState()
        let wasOwing = p.owing
        let oldMark = p.mark
        body(&p)
        if p.owing {
            if !wasOwing || p.mark != oldMark { p.owingSinceMicros = micros }
            owing[u] = p.owingSinceMicros
        } else {
            p.owingSinceMicros = 0
            if wasOwing { owing.update(u) { $0 = nil } }
        }
        push[u] = p
    }

    /// Whether an inbox event calls for a notification when no device has it: something from someone else.
    public static func isPushable(_ e: InboxEvent, user: UInt64) -> Bool {
        switch e {
        case .message(_, _, let fromMe, _): !fromMe
        case .contactRequest(_, let fromMe, _): !fromMe
        case .groupMessage(_, _, let sender, _, _): sender != user
        default: false
        }
    }

    /// Field limits, the same at the API and in apply.
    public static func check(_ op: MessagingOp) -> ApplyOutcome? {
        func users(_ us: UInt64...) -> ApplyOutcome? {
            us.allSatisfy(Ids.isUserID) ? nil : reject("malformed", "a user id out of range")
        }
        switch op {
        case .register(let name, let display, let hash, let shard, let shards):
            guard Ids.normalisedUsername(name) == name else { return reject("malformed", "username not normalised") }
            guard shards >= 1, shards <= UInt64(Ids.shardsMax), Ids.usernameShard(name, shards: Int(shards)).rawValue == shard else {
                return reject("malformed", "the username does not belong to shard \(shard) of \(shards)")
            }
            guard !display.isEmpty, display.utf8.count <= MessagingLimits.displayNameBytesMax else { return reject("malformed", "display name length") }
            guard !hash.isEmpty, hash.count <= MessagingLimits.passwordHashBytesMax else { return reject("malformed", "password hash length") }
            return nil
        case .profile(let u, let display):
            guard !display.isEmpty, display.utf8.count <= MessagingLimits.displayNameBytesMax else { return reject("malformed", "display name length") }
            return users(u)
        case .revokeTokens(let u): return users(u)
        case .totp(let u, _, let sealed):
            guard sealed.count <= MessagingLimits.sealedSecretBytesMax else { return reject("malformed", "sealed secret length") }
            return users(u)
        case .contactRequest(let a, let b, let note):
            guard a != b else { return reject("invalid", "a request to oneself") }
            guard note.utf8.count <= MessagingLimits.noteBytesMax else { return reject("malformed", "note length") }
            return users(a, b)
        case .contactAccept(let a, let b), .contactRemove(let a, let b), .block(let a, let b, _), .recall(let a, let b, _, _):
            guard a != b else { return reject("invalid", "oneself") }
            return users(a, b)
        case .message(let a, let b, let kind, let content, let url, let mime, _):
            guard a != b else { return reject("invalid", "a message to oneself") }
            return checkMessageFields(kind: kind, content: content, url: url, mime: mime) ?? users(a, b)
        case .inbox(let u, _), .readMark(let u, _, _), .pushPreview(let u, _), .delivered(let u, _), .notified(let u, _): return users(u)
        case .group(let g): return checkGroup(g)
        }
    }

    /// A message's kind, text and media fields (1:1 and group messages alike).
    static func checkMessageFields(kind: MessageKind, content: String, url: String, mime: String) -> ApplyOutcome? {
        guard content.utf8.count <= MessagingLimits.textBytesMax, url.utf8.count <= MessagingLimits.mediaURLBytesMax,
            mime.utf8.count <= MessagingLimits.mimeTypeBytesMax
        else { return reject("malformed", "a field over its limit") }
        if kind == .text {
            guard !content.isEmpty, url.isEmpty else { return reject("malformed", "text needs content and no media") }
        } else {
            guard !url.isEmpty, !mime.isEmpty else { return reject("malformed", "media needs a url and a mime type") }
        }
        return nil
    }

    mutating func register(_ name: String, _ display: String, _ hash: [UInt8], shard: UInt64, shards: UInt64, _ r: Record) -> ApplyOutcome {
        let key = Array(name.utf8)
        guard usernames[key] == nil else { return Self.reject("username_taken", "the username is taken") }
        // The record names the username's shard and the shard count (checked against the name's hash):
        // the id is n·shards + shard, so id % shards is the shard that keeps the username.
        let id = nextLocal * shards + shard
        guard Ids.isUserID(id) else { return Self.reject("ids_exhausted", "this shard has no user ids left") }
        nextLocal += 1
        usernames[key] = id
        accounts[id] = Account(
            id: id, username: name, displayName: display, passwordHash: hash, tokenVersion: 1, totpState: 0, totpSealed: [],
            createdMicros: r.timestampMicros)
        var w = Writer()
        w.u64(id)
        return .accepted(w.bytes)
    }

    /// Whether a pair operation may apply to the pair's current state (nil: it may).
    func admitPair(_ op: MessagingOp, at micros: Int64) -> ApplyOutcome? {
        switch op {
        case .contactRequest(let from, let to, _):
            let p = pairs[Ids.pairKey(from, to)] ?? Pair()
            if p.isBlocked() { return Self.reject("not_allowed", "the request cannot be sent") }
            if p.relation == .contacts { return Self.reject("already_contacts", "already contacts") }
            // A request already pending from the same user: one notice in the other's inbox is enough.
            if p.relation == (from < to ? .requestedByLo : .requestedByHi) { return Self.reject("already_requested", "the request is pending") }
            return nil
        case .contactAccept(let by, let other):
            let p = pairs[Ids.pairKey(by, other)] ?? Pair()
            let fromOther: Pair.Relation = other < by ? .requestedByLo : .requestedByHi
            guard p.relation == fromOther, !p.isBlocked() else { return Self.reject("no_request", "no pending request from that user") }
            return nil
        case .contactRemove(let by, let other):
            guard (pairs[Ids.pairKey(by, other)] ?? Pair()).relation != .none else { return Self.reject("not_contacts", "not a contact") }
            return nil
        case .block:
            return nil
        case .message(let from, let to, _, _, _, _, _):
            let p = pairs[Ids.pairKey(from, to)] ?? Pair()
            guard p.relation == .contacts, !p.isBlocked() else { return Self.reject("not_allowed", "you can message only your contacts") }
            return nil
        case .recall(let by, let other, let seq, _):
            let p = pairs[Ids.pairKey(by, other)] ?? Pair()
            guard let m = p.recent.first(where: { $0.seq == seq }), m.sender == by, !p.isRecalled(seq) else {
                return Self.reject("not_recallable", "only your own messages of the last two minutes can be recalled")
            }
            guard micros - m.micros <= MessagingLimits.recallWindowMicros else {
                return Self.reject("not_recallable", "only your own messages of the last two minutes can be recalled")
            }
            return nil
        default:
            return nil
        }
    }

    mutating func applyPair(_ op: MessagingOp, _ r: Record) {
        switch op {
        case .contactRequest(let from, let to, let note):
            pairs.update(Ids.pairKey(from, to)) { p in
                var v = p.take() ?? Pair()
                let fromOther: Pair.Relation = to < from ? .requestedByLo : .requestedByHi
                if v.relation == fromOther {
                    // Both asked: they are contacts (WeChat does the same).
                    v.relation = .contacts
                    v.note = ""
                } else {
                    v.relation = from < to ? .requestedByLo : .requestedByHi
                    v.note = note
                }
                p = v
            }
        case .contactAccept(let by, let other):
            pairs.update(Ids.pairKey(by, other)) {
                $0?.relation = .contacts
                $0?.note = ""
            }
        case .contactRemove(let by, let other):
            pairs.update(Ids.pairKey(by, other)) {
                $0?.relation = .none
                $0?.note = ""
            }
        case .block(let by, let other, let on):
            pairs.update(Ids.pairKey(by, other)) { p in
                var v = p.take() ?? Pair()
                if by < other { v.blockedByLo = on } else { v.blockedByHi = on }
                p = v
            }
        case .message(let from, _, _, _, _, _, _):
            let now = r.timestampMicros
            pairs.update(Ids.pairKey(from, op.otherOf(from))) { p in
                var v = p.take() ?? Pair()
                v.lastSeq = max(v.lastSeq, r.seq)
                v.recent.removeAll { now - $0.micros > MessagingLimits.recallWindowMicros }
                v.recent.append(Pair.RecentMessage(seq: r.seq, sender: from, micros: now))
                p = v
            }
        case .recall(let by, let other, let seq, _):
            pairs.update(Ids.pairKey(by, other)) { p in
                guard var v = p.take() else { return }
                let at = v.recalled.firstIndex { $0 > seq } ?? v.recalled.count
                v.recalled.insert(seq, at: at)
                p = v
            }
        default:
            break
        }
    }

    /// A message record the pair's state refuses still takes its seq in the dm stream: remember it as void.
    mutating func voidMessage(_ r: Record) {
        guard let (lo, hi) = Ids.users(of: r.stream) else { return }
        pairs.update(Ids.pairKey(lo, hi)) { p in
            var v = p.take() ?? Pair()
            v.lastSeq = max(v.lastSeq, r.seq)
            v.void.append(r.seq)
            p = v
        }
    }

    mutating func applyInbox(_ u: UInt64, _ e: InboxEvent, _ r: Record) {
        let now = r.timestampMicros
        updatePush(u, at: now) { p in
            if p.inboxLast == 0 && r.seq > 1 {
                // Inbox events from before push tracking existed (a log or snapshot of an older version):
                // tracking starts here, not by notifying the whole history.
                p.notified = r.seq - 1
            }
            p.inboxLast = max(p.inboxLast, r.seq)
            if Self.isPushable(e, user: u) { p.pushableLast = max(p.pushableLast, r.seq) }
        }
        peers.update(u) { ps in
            // Moved out and back: the inner dictionary stays uniquely referenced (no copy per event).
            var all = ps.take() ?? [:]
            defer { ps = all }
            switch e {
            case .message(let peer, let seq, let fromMe, let id):
                all[peer, default: PeerView()].onMessage(seq: seq, fromMe: fromMe, id: id, now: now)
            case .recall(let peer, let seq, _, _):
                all[peer, default: PeerView()].recalled(seq)
            case .contactRequest(let peer, let fromMe, let note):
                all[peer, default: PeerView()].requested(fromMe: fromMe, note: note, now: now)
            case .contactAccepted(let peer):
                all[peer, default: PeerView()].setRelation(.contact, now: now)
            case .contactRemoved(let peer, _):
                if all[peer] != nil { all[peer]?.setRelation(.none, now: now) }
            case .blocked(let peer, let on):
                all[peer, default: PeerView()].blocked = on
            case .read(let peer, let seq):
                all[peer]?.markRead(through: seq)
            case .groupMessage(let g, let seq, let sender, let id, let mention):
                var v = all[g] ?? PeerView()
                v.onMessage(seq: seq, fromMe: sender == u, id: id, now: now)
                if sender != u, mention != .none, seq > v.readSeq { v.mentionSeq = max(v.mentionSeq, seq) }
                all[g] = v
            case .groupRecall(let g, let seq, _, _):
                all[g]?.recalled(seq)
            case .groupChange(let g, let seq, let by, let change):
                var v = all[g] ?? PeerView()
                switch change {
                case .created:
                    v.setRelation(.contact, now: now)
                    v.readSeq = max(v.readSeq, seq)
                case .added(let users) where users.contains(u):
                    // A member from here on: what came before is not theirs to read.
                    v.setRelation(.contact, now: now)
                    v.markRead(through: seq)
                case .removed(let x) where x == u:
                    v.setRelation(.none, now: now)
                    v.note = by == u ? "left" : "removed"
                case .dissolved:
                    v.setRelation(.none, now: now)
                    v.note = "dissolved"
                default:
                    break
                }
                // A change is news in the conversation list, without counting as unread.
                if seq > v.lastSeq {
                    v.lastSeq = seq
                    v.lastMicros = now
                }
                all[g] = v
            }
        }
    }

    // MARK: Admission (on the leader, before proposing)

    public func admit(type: RecordType, stream: StreamID, payload: [UInt8]) -> ApplyOutcome? {
        guard type == .messaging else { return nil }
        guard let op = MessagingOp.decode(payload), op.stream == stream else { return Self.reject("malformed", "not a messaging operation") }
        return admit(op)
    }

    public var relayRejected: [LogIndex] { rejectedIndexes }

    /// Refuses, before anything is written, an operation the applied state already refuses. Apply stays
    /// the authority (an entry not applied yet can change the answer).
    public func admit(_ op: MessagingOp) -> ApplyOutcome? {
        if let bad = Self.check(op) { return bad }
        switch op {
        case .register(let name, _, _, _, _):
            return usernames[Array(name.utf8)] == nil ? nil : Self.reject("username_taken", "the username is taken")
        case .profile(let u, _), .revokeTokens(let u), .totp(let u, _, _), .pushPreview(let u, _), .delivered(let u, _), .notified(let u, _):
            return accounts[u] == nil ? Self.reject("unknown_user", "no user \(u) here") : nil
        case .contactRequest, .contactAccept, .contactRemove, .block, .message, .recall:
            return admitPair(op, at: clockMicros)
        case .group(let g):
            return admitGroup(g, at: clockMicros)
        default:
            return nil
        }
    }
}

extension MessagingOp {
    /// The other user of a two-user operation.
    func otherOf(_ u: UInt64) -> UInt64 {
        switch self {
        case .message(let a, let b, _, _, _, _, _), .contactRequest(let a, let b, _), .contactAccept(let a, let b), .contactRemove(let a, let b),
            .block(let a, let b, _), .recall(let a, let b, _, _):
            a == u ? b : a
        default: 0
        }
    }
}
