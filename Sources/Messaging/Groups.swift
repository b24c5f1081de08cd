import ShardState
import WeftCore

/// Group chats (Docs/groups.md): a group's changes and messages are records of one stream,
/// `Ids.group(g)`, in the group's home shard, so they have one total order. Each record names the
/// members it reaches (`recipients`); apply checks that list against the members at that point of the
/// group's order, so "who receives message m" is decided by the order, never by timing, and the relay
/// derives every member's inbox entry from the record alone.

public enum GroupLimits {
    /// Members of a group at most unless `[messaging] group_members_max` says otherwise (WeChat's 500).
    public static let membersDefault = 500
    /// The most any configuration may allow (a record names every member).
    public static let membersMax = 5_000
    /// Users one add brings in: every member's event names them all, so an add costs members × added
    /// × 8 bytes of inbox records (5 000 × 100 × 8 = 4 MB at most, well inside one relay batch).
    public static let addMax = 100
    public static let nameBytesMax = 64
    public static let noticeBytesMax = 1024
    /// Users named in one message's mentions.
    public static let mentionsMax = 100
}

public enum GroupRole: UInt8, Sendable, Equatable {
    case member = 0, admin = 1, owner = 2
    public var name: String {
        switch self {
        case .member: "member"
        case .admin: "admin"
        case .owner: "owner"
        }
    }
    /// Owner and admins manage the group.
    public var manages: Bool { self != .member }
}

public struct GroupMember: Sendable, Equatable {
    public var role: GroupRole
    /// The seq of the record that made them a member: they see the group's messages after it.
    public var joinedSeq: StreamSeq
    public var joinedMicros: Int64
}

/// A group as its home shard knows it.
public struct Group: Sendable, Equatable {
    public var name: String
    public var notice: String = ""
    public var owner: UInt64
    public var createdMicros: Int64
    public var dissolved = false
    public var members: [UInt64: GroupMember] = [:]
    /// The last seq of the group's stream (every record, accepted or not).
    public var lastSeq: StreamSeq = 0
    /// Messages of the last two minutes (for recall), recalled message seqs and the seqs of records
    /// apply refused (readers skip them), ascending.
    public var recent: [Pair.RecentMessage] = []
    public var recalled: [StreamSeq] = []
    public var void: [StreamSeq] = []

    public init(name: String, owner: UInt64, createdMicros: Int64) {
        self.name = name
        self.owner = owner
        self.createdMicros = createdMicros
    }

    /// The members in ascending id order: what a record's `recipients` must equal.
    public var recipients: [UInt64] { members.keys.sorted() }
    public func role(of u: UInt64) -> GroupRole? { members[u]?.role }
    public func isRecalled(_ seq: StreamSeq) -> Bool { Pair.contains(recalled, seq) }
    public func isVoid(_ seq: StreamSeq) -> Bool { Pair.contains(void, seq) }
}

/// What a group record does.
public enum GroupAction: Sendable, Equatable {
    /// `members`: the others (not the owner, who is `by`); `limit`: the member limit the writer's
    /// configuration set (in the record, so every replica checks the same one).
    case create(name: String, members: [UInt64], limit: UInt32)
    /// By any member: `users` join.
    case add(users: [UInt64], limit: UInt32)
    /// `user` leaves (when `by` is `user`) or is removed by the owner or an admin.
    case remove(user: UInt64)
    /// By the owner: `user` becomes an admin or a plain member.
    case role(user: UInt64, admin: Bool)
    case rename(String)
    case notice(String)
    /// By the owner: `to` becomes the owner, the old owner a plain member.
    case transfer(to: UInt64)
    case dissolve
    /// `mentions`: members named with @; `mentionAll`: @all (owner and admins only).
    case message(kind: MessageKind, content: String, mediaURL: String, mimeType: String, size: UInt64, mentions: [UInt64], mentionAll: Bool)
    /// By the sender within two minutes, or by the owner or an admin (same window: the state keeps two minutes).
    case recall(seq: StreamSeq, messageID: UInt64)

