import ShardState
import WeftCore

/// Where messaging data lives: user ids, stream ids, home shards, message ids (Docs/messaging.md, "Ids").
///
/// ```
/// user id      1 ... 2^31-1, allocated by the username's shard s as n·shards + s: id % shards == s,
///              so the shard that keeps the username is the user's home shard (the seed's user % shards)
/// stream ids   0b00…  raw log streams (operator API)
///              0b01 | kind(22 bits) | id  per-user and per-shard streams: inbox(u), account(u), registry,
///                                        and group(g): a group's changes and messages, in one order
///              0b10 | lo(31) | hi(31)    dm(a, b): the conversation's messages
///              0b11 | lo(31) | hi(31)    pair(a, b): the pair's contact requests, blocks, recalls
/// message id   shard << 43 | log index of the message record  (< 2^53: a JSON number)
/// group id     2^32 ... 2^40-1, drawn at random by the creating node (a taken id is refused and redrawn);
///              its home shard is id % shards
/// ```
public enum Ids {
    /// User ids are below 2^31 (two fit in a stream id with its kind bits).
    public static let userIDMax: UInt64 = (1 << 31) - 1
    /// Shards at most (message ids keep the shard in 10 bits).
    public static let shardsMax = 1024
    /// Log indexes a message id can name (2^43: 8.8 × 10^12 records per shard).
    public static let messageIndexMax: UInt64 = (1 << 43) - 1

    static let userKind: UInt64 = 1 << 62
    static let dmKind: UInt64 = 2 << 62
    static let pairKind: UInt64 = 3 << 62

    public static func inbox(_ user: UInt64) -> StreamID { StreamID(userKind | user) }
    public static func account(_ user: UInt64) -> StreamID { StreamID(userKind | 1 << 40 | user) }
    /// The user of an inbox stream; nil for other streams.
    public static func inboxUser(_ s: StreamID) -> UInt64? {
        let v = s.rawValue
        guard v >> 62 == 1, (v & ~userKind) >> 40 == 0, isUserID(v & userIDMax), v & ~userKind <= userIDMax else { return nil }
        return v & userIDMax
    }
    /// Each shard's registrations (usernames that hash to it).
    public static let registry = StreamID(userKind | 2 << 40)

    /// Group ids: above every user id (so a user's conversation views key both by id), 40 bits.
    public static let groupIDMin: UInt64 = 1 << 32
    public static let groupIDMax: UInt64 = (1 << 40) - 1
    public static func isGroupID(_ g: UInt64) -> Bool { g >= groupIDMin && g <= groupIDMax }
    public static func group(_ g: UInt64) -> StreamID { StreamID(userKind | 3 << 40 | g) }
    /// The group of a group stream; nil for other streams.
    public static func groupOf(_ s: StreamID) -> UInt64? {
        let v = s.rawValue
        guard v >> 62 == 1, (v & ~userKind) >> 40 == 3, isGroupID(v & groupIDMax) else { return nil }
        return v & groupIDMax
    }
    public static func groupShard(_ g: UInt64, shards: Int) -> ShardID { ShardID(g % UInt64(max(1, shards))) }
    /// A group's conversation as clients name it: `g<id>`.
    public static func groupConversationID(_ g: UInt64) -> String { "g\(g)" }
    public static func parseGroupConversationID(_ s: String) -> UInt64? {
        guard s.first == "g", s.count <= 14, s.dropFirst().allSatisfy({ $0.isASCII && $0.isNumber }), let g = UInt64(s.dropFirst()), isGroupID(g),
            groupConversationID(g) == s
        else { return nil }
        return g
    }

    public static func dm(_ a: UInt64, _ b: UInt64) -> StreamID { StreamID(dmKind | min(a, b) << 31 | max(a, b)) }
    /// Whether a stream is a 1:1 conversation's messages.
    public static func isDMStream(_ s: StreamID) -> Bool { s.rawValue >> 62 == dmKind >> 62 }
    public static func pair(_ a: UInt64, _ b: UInt64) -> StreamID { StreamID(pairKind | min(a, b) << 31 | max(a, b)) }
    /// The two users of a dm or pair stream (lo < hi); nil for other streams.
    public static func users(of stream: StreamID) -> (lo: UInt64, hi: UInt64)? {
        let s = stream.rawValue
        guard s >> 62 >= 2 else { return nil }
        return ((s >> 31) & userIDMax, s & userIDMax)
    }
    /// The key of a pair in maps: lo << 32 | hi.
    public static func pairKey(_ a: UInt64, _ b: UInt64) -> UInt64 { min(a, b) << 32 | max(a, b) }

    public static func isUserID(_ u: UInt64) -> Bool { u >= 1 && u <= userIDMax }

    public static func homeShard(_ user: UInt64, shards: Int) -> ShardID { ShardID(user % UInt64(max(1, shards))) }
    /// The shard of a pair's conversation: the home shard of its lower user id. So that user's inbox
    /// entry of each message is written in the same Raft round as the message (Docs/messaging.md, "Where
    /// things live"); until stop 30 it was a hash of the pair, which put every message one round from
    /// both inboxes.
    public static func pairShard(_ a: UInt64, _ b: UInt64, shards: Int) -> ShardID {
        homeShard(min(a, b), shards: shards)
    }
    /// The shard that keeps a (normalised) username and allocates its user's id.
    public static func usernameShard(_ name: String, shards: Int) -> ShardID {
        ShardID(FNV1a.hash(Array(name.utf8)) % UInt64(max(1, shards)))
    }

    public static func messageID(shard: ShardID, index: LogIndex) -> UInt64 {
        precondition(index <= messageIndexMax && shard.rawValue < UInt64(shardsMax), "message id out of range: shard \(shard), index \(index)")
        return shard.rawValue << 43 | index
    }
    public static func parseMessageID(_ id: UInt64, shards: Int) -> (shard: ShardID, index: LogIndex)? {
        let shard = id >> 43
        let index = id & messageIndexMax
        guard shard < UInt64(shards), index >= 1 else { return nil }
        return (ShardID(shard), index)
    }

    /// A conversation as clients name it: `d<lo>-<hi>` for the dm of two users.
    public static func conversationID(_ a: UInt64, _ b: UInt64) -> String { "d\(min(a, b))-\(max(a, b))" }
    public static func parseConversationID(_ s: String) -> (lo: UInt64, hi: UInt64)? {
        guard s.first == "d" else { return nil }
        let parts = s.dropFirst().split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 2, parts.allSatisfy({ !$0.isEmpty && $0.count <= 10 && $0.allSatisfy(\.isASCII) && $0.allSatisfy(\.isNumber) }),
            let lo = UInt64(parts[0]), let hi = UInt64(parts[1]), isUserID(lo), isUserID(hi), lo < hi,
            conversationID(lo, hi) == s
        else { return nil }
        return (lo, hi)
    }

    /// Usernames: 3...32 of `a-z 0-9 _ .`, starting with a letter (stored lowercased: unique regardless of case).
    public static func normalisedUsername(_ s: String) -> String? {
        // ASCII before lowercasing: "K" (Kelvin) must not become "k".
        guard s.utf8.allSatisfy({ $0 < 0x80 }) else { return nil }
        let n = s.lowercased()
        let u = Array(n.utf8)
        guard (3...32).contains(u.count), let f = u.first, (97...122).contains(f),
            u.allSatisfy({ (97...122).contains($0) || (48...57).contains($0) || $0 == 95 || $0 == 46 })
        else { return nil }
        return n
    }
}
