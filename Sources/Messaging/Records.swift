import WeftCore

/// What a user sends: the seed's `message_type`.
public enum MessageKind: UInt8, Sendable, CaseIterable {
    case text = 1, image = 2, video = 3, audio = 4, file = 5
    public var name: String {
        switch self {
        case .text: "text"
        case .image: "image"
        case .video: "video"
        case .audio: "audio"
        case .file: "file"
        }
    }
    public init?(name: String) {
        guard let k = Self.allCases.first(where: { $0.name == name }) else { return nil }
        self = k
    }
}

/// An event in a user's inbox (their multi-device sync stream).
public enum InboxEvent: Sendable, Equatable {
    /// A message in the dm with `peer` (sent by the user when `fromMe`).
    case message(peer: UInt64, seq: StreamSeq, fromMe: Bool, messageID: UInt64)
    /// That message was recalled by its sender.
    case recall(peer: UInt64, seq: StreamSeq, fromMe: Bool, messageID: UInt64)
    /// A contact request: sent by the user (`fromMe`) or to them, with its note.
    case contactRequest(peer: UInt64, fromMe: Bool, note: String)
    case contactAccepted(peer: UInt64)
    case contactRemoved(peer: UInt64, byMe: Bool)
    /// The user blocked (`on`) or unblocked `peer` (only in the blocker's inbox).
    case blocked(peer: UInt64, on: Bool)
    /// The user read the dm with `peer` (or the group `peer`) up to `seq` (on one of their devices).
    case read(peer: UInt64, seq: StreamSeq)
    /// A message in a group (sent by the user when `sender` is them); `mention`: whether it names them.
    case groupMessage(group: UInt64, seq: StreamSeq, sender: UInt64, messageID: UInt64, mention: Mention)
    case groupRecall(group: UInt64, seq: StreamSeq, by: UInt64, messageID: UInt64)
    /// A change to a group the user is (or was, for a removal) a member of: record `seq` of its stream.
    case groupChange(group: UInt64, seq: StreamSeq, by: UInt64, GroupChange)
}

/// The operations of messaging records. Each names the stream it goes to; `encode` gives the payload.
public enum MessagingOp: Sendable, Equatable {
    /// In the username's shard (stream `Ids.registry`): allocates the user id → accepted(u64 id).
    /// `shard`/`shards`: the username's shard (checked against its hash) and the cluster's shard count.
    case register(username: String, displayName: String, passwordHash: [UInt8], shard: UInt64, shards: UInt64)
    case profile(user: UInt64, displayName: String)
    /// Revokes every token issued so far (logout everywhere).
    case revokeTokens(user: UInt64)
    /// TOTP state: 0 off, 1 enrolling (secret set, not confirmed), 2 on. `sealed`: the secret, encrypted.
    case totp(user: UInt64, state: UInt8, sealed: [UInt8])
    case contactRequest(from: UInt64, to: UInt64, note: String)
    case contactAccept(by: UInt64, other: UInt64)
    case contactRemove(by: UInt64, other: UInt64)
    case block(by: UInt64, other: UInt64, on: Bool)
    case message(from: UInt64, to: UInt64, kind: MessageKind, content: String, mediaURL: String, mimeType: String, size: UInt64)
    case recall(by: UInt64, other: UInt64, seq: StreamSeq, messageID: UInt64)
    /// Written by relays into the user's inbox stream (its home shard).
    case inbox(user: UInt64, InboxEvent)
    /// Written by the user's request into their own inbox stream.
    case readMark(user: UInt64, peer: UInt64, seq: StreamSeq)
    /// Whether offline notifications may carry the message text (Docs/delivery.md, "Offline push").
    case pushPreview(user: UInt64, on: Bool)
    /// One of the user's devices acknowledged its inbox up to `seq` (coalesced by the session's node).
    case delivered(user: UInt64, seq: StreamSeq)
    /// The push worker notified the user's inbox events up to `seq` (the webhook answered 2xx).
    case notified(user: UInt64, seq: StreamSeq)
    /// A group's change or message, in the group's stream (Docs/groups.md).
    case group(GroupOp)

    /// The first payload byte of a 1:1 message record.
    public static let messageCode: UInt8 = 14
    /// The same message, written by a leader that put the inbox entries it derives for its own shard right
    /// after it (Docs/state.md, "Inline relay records"); decodes as `.message`.
    public static let messageInlineCode: UInt8 = 24

    var code: UInt8 {
        switch self {
        case .register: 1
        case .profile: 2
        case .revokeTokens: 3
        case .totp: 5
        case .contactRequest: 10
        case .contactAccept: 11
        case .contactRemove: 12
        case .block: 13
        case .message: Self.messageCode
        case .recall: 15
        case .inbox: 20
        case .readMark: 21
        case .pushPreview: 4
        case .delivered: 22
        case .notified: 23
        case .group: 30
        }
    }