    var code: UInt8 {
        switch self {
        case .create: 1
        case .add: 2
        case .remove: 3
        case .role: 4
        case .rename: 5
        case .notice: 6
        case .transfer: 7
        case .dissolve: 8
        case .message: 9
        case .recall: 10
        }
    }

    /// Whether the recipients are the members before the change (they include whoever leaves).
    var reachesFormerMembers: Bool {
        switch self {
        case .remove, .dissolve: true
        default: false
        }
    }
}

/// One group record: `by` does `action` in `group`, reaching `recipients` (ascending, no repeats).
public struct GroupOp: Sendable, Equatable {
    public var group: UInt64
    public var by: UInt64
    public var action: GroupAction
    public var recipients: [UInt64]

    public init(group: UInt64, by: UInt64, action: GroupAction, recipients: [UInt64]) {
        self.group = group
        self.by = by
        self.action = action
        self.recipients = recipients
    }

    func put(_ w: inout Writer) {
        w.u64(group)
        w.u64(by)
        w.u8(action.code)
        switch action {
        case .create(let name, let members, let limit):
            w.text(name)
            w.seqs(members)
            w.u32(limit)
        case .add(let users, let limit):
            w.seqs(users)
            w.u32(limit)
        case .remove(let u), .transfer(let u):
            w.u64(u)
        case .role(let u, let admin):
            w.u64(u)
            w.u8(admin ? 1 : 0)
        case .rename(let t), .notice(let t):
            w.text(t)
        case .dissolve:
            break
        case .message(let kind, let content, let url, let mime, let size, let mentions, let all):
            w.u8(kind.rawValue)
            w.text(content)
            w.text(url)
            w.text(mime)
            w.u64(size)
            w.seqs(mentions)
            w.u8(all ? 1 : 0)
        case .recall(let seq, let id):
            w.u64(seq)
            w.u64(id)
        }
        w.seqs(recipients)
    }

    static func take(_ r: inout Reader) -> GroupOp? {
        guard let g = r.u64(), let by = r.u64(), let code = r.u8() else { return nil }
        let action: GroupAction
        switch code {
        case 1:
            guard let name = r.text(), let members = r.seqs(), let limit = r.u32() else { return nil }
            action = .create(name: name, members: members, limit: limit)
        case 2:
            guard let users = r.seqs(), let limit = r.u32() else { return nil }
            action = .add(users: users, limit: limit)
        case 3, 7:
            guard let u = r.u64() else { return nil }
            action = code == 3 ? .remove(user: u) : .transfer(to: u)
        case 4:
            guard let u = r.u64(), let admin = r.flag() else { return nil }
            action = .role(user: u, admin: admin)
        case 5, 6:
            guard let t = r.text() else { return nil }
            action = code == 5 ? .rename(t) : .notice(t)
        case 8:
            action = .dissolve
        case 9:
            guard let k = r.u8().flatMap(MessageKind.init(rawValue:)), let c = r.text(), let url = r.text(), let mime = r.text(), let size = r.u64(),
                let mentions = r.seqs(), let all = r.flag()
            else { return nil }
            action = .message(kind: k, content: c, mediaURL: url, mimeType: mime, size: size, mentions: mentions, mentionAll: all)
        case 10:
            guard let seq = r.u64(), let id = r.u64() else { return nil }
            action = .recall(seq: seq, messageID: id)
        default:
            return nil
        }
        guard let recipients = r.seqs() else { return nil }
        return GroupOp(group: g, by: by, action: action, recipients: recipients)
    }
}

/// A change to a group as its members' inboxes tell it.
public enum GroupChange: Sendable, Equatable {
    case created(name: String)
    case added([UInt64])
    /// `user` left (when it is the change's `by`) or was removed.
    case removed(UInt64)
    case role(user: UInt64, admin: Bool)
    case renamed(String)
    case notice(String)
    case transferred(to: UInt64)
    case dissolved

