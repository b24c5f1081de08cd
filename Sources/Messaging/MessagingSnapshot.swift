import ShardState
import WeftCore

/// The messaging state as bytes (Docs/messaging.md, "Snapshot"): little-endian, maps bucket by bucket
/// with keys sorted in each bucket, so equal states give equal bytes on every replica.
///
/// ```
/// u32 version = 1 | i64 clock | u64 nextLocal | u32 R | R × u64 rejected index
/// u64 A | A × account      (u64 id | text username | text display | blob hash | u64 tokenVersion | u8 totp | blob sealed | i64 created
///                           | u8 pushPreview (version 2))
/// u64 P | P × pair         (u64 key | u8 relation | text note | u8 blockedLo | u8 blockedHi | u64 lastSeq
///                           | u32 n × (u64 seq | u64 sender | i64 micros) | u32 n × u64 recalled | u32 n × u64 void)
/// u64 U | U × (u64 user | u32 n × peer)   peer: u64 id | u8 relation | text note | u8 blocked | u64 lastSeq | i64 lastMicros
///                           | u64 lastMessageID | u8 lastFromMe | u8 lastRecalled | u64 readSeq | u32 n × u64 unread
///                           | u64 unreadDropped | u64 lastDroppedSeq | i64 since | u64 mentionSeq (version 3)
/// u64 N | N × push         (u64 user | u64 inboxLast | u64 pushableLast | u64 delivered | u64 notified | i64 owingSince)   (version 2)
/// u64 G | G × group        (u64 id | text name | text notice | u64 owner | i64 created | u8 dissolved
///                           | u32 n × (u64 user | u8 role | u64 joinedSeq | i64 joined) | u64 lastSeq
///                           | u32 n × (u64 seq | u64 sender | i64 micros) | u32 n × u64 recalled | u32 n × u64 void)   (version 3)
/// ```
/// Versions 1 (before offline push) and 2 (before groups) are still read: no push positions, previews
/// off; no groups, no mention marks.
/// (text and blob: u32 length | bytes; usernames are rebuilt from the accounts.)
extension MessagingMachine {
    static let snapshotVersion: UInt32 = 3

    public func snapshot() -> [UInt8] {
        var w = Writer()
        w.u32(Self.snapshotVersion)
        w.i64(clockMicros)
        w.u64(nextLocal)
        w.u32(UInt32(rejectedIndexes.count))
        for i in rejectedIndexes { w.u64(i) }
        w.u64(UInt64(accounts.count))
        Self.sorted(accounts) { _, a in a.put(&w) }
        w.u64(UInt64(pairs.count))
        Self.sorted(pairs) { k, p in
            w.u64(k)
            p.put(&w)
        }
        w.u64(UInt64(peers.count))
        Self.sorted(peers) { u, all in
            w.u64(u)
            PeerView.putAll(all, &w)
        }
        w.u64(UInt64(push.count))
        Self.sorted(push) { u, p in
            w.u64(u)
            w.u64(p.inboxLast)
            w.u64(p.pushableLast)
            w.u64(p.delivered)
            w.u64(p.notified)
            w.i64(p.owingSinceMicros)
        }
        w.u64(UInt64(groups.count))
        Self.sorted(groups) { id, g in
            w.u64(id)
            g.put(&w)
        }
        return w.bytes
    }

    static func sorted<V>(_ map: BucketedMap<UInt64, V>, _ body: (UInt64, V) -> Void) {
        for b in 0..<BucketedMap<UInt64, V>.bucketCount {
            let bucket = map.entries(inBucket: b)
            for k in bucket.keys.sorted() {
                if let v = bucket[k] { body(k, v) }
            }
        }
    }

