import ShardState
import WeftCore

/// The messaging state as bytes (Docs/messaging.md, "Snapshot"): little-endian, maps bucket by bucket
/// with keys sorted in each bucket, so equal states give equal bytes on every replica.
///
/// ```
/// u32 version = 1 | i64 clock | u64 nextLocal | u32 R | R × u64 rejected index
/// u64 A | A × account      (u64 id | text username | text display | blob hash | u64 tokenVersion | u8 totp | blob sealed | i64 created)
/// u64 P | P × pair         (u64 key | u8 relation | text note | u8 blockedLo | u8 blockedHi | u64 lastSeq
///                           | u32 n × (u64 seq | u64 sender | i64 micros) | u32 n × u64 recalled | u32 n × u64 void)
/// u64 U | U × (u64 user | u32 n × peer)   peer: u64 id | u8 relation | text note | u8 blocked | u64 lastSeq | i64 lastMicros
///                           | u64 lastMessageID | u8 lastFromMe | u8 lastRecalled | u64 readSeq | u32 n × u64 unread
///                           | u64 unreadDropped | u64 lastDroppedSeq | i64 since
/// ```
/// (text and blob: u32 length | bytes; usernames are rebuilt from the accounts.)
extension MessagingMachine {
    static let snapshotVersion: UInt32 = 1

    public func snapshot() -> [UInt8] {
        var w = Writer()
        w.u32(Self.snapshotVersion)
        w.i64(clockMicros)
        w.u64(nextLocal)
        w.u32(UInt32(rejectedIndexes.count))
        for i in rejectedIndexes { w.u64(i) }
        w.u64(UInt64(accounts.count))
        Self.sorted(accounts) { _, a in
            w.u64(a.id)
            w.text(a.username)
            w.text(a.displayName)
            w.blob(a.passwordHash)
            w.u64(a.tokenVersion)
            w.u8(a.totpState)
            w.blob(a.totpSealed)
            w.i64(a.createdMicros)
        }
        w.u64(UInt64(pairs.count))
        Self.sorted(pairs) { k, p in
            w.u64(k)
            w.u8(p.relation.rawValue)
            w.text(p.note)
            w.u8(p.blockedByLo ? 1 : 0)
            w.u8(p.blockedByHi ? 1 : 0)
            w.u64(p.lastSeq)
            w.u32(UInt32(p.recent.count))
            for m in p.recent {
                w.u64(m.seq)
                w.u64(m.sender)
                w.i64(m.micros)
            }
            w.u32(UInt32(p.recalled.count))
            for s in p.recalled { w.u64(s) }
            w.u32(UInt32(p.void.count))
            for s in p.void { w.u64(s) }
        }
        w.u64(UInt64(peers.count))
        Self.sorted(peers) { u, all in
            w.u64(u)
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
                w.u32(UInt32(v.unread.count))
                for s in v.unread { w.u64(s) }
                w.u64(v.unreadDropped)
                w.u64(v.lastDroppedSeq)
                w.i64(v.sinceMicros)
            }
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
        func flag() throws -> Bool {
            guard let v = r.u8(), v <= 1 else { throw fail("a flag that is not 0 or 1") }
            return v == 1
        }
        guard let version = r.u32(), version == Self.snapshotVersion else { throw fail("unknown version") }
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
            guard let id = r.u64(), let name = r.text(), let display = r.text(), let hash = r.blob(), let tv = r.u64(), let totp = r.u8(),
                let sealed = r.blob(), let created = r.i64()
            else { throw fail("a short account") }
            accounts[id] = Account(
                id: id, username: name, displayName: display, passwordHash: hash, tokenVersion: tv, totpState: totp, totpSealed: sealed,
                createdMicros: created)
            usernames[Array(name.utf8)] = id
        }
        let pn = try count(r.u64(), each: 35)
        pairs.reserveCapacity(pn)
        for _ in 0..<pn {
            guard let key = r.u64(), let rel = r.u8().flatMap(Pair.Relation.init(rawValue:)), let note = r.text() else { throw fail("a short pair") }
            var p = Pair()
            p.relation = rel
            p.note = note
            p.blockedByLo = try flag()
            p.blockedByHi = try flag()
            guard let last = r.u64() else { throw fail("a short pair") }
            p.lastSeq = last
            for _ in 0..<(try count(r.u32().map(UInt64.init), each: 24)) {
                guard let seq = r.u64(), let sender = r.u64(), let micros = r.i64() else { throw fail("a short recent message") }
                p.recent.append(Pair.RecentMessage(seq: seq, sender: sender, micros: micros))
            }
            for _ in 0..<(try count(r.u32().map(UInt64.init), each: 8)) {
                guard let s = r.u64() else { throw fail("a short recalled seq") }
                p.recalled.append(s)
            }
            for _ in 0..<(try count(r.u32().map(UInt64.init), each: 8)) {
                guard let s = r.u64() else { throw fail("a short void seq") }
                p.void.append(s)
            }
            pairs[key] = p
        }
        let un = try count(r.u64(), each: 12)
        peers.reserveCapacity(un)
        for _ in 0..<un {
            guard let u = r.u64() else { throw fail("a short peer list") }
            let n = try count(r.u32().map(UInt64.init), each: 60)
            var all: [UInt64: PeerView] = [:]
            all.reserveCapacity(n)
            for _ in 0..<n {
                guard let id = r.u64(), let rel = r.u8().flatMap(PeerView.Relation.init(rawValue:)), let note = r.text() else { throw fail("a short peer") }
                var v = PeerView()
                v.relation = rel
                v.note = note
                v.blocked = try flag()
                guard let ls = r.u64(), let lm = r.i64(), let lid = r.u64() else { throw fail("a short peer") }
                v.lastSeq = ls
                v.lastMicros = lm
                v.lastMessageID = lid
                v.lastFromMe = try flag()
                v.lastRecalled = try flag()
                guard let rs = r.u64() else { throw fail("a short peer") }
                v.readSeq = rs
                for _ in 0..<(try count(r.u32().map(UInt64.init), each: 8)) {
                    guard let s = r.u64() else { throw fail("a short unread seq") }
                    v.unread.append(s)
                }
                guard let dropped = r.u64(), let lds = r.u64(), let since = r.i64() else { throw fail("a short peer") }
                v.unreadDropped = dropped
                v.lastDroppedSeq = lds
                v.sinceMicros = since
                all[id] = v
            }
            peers[u] = all
        }
        guard r.atEnd else { throw fail("trailing bytes") }
    }

    /// FNV-1a of the snapshot bytes: they are laid out independently of memory order.
    public var stateHash: UInt64 { FNV1a.hash(snapshot()) }
}