    public var name: String {
        switch self {
        case .created: "group_created"
        case .added: "group_members_added"
        case .removed: "group_member_removed"
        case .role: "group_role_changed"
        case .renamed: "group_renamed"
        case .notice: "group_notice"
        case .transferred: "group_owner_changed"
        case .dissolved: "group_dissolved"
        }
    }

    /// The change a (non-message) action makes; nil for messages and recalls.
    init?(_ a: GroupAction) {
        switch a {
        case .create(let name, _, _): self = .created(name: name)
        case .add(let users, _): self = .added(users)
        case .remove(let u): self = .removed(u)
        case .role(let u, let admin): self = .role(user: u, admin: admin)
        case .rename(let t): self = .renamed(t)
        case .notice(let t): self = .notice(t)
        case .transfer(let to): self = .transferred(to: to)
        case .dissolve: self = .dissolved
        case .message, .recall: return nil
        }
    }

    func put(_ w: inout Writer) {
        switch self {
        case .created(let name):
            w.u8(1)
            w.text(name)
        case .added(let users):
            w.u8(2)
            w.seqs(users)
        case .removed(let u):
            w.u8(3)
            w.u64(u)
        case .role(let u, let admin):
            w.u8(4)
            w.u64(u)
            w.u8(admin ? 1 : 0)
        case .renamed(let t):
            w.u8(5)
            w.text(t)
        case .notice(let t):
            w.u8(6)
            w.text(t)
        case .transferred(let to):
            w.u8(7)
            w.u64(to)
        case .dissolved:
            w.u8(8)
        }
    }

    static func take(_ r: inout Reader) -> GroupChange? {
        switch r.u8() {
        case 1: return r.text().map { .created(name: $0) }
        case 2: return r.seqs().map { .added($0) }
        case 3: return r.u64().map { .removed($0) }
        case 4:
            guard let u = r.u64(), let admin = r.flag() else { return nil }
            return .role(user: u, admin: admin)
        case 5: return r.text().map { .renamed($0) }
        case 6: return r.text().map { .notice($0) }
        case 7: return r.u64().map { .transferred(to: $0) }
        case 8: return .dissolved
        default: return nil
        }
    }
}

/// How a group message names an inbox's user.
public enum Mention: UInt8, Sendable, Equatable {
    case none = 0, me = 1, all = 2
}

extension MessagingMachine {
    public func group(_ g: UInt64) -> Group? { groups[g] }

    static func ascendingDistinct(_ a: [UInt64]) -> Bool { zip(a, a.dropFirst()).allSatisfy { $0 < $1 } }

    /// Field limits of a group operation, the same at the API and in apply.
    static func checkGroup(_ op: GroupOp) -> ApplyOutcome? {
        guard Ids.isGroupID(op.group), Ids.isUserID(op.by) else { return reject("malformed", "a group or user id out of range") }
        guard ascendingDistinct(op.recipients), op.recipients.allSatisfy(Ids.isUserID), op.recipients.count <= GroupLimits.membersMax + 1 else {
            return reject("malformed", "recipients are ascending user ids")
        }
        func name(_ t: String) -> Bool { !t.isEmpty && t.utf8.count <= GroupLimits.nameBytesMax }
        switch op.action {
        case .create(let n, let members, let limit):
            guard name(n) else { return reject("malformed", "group name length") }
            guard ascendingDistinct(members), members.allSatisfy(Ids.isUserID), !members.contains(op.by) else {
                return reject("malformed", "members are ascending user ids other than the owner's")
            }
            guard limit >= 2, limit <= UInt32(GroupLimits.membersMax) else { return reject("malformed", "member limit") }
        case .add(let users, let limit):
            guard !users.isEmpty, users.count <= GroupLimits.addMax, ascendingDistinct(users), users.allSatisfy(Ids.isUserID) else {
                return reject("malformed", "1-\(GroupLimits.addMax) users, ascending user ids")
            }
            guard limit >= 2, limit <= UInt32(GroupLimits.membersMax) else { return reject("malformed", "member limit") }
        case .remove(let u), .transfer(let u), .role(let u, _):
            guard Ids.isUserID(u) else { return reject("malformed", "a user id out of range") }
        case .rename(let t):
            guard name(t) else { return reject("malformed", "group name length") }
        case .notice(let t):
            guard t.utf8.count <= GroupLimits.noticeBytesMax else { return reject("malformed", "notice length") }
        case .dissolve, .recall:
            break
        case .message(let kind, let content, let url, let mime, _, let mentions, _):
            if let bad = checkMessageFields(kind: kind, content: content, url: url, mime: mime) { return bad }
            guard mentions.count <= GroupLimits.mentionsMax, ascendingDistinct(mentions), mentions.allSatisfy(Ids.isUserID) else {
                return reject("malformed", "mentions are at most \(GroupLimits.mentionsMax) ascending user ids")
            }
        }
        return nil
    }

