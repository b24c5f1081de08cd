import WeftCore

/// What a committed messaging record causes in users' inboxes (Docs/messaging.md, "Inbox"): the relay
/// of the shard that committed it writes these records into each user's inbox stream in their home shard
/// (this shard too). Deterministic, from the record alone; the relay skips records apply rejected.
public enum InboxRelay {
    public struct Derived: Sendable, Equatable {
        public var shard: ShardID
        public var stream: StreamID
        public var payload: [UInt8]
    }

    /// `only`: just the entries for that shard (a relay lane's part: a group's fan-out is built once per
    /// lane for its own members, not whole for every lane).
    public static func derive(_ r: Record, source: ShardID, shards: Int, only: ShardID? = nil) -> [Derived] {
        let all = deriveAll(r, source: source, shards: shards, only: only)
        return only.map { d in all.filter { $0.shard == d } } ?? all
    }

    static func deriveAll(_ r: Record, source: ShardID, shards: Int, only: ShardID?) -> [Derived] {
        guard r.type == .messaging, let op = MessagingOp.decode(r.payload), op.stream == r.stream else { return [] }
        func to(_ user: UInt64, _ e: InboxEvent) -> Derived {
            let op = MessagingOp.inbox(user: user, e)
            return Derived(shard: Ids.homeShard(user, shards: shards), stream: op.stream, payload: op.encode())
        }
        switch op {
        case .message(let from, let to_, _, _, _, _, _):
            let id = Ids.messageID(shard: source, index: r.index)
            return [
                to(from, .message(peer: to_, seq: r.seq, fromMe: true, messageID: id)),
                to(to_, .message(peer: from, seq: r.seq, fromMe: false, messageID: id)),
            ]
        case .recall(let by, let other, let seq, let id):
            return [to(by, .recall(peer: other, seq: seq, fromMe: true, messageID: id)), to(other, .recall(peer: by, seq: seq, fromMe: false, messageID: id))]
        case .contactRequest(let from, let to_, let note):
            return [to(from, .contactRequest(peer: to_, fromMe: true, note: "")), to(to_, .contactRequest(peer: from, fromMe: false, note: note))]
        case .contactAccept(let by, let other):
            return [to(by, .contactAccepted(peer: other)), to(other, .contactAccepted(peer: by))]
        case .contactRemove(let by, let other):
            return [to(by, .contactRemoved(peer: other, byMe: true)), to(other, .contactRemoved(peer: by, byMe: false))]
        case .block(let by, let other, let on):
            // Only the blocker's devices learn of it.
            return [to(by, .blocked(peer: other, on: on))]
        case .group(let g):
            // Every member the record names (apply checked them against the group's order); with
            // `only`, those homed on that shard.
            let recipients = only.map { d in g.recipients.filter { Ids.homeShard($0, shards: shards) == d } } ?? g.recipients
            switch g.action {
            case .message(_, _, _, _, _, let mentions, let all):
                let id = Ids.messageID(shard: source, index: r.index)
                return recipients.map { u in
                    let m: Mention = all ? .all : (mentions.contains(u) ? .me : .none)
                    return to(u, .groupMessage(group: g.group, seq: r.seq, sender: g.by, messageID: id, mention: m))
                }
            case .recall(let seq, let id):
                return recipients.map { to($0, .groupRecall(group: g.group, seq: seq, by: g.by, messageID: id)) }
            default:
                guard let change = GroupChange(g.action) else { return [] }
                return recipients.map { to($0, .groupChange(group: g.group, seq: r.seq, by: g.by, change)) }
            }
        case .register, .profile, .revokeTokens, .totp, .inbox, .readMark, .pushPreview, .delivered, .notified:
            return []
        }
    }
}