    /// The stream the record belongs in.
    public var stream: StreamID {
        switch self {
        case .register: Ids.registry
        case .profile(let u, _), .revokeTokens(let u), .totp(let u, _, _), .pushPreview(let u, _), .delivered(let u, _), .notified(let u, _):
            Ids.account(u)
        case .contactRequest(let a, let b, _), .contactAccept(let a, let b), .contactRemove(let a, let b), .block(let a, let b, _),
            .recall(let a, let b, _, _):
            Ids.pair(a, b)
        case .message(let a, let b, _, _, _, _, _): Ids.dm(a, b)
        case .inbox(let u, _), .readMark(let u, _, _): Ids.inbox(u)
        case .group(let op): Ids.group(op.group)
        }
    }

    public func encode() -> [UInt8] {
        var w = Writer()
        w.u8(code)
        switch self {
        case .register(let name, let display, let hash, let shard, let shards):
            w.text(name)
            w.text(display)
            w.blob(hash)
            w.u64(shard)
            w.u64(shards)
        case .profile(let u, let display):
            w.u64(u)
            w.text(display)
        case .revokeTokens(let u):
            w.u64(u)
        case .totp(let u, let state, let sealed):
            w.u64(u)
            w.u8(state)
            w.blob(sealed)
        case .contactRequest(let from, let to, let note):
            w.u64(from)
            w.u64(to)
            w.text(note)
        case .contactAccept(let a, let b), .contactRemove(let a, let b):
            w.u64(a)
            w.u64(b)
        case .block(let a, let b, let on):
            w.u64(a)
            w.u64(b)
            w.u8(on ? 1 : 0)
        case .message(let from, let to, let kind, let content, let url, let mime, let size):
            w.u64(from)
            w.u64(to)
            w.u8(kind.rawValue)
            w.text(content)
            w.text(url)
            w.text(mime)
            w.u64(size)
        case .recall(let by, let other, let seq, let id):
            w.u64(by)
            w.u64(other)
            w.u64(seq)
            w.u64(id)
        case .inbox(let u, let e):
            w.u64(u)
            switch e {
            case .message(let p, let seq, let fromMe, let id), .recall(let p, let seq, let fromMe, let id):
                if case .message = e { w.u8(1) } else { w.u8(2) }
                w.u64(p)
                w.u64(seq)
                w.u8(fromMe ? 1 : 0)
                w.u64(id)
            case .contactRequest(let p, let fromMe, let note):
                w.u8(3)
                w.u64(p)
                w.u8(fromMe ? 1 : 0)
                w.text(note)
            case .contactAccepted(let p):
                w.u8(4)
                w.u64(p)
            case .contactRemoved(let p, let byMe):
                w.u8(5)
                w.u64(p)
                w.u8(byMe ? 1 : 0)
            case .blocked(let p, let on):
                w.u8(6)
                w.u64(p)
                w.u8(on ? 1 : 0)
            case .read(let p, let seq):
                w.u8(7)
                w.u64(p)
                w.u64(seq)
            case .groupMessage(let g, let seq, let sender, let id, let mention):
                w.u8(8)
                w.u64(g)
                w.u64(seq)
                w.u64(sender)
                w.u64(id)
                w.u8(mention.rawValue)
            case .groupRecall(let g, let seq, let by, let id):
                w.u8(9)
                w.u64(g)
                w.u64(seq)
                w.u64(by)
                w.u64(id)
            case .groupChange(let g, let seq, let by, let change):
                w.u8(10)
                w.u64(g)
                w.u64(seq)
                w.u64(by)
                change.put(&w)
            }
        case .readMark(let u, let p, let seq):
            w.u64(u)
            w.u64(p)
            w.u64(seq)
        case .pushPreview(let u, let on):
            w.u64(u)
            w.u8(on ? 1 : 0)
        case .delivered(let u, let seq), .notified(let u, let seq):
            w.u64(u)
            w.u64(seq)
        case .group(let op):
            op.put(&w)
        }
        return w.bytes
    }