    /// Whether `op` may apply to the group's state now (nil: it may). The same function admits on the
    /// leader (against applied state) and decides in apply.
    func admitGroup(_ op: GroupOp, at micros: Int64) -> ApplyOutcome? {
        if case .create(_, let members, let limit) = op.action {
            guard groups[op.group] == nil else { return Self.reject("group_exists", "the group id is taken") }
            guard members.count + 1 <= Int(limit) else { return Self.reject("group_full", "a group has at most \(limit) members") }
            guard op.recipients == ([op.by] + members).sorted() else { return Self.reject("group_changed", "the recipients are not the members") }
            return nil
        }
        guard let g = groups[op.group], let byRole = g.role(of: op.by) else { return Self.reject("not_member", "you are not a member of this group") }
        guard !g.dissolved else { return Self.reject("group_dissolved", "the group was dissolved") }
        var after = g.recipients
        switch op.action {
        case .create:
            return nil
        case .add(let users, let limit):
            guard users.allSatisfy({ g.members[$0] == nil }) else { return Self.reject("already_member", "a user is already a member") }
            guard g.members.count + users.count <= Int(limit) else { return Self.reject("group_full", "a group has at most \(limit) members") }
            after = (after + users).sorted()
        case .remove(let u):
            guard let role = g.role(of: u) else { return Self.reject("not_member", "that user is not a member") }
            if u == op.by {
                guard role != .owner else { return Self.reject("owner_cannot_leave", "the owner transfers the group or dissolves it first") }
            } else {
                // The owner removes anyone; an admin removes plain members only.
                guard byRole == .owner || (byRole == .admin && role == .member) else {
                    return Self.reject("not_allowed", "only the owner or an admin removes members (an admin only plain members)")
                }
            }
        case .role(let u, _):
            guard byRole == .owner else { return Self.reject("not_allowed", "only the owner sets roles") }
            guard let role = g.role(of: u), role != .owner else { return Self.reject("not_member", "that user is not a member other than the owner") }
        case .rename, .notice:
            guard byRole.manages else { return Self.reject("not_allowed", "only the owner or an admin changes the group's name and notice") }
        case .transfer(let to):
            guard byRole == .owner else { return Self.reject("not_allowed", "only the owner transfers the group") }
            guard to != op.by, g.members[to] != nil else { return Self.reject("not_member", "the new owner must be another member") }
        case .dissolve:
            guard byRole == .owner else { return Self.reject("not_allowed", "only the owner dissolves the group") }
        case .message(_, _, _, _, _, let mentions, let all):
            guard !all || byRole.manages else { return Self.reject("not_allowed", "only the owner or an admin mentions everyone") }
            guard mentions.allSatisfy({ g.members[$0] != nil }) else { return Self.reject("invalid_mention", "a mentioned user is not a member") }
        case .recall(let seq, _):
            // The owner recalls anyone's, an admin a plain member's (or a former member's), everyone their own.
            guard let m = g.recent.first(where: { $0.seq == seq }), !g.isRecalled(seq), micros - m.micros <= MessagingLimits.recallWindowMicros,
                m.sender == op.by || byRole == .owner || (byRole == .admin && (g.role(of: m.sender) ?? .member) == .member)
            else {
                return Self.reject("not_recallable", "messages of the last two minutes can be recalled by their sender, or by the owner or an admin")
            }
        }
        guard op.recipients == after else { return Self.reject("group_changed", "the recipients are not the members") }
        return nil
    }