    public init(snapshot b: [UInt8]) throws {
        self.init()
        var r = Reader(b)
        func fail(_ what: String) -> StateDecodeError { StateDecodeError("messaging snapshot: \(what) at byte \(r.offset) of \(b.count)") }
        func count(_ n: UInt64?, each: Int) throws -> Int {
            // A count the remaining bytes cannot hold is a lie: refused before anything is reserved.
            guard let n, n <= UInt64((b.count - r.offset) / each) else { throw fail("a count past the end") }
            return Int(n)
        }
        guard let version = r.u32(), (1...Self.snapshotVersion).contains(version) else { throw fail("unknown version") }
        guard let clock = r.i64(), let next = r.u64() else { throw fail("a short header") }
        clockMicros = clock
        nextLocal = next
        let rn = try count(r.u32().map(UInt64.init), each: 8)
        rejectedIndexes.reserveCapacity(rn)
        for _ in 0..<rn {
            guard let i = r.u64() else { throw fail("a short rejected index") }
            rejectedIndexes.append(i)
        }
        let an = try count(r.u64(), each: 41)
        accounts.reserveCapacity(an)
        for _ in 0..<an {
            guard let a = Account.take(&r, version: version) else { throw fail("a short account") }
            accounts[a.id] = a
            usernames[Array(a.username.utf8)] = a.id
        }
        let pn = try count(r.u64(), each: 35)
        pairs.reserveCapacity(pn)
        for _ in 0..<pn {
            guard let key = r.u64(), let p = Pair.take(&r) else { throw fail("a short pair") }
            pairs[key] = p
        }
        let un = try count(r.u64(), each: 12)
        peers.reserveCapacity(un)
        for _ in 0..<un {
            guard let u = r.u64(), let all = PeerView.takeAll(&r, version: version) else { throw fail("a short peer list") }
            peers[u] = all
        }
        if version >= 2 {
            let n = try count(r.u64(), each: 48)
            push.reserveCapacity(n)
            for _ in 0..<n {
                guard let u = r.u64(), let inboxLast = r.u64(), let pushableLast = r.u64(), let delivered = r.u64(), let notified = r.u64(),
                    let since = r.i64()
                else { throw fail("a short push position") }
                var p = PushState()
                p.inboxLast = inboxLast
                p.pushableLast = pushableLast
                p.delivered = delivered
                p.notified = notified
                p.owingSinceMicros = since
                push[u] = p
                if p.owing { owing[u] = since }
            }
        }
        if version >= 3 {
            let n = try count(r.u64(), each: 60)
            groups.reserveCapacity(n)
            for _ in 0..<n {
                guard let id = r.u64(), let g = Group.take(&r) else { throw fail("a short group") }
                groups[id] = g
            }
        }
        guard r.atEnd else { throw fail("trailing bytes") }
    }

    /// FNV-1a of the snapshot bytes: they are laid out independently of memory order.
    public var stateHash: UInt64 { FNV1a.hash(snapshot()) }
}

// The entities' encodings: in snapshots and in state queries between nodes. Every `take` checks each
// count against the bytes left (a lie is refused before anything is reserved) and returns nil when short.

extension Account {
    func put(_ w: inout Writer) {
        w.u64(id)
        w.text(username)
        w.text(displayName)
        w.blob(passwordHash)
        w.u64(tokenVersion)
        w.u8(totpState)
        w.blob(totpSealed)
        w.i64(createdMicros)
        w.u8(pushPreview ? 1 : 0)
    }

    /// `version`: the snapshot's (1 had no preview flag).
    static func take(_ r: inout Reader, version: UInt32 = MessagingMachine.snapshotVersion) -> Account? {
        guard let id = r.u64(), let name = r.text(), let display = r.text(), let hash = r.blob(), let tv = r.u64(), let totp = r.u8(), totp <= 2,
            let sealed = r.blob(), let created = r.i64()
        else { return nil }
        var a = Account(
            id: id, username: name, displayName: display, passwordHash: hash, tokenVersion: tv, totpState: totp, totpSealed: sealed,
            createdMicros: created)
        if version >= 2 {
            guard let preview = r.flag() else { return nil }
            a.pushPreview = preview
        }
        return a
    }
}

extension Reader {
    /// A count of items of at least `each` bytes, if the bytes left can hold them.
    mutating func count(each: Int) -> Int? {
        guard let n = u32(), Int(n) <= (bytes.count - offset) / each else { return nil }
        return Int(n)
    }
    mutating func flag() -> Bool? {
        guard let v = u8(), v <= 1 else { return nil }
        return v == 1
    }
    mutating func seqs() -> [UInt64]? {
        guard let n = count(each: 8) else { return nil }
        var out: [UInt64] = []
        out.reserveCapacity(n)
        for _ in 0..<n {
            guard let v = u64() else { return nil }
            out.append(v)
        }
        return out
    }
}