    /// The operation in a payload; nil when it is not one (apply rejects it as malformed).
    public static func decode(_ payload: [UInt8]) -> MessagingOp? {
        var r = Reader(payload)
        guard let code = r.u8() else { return nil }
        let op: MessagingOp?
        switch code {
        case 1:
            guard let n = r.text(), let d = r.text(), let h = r.blob(), let shard = r.u64(), let shards = r.u64() else { return nil }
            op = .register(username: n, displayName: d, passwordHash: h, shard: shard, shards: shards)
        case 2:
            guard let u = r.u64(), let d = r.text() else { return nil }
            op = .profile(user: u, displayName: d)
        case 3:
            guard let u = r.u64() else { return nil }
            op = .revokeTokens(user: u)
        case 5:
            guard let u = r.u64(), let s = r.u8(), s <= 2, let sealed = r.blob() else { return nil }
            op = .totp(user: u, state: s, sealed: sealed)
        case 10:
            guard let a = r.u64(), let b = r.u64(), let note = r.text() else { return nil }
            op = .contactRequest(from: a, to: b, note: note)
        case 11, 12:
            guard let a = r.u64(), let b = r.u64() else { return nil }
            op = code == 11 ? .contactAccept(by: a, other: b) : .contactRemove(by: a, other: b)
        case 13:
            guard let a = r.u64(), let b = r.u64(), let on = r.u8(), on <= 1 else { return nil }
            op = .block(by: a, other: b, on: on == 1)
        case 14, 24:
            guard let a = r.u64(), let b = r.u64(), let k = r.u8().flatMap(MessageKind.init(rawValue:)), let c = r.text(), let url = r.text(),
                let mime = r.text(), let size = r.u64()
            else { return nil }
            op = .message(from: a, to: b, kind: k, content: c, mediaURL: url, mimeType: mime, size: size)
        case 15:
            guard let a = r.u64(), let b = r.u64(), let seq = r.u64(), let id = r.u64() else { return nil }
            op = .recall(by: a, other: b, seq: seq, messageID: id)
        case 20:
            guard let u = r.u64(), let kind = r.u8() else { return nil }
            let e: InboxEvent?
            switch kind {
            case 1, 2:
                guard let p = r.u64(), let seq = r.u64(), let f = r.u8(), f <= 1, let id = r.u64() else { return nil }
                e = kind == 1 ? .message(peer: p, seq: seq, fromMe: f == 1, messageID: id) : .recall(peer: p, seq: seq, fromMe: f == 1, messageID: id)
            case 3:
                guard let p = r.u64(), let f = r.u8(), f <= 1, let note = r.text() else { return nil }
                e = .contactRequest(peer: p, fromMe: f == 1, note: note)
            case 4:
                guard let p = r.u64() else { return nil }
                e = .contactAccepted(peer: p)
            case 5, 6:
                guard let p = r.u64(), let f = r.u8(), f <= 1 else { return nil }
                e = kind == 5 ? .contactRemoved(peer: p, byMe: f == 1) : .blocked(peer: p, on: f == 1)
            case 7:
                guard let p = r.u64(), let seq = r.u64() else { return nil }
                e = .read(peer: p, seq: seq)
            case 8:
                guard let g = r.u64(), let seq = r.u64(), let sender = r.u64(), let id = r.u64(), let m = r.u8().flatMap(Mention.init(rawValue:)) else {
                    return nil
                }
                e = .groupMessage(group: g, seq: seq, sender: sender, messageID: id, mention: m)
            case 9:
                guard let g = r.u64(), let seq = r.u64(), let by = r.u64(), let id = r.u64() else { return nil }
                e = .groupRecall(group: g, seq: seq, by: by, messageID: id)
            case 10:
                guard let g = r.u64(), let seq = r.u64(), let by = r.u64(), let change = GroupChange.take(&r) else { return nil }
                e = .groupChange(group: g, seq: seq, by: by, change)
            default:
                e = nil
            }
            guard let e else { return nil }
            op = .inbox(user: u, e)
        case 21:
            guard let u = r.u64(), let p = r.u64(), let seq = r.u64() else { return nil }
            op = .readMark(user: u, peer: p, seq: seq)
        case 4:
            guard let u = r.u64(), let on = r.u8(), on <= 1 else { return nil }
            op = .pushPreview(user: u, on: on == 1)
        case 22, 23:
            guard let u = r.u64(), let seq = r.u64() else { return nil }
            op = code == 22 ? .delivered(user: u, seq: seq) : .notified(user: u, seq: seq)
        case 30:
            op = GroupOp.take(&r).map { .group($0) }
        default:
            op = nil
        }
        guard r.atEnd else { return nil }
        return op
    }
}

/// Little-endian writing of record and snapshot fields.
struct Writer {
    var bytes: [UInt8] = []
    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func i64(_ v: Int64) { u64(UInt64(bitPattern: v)) }
    mutating func blob(_ b: [UInt8]) {
        u32(UInt32(clamping: b.count))
        bytes += b
    }
    mutating func text(_ s: String) { blob(Array(s.utf8)) }
}

/// Little-endian reading; nil past the end or at a length that does not fit.
struct Reader {
    let bytes: [UInt8]
    var offset = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    var atEnd: Bool { offset == bytes.count }
    mutating func u8() -> UInt8? {
        guard offset < bytes.count else { return nil }
        defer { offset += 1 }
        return bytes[offset]
    }
    mutating func int<T: FixedWidthInteger>(_: T.Type) -> T? {
        let n = MemoryLayout<T>.size
        guard offset + n <= bytes.count else { return nil }
        var v: T = 0
        for k in 0..<n { v |= T(bytes[offset + k]) << (8 * k) }
        offset += n
        return v
    }
    mutating func u32() -> UInt32? { int(UInt32.self) }
    mutating func u64() -> UInt64? { int(UInt64.self) }
    mutating func i64() -> Int64? { u64().map { Int64(bitPattern: $0) } }
    mutating func blob() -> [UInt8]? {
        guard let n = u32(), Int(n) <= bytes.count - offset else { return nil }
        defer { offset += Int(n) }
        return Array(bytes[offset..<(offset + Int(n))])
    }
    mutating func text() -> String? {
        guard let b = blob() else { return nil }
        return String(validating: b, as: UTF8.self)
    }
}