    mutating func applyGroup(_ op: GroupOp, _ r: Record) -> ApplyOutcome {
        if let refusal = admitGroup(op, at: r.timestampMicros) { return refusal }
        let now = r.timestampMicros
        if case .create(let name, let members, _) = op.action {
            var g = Group(name: name, owner: op.by, createdMicros: now)
            g.members[op.by] = GroupMember(role: .owner, joinedSeq: r.seq, joinedMicros: now)
            for u in members { g.members[u] = GroupMember(role: .member, joinedSeq: r.seq, joinedMicros: now) }
            g.lastSeq = r.seq
            groups[op.group] = g
            return .ok
        }
        var accepted: ApplyOutcome = .ok
        groups.update(op.group) { slot in
            guard var g = slot.take() else { return }
            defer { slot = g }
            g.lastSeq = max(g.lastSeq, r.seq)
            switch op.action {
            case .create:
                break
            case .add(let users, _):
                for u in users { g.members[u] = GroupMember(role: .member, joinedSeq: r.seq, joinedMicros: now) }
            case .remove(let u):
                g.members[u] = nil
            case .role(let u, let admin):
                g.members[u]?.role = admin ? .admin : .member
            case .rename(let t):
                g.name = t
            case .notice(let t):
                g.notice = t
            case .transfer(let to):
                g.members[op.by]?.role = .member
                g.members[to]?.role = .owner
                g.owner = to
            case .dissolve:
                g.dissolved = true
            case .message:
                g.recent.removeAll { now - $0.micros > MessagingLimits.recallWindowMicros }
                g.recent.append(Pair.RecentMessage(seq: r.seq, sender: op.by, micros: now))
                var w = Writer()
                w.i64(now)
                accepted = .accepted(w.bytes)
            case .recall(let seq, _):
                let at = g.recalled.firstIndex { $0 > seq } ?? g.recalled.count
                g.recalled.insert(seq, at: at)
            }
        }
        return accepted
    }

    /// A group record apply refused still took its seq in the group's stream: readers skip it.
    mutating func voidGroupRecord(_ r: Record) {
        guard let g = Ids.groupOf(r.stream) else { return }
        groups.update(g) { slot in
            guard var v = slot.take() else { return }
            v.lastSeq = max(v.lastSeq, r.seq)
            v.void.append(r.seq)
            slot = v
        }
    }
}

extension Group {
    func put(_ w: inout Writer) {
        w.text(name)
        w.text(notice)
        w.u64(owner)
        w.i64(createdMicros)
        w.u8(dissolved ? 1 : 0)
        w.u32(UInt32(members.count))
        for u in members.keys.sorted() {
            guard let m = members[u] else { continue }
            w.u64(u)
            w.u8(m.role.rawValue)
            w.u64(m.joinedSeq)
            w.i64(m.joinedMicros)
        }
        w.u64(lastSeq)
        w.recent(recent)
        w.seqs(recalled)
        w.seqs(void)
    }

    static func take(_ r: inout Reader) -> Group? {
        guard let name = r.text(), let notice = r.text(), let owner = r.u64(), let created = r.i64(), let dissolved = r.flag(),
            let n = r.count(each: 25)
        else { return nil }
        var g = Group(name: name, owner: owner, createdMicros: created)
        g.notice = notice
        g.dissolved = dissolved
        g.members.reserveCapacity(n)
        for _ in 0..<n {
            guard let u = r.u64(), let role = r.u8().flatMap(GroupRole.init(rawValue:)), let seq = r.u64(), let micros = r.i64() else { return nil }
            g.members[u] = GroupMember(role: role, joinedSeq: seq, joinedMicros: micros)
        }
        guard let last = r.u64(), let recent = r.recent() else { return nil }
        g.lastSeq = last
        g.recent = recent
        guard let recalled = r.seqs(), let void = r.seqs() else { return nil }
        g.recalled = recalled
        g.void = void
        return g
    }
}