extension Writer {
    mutating func seqs(_ a: [UInt64]) {
        u32(UInt32(a.count))
        for v in a { u64(v) }
    }

    /// Messages of the recall window (pairs and groups): u32 n × (u64 seq | u64 sender | i64 micros).
    mutating func recent(_ a: [Pair.RecentMessage]) {
        u32(UInt32(a.count))
        for m in a {
            u64(m.seq)
            u64(m.sender)
            i64(m.micros)
        }
    }
}

extension Reader {
    mutating func recent() -> [Pair.RecentMessage]? {
        guard let n = count(each: 24) else { return nil }
        var out: [Pair.RecentMessage] = []
        out.reserveCapacity(n)
        for _ in 0..<n {
            guard let seq = u64(), let sender = u64(), let micros = i64() else { return nil }
            out.append(Pair.RecentMessage(seq: seq, sender: sender, micros: micros))
        }
        return out
    }
}

extension Pair {
    func put(_ w: inout Writer) {
        w.u8(relation.rawValue)
        w.text(note)
        w.u8(blockedByLo ? 1 : 0)
        w.u8(blockedByHi ? 1 : 0)
        w.u64(lastSeq)
        w.recent(recent)
        w.seqs(recalled)
        w.seqs(void)
    }

    static func take(_ r: inout Reader) -> Pair? {
        guard let rel = r.u8().flatMap(Relation.init(rawValue:)), let note = r.text(), let lo = r.flag(), let hi = r.flag(), let last = r.u64(),
            let recent = r.recent()
        else { return nil }
        var p = Pair()
        p.relation = rel
        p.note = note
        p.blockedByLo = lo
        p.blockedByHi = hi
        p.lastSeq = last
        p.recent = recent
        guard let recalled = r.seqs(), let void = r.seqs() else { return nil }
        p.recalled = recalled
        p.void = void
        return p
    }
}

extension PeerView {
    /// A user's peers, by peer id ascending.
    static func putAll(_ all: [UInt64: PeerView], _ w: inout Writer) {
        w.u32(UInt32(all.count))
        for peer in all.keys.sorted() {
            guard let v = all[peer] else { continue }
            w.u64(peer)
            w.u8(v.relation.rawValue)
            w.text(v.note)
            w.u8(v.blocked ? 1 : 0)
            w.u64(v.lastSeq)
            w.i64(v.lastMicros)
            w.u64(v.lastMessageID)
            w.u8(v.lastFromMe ? 1 : 0)
            w.u8(v.lastRecalled ? 1 : 0)
            w.u64(v.readSeq)
            w.seqs(v.unread)
            w.u64(v.unreadDropped)
            w.u64(v.lastDroppedSeq)
            w.i64(v.sinceMicros)
            w.u64(v.mentionSeq)
        }
    }

    /// `version`: the snapshot's (before 3 there was no mention mark).
    static func takeAll(_ r: inout Reader, version: UInt32 = MessagingMachine.snapshotVersion) -> [UInt64: PeerView]? {
        guard let n = r.count(each: 60) else { return nil }
        var all: [UInt64: PeerView] = [:]
        all.reserveCapacity(n)
        for _ in 0..<n {
            guard let id = r.u64(), let rel = r.u8().flatMap(Relation.init(rawValue:)), let note = r.text(), let blocked = r.flag(), let ls = r.u64(),
                let lm = r.i64(), let lid = r.u64(), let fromMe = r.flag(), let recalled = r.flag(), let rs = r.u64(), let unread = r.seqs(),
                let dropped = r.u64(), let lds = r.u64(), let since = r.i64()
            else { return nil }
            var v = PeerView()
            v.relation = rel
            v.note = note
            v.blocked = blocked
            v.lastSeq = ls
            v.lastMicros = lm
            v.lastMessageID = lid
            v.lastFromMe = fromMe
            v.lastRecalled = recalled
            v.readSeq = rs
            v.unread = unread
            v.unreadDropped = dropped
            v.lastDroppedSeq = lds
            v.sinceMicros = since
            if version >= 3 {
                guard let m = r.u64() else { return nil }
                v.mentionSeq = m
            }
            all[id] = v
        }
        return all
    }
}
