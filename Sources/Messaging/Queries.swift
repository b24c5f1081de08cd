import WeftCore

/// A question the messaging API asks a shard's state (Docs/messaging.md, "Reads on any node"): answered
/// on the node's own replica, or — when the node holds none of that shard — by a node that does, over the
/// peer connection. So the questions and answers have an encoding.
public enum MessagingQuery: Sendable, Equatable {
    /// The account without its secrets (password hash and sealed TOTP secret emptied): what token checks
    /// and profiles need, and all that crosses the peer network for them.
    case account(UInt64)
    /// The account with its secrets (login, TOTP changes).
    case accountSecrets(UInt64)
    /// By username, without its secrets.
    case accountByUsername(String)
    case usernameTaken(String)
    case pair(UInt64, UInt64)
    case peers(UInt64)
    case group(UInt64)
    /// The group without its member list (name, notice, recalled and void seqs): what rendering its
    /// messages needs, at a fraction of the bytes for a large group.
    case groupSummary(UInt64)
    /// The last inbox seq of each of these users (0 for one with no inbox event), in their order: what a
    /// node whose sessions get their users' inbox records forwarded checks now and then, to find one it
    /// missed (Docs/delivery.md, "Sessions away from the home shard"). At most `headsUsersMax` users.
    case inboxHeads([UInt64])

    public static let headsUsersMax = 4096

    public enum Answer: Sendable, Equatable {
        case account(Account?)
        case taken(Bool)
        case pair(Pair?)
        case peers([UInt64: PeerView])
        case group(Group?)
        case heads([StreamSeq])
    }

    public func answer(_ m: MessagingMachine) -> Answer {
        switch self {
        case .account(let id): .account(m.account(id).map(\.withoutSecrets))
        case .accountSecrets(let id): .account(m.account(id))
        case .accountByUsername(let name): .account(m.userID(username: name).flatMap { m.account($0) }.map(\.withoutSecrets))
        case .usernameTaken(let name): .taken(m.userID(username: name) != nil)
        case .pair(let a, let b): .pair(m.pair(a, b))
        case .peers(let u): .peers(m.peers(of: u))
        case .group(let g): .group(m.group(g))
        case .groupSummary(let g):
            .group(
                m.group(g).map {
                    var s = $0
                    s.members = [:]
                    return s
                })
        case .inboxHeads(let users): .heads(users.map { m.push[$0]?.inboxLast ?? 0 })
        }
    }

    public func encode() -> [UInt8] {
        var w = Writer()
        switch self {
        case .account(let id):
            w.u8(1)
            w.u64(id)
        case .accountByUsername(let name):
            w.u8(2)
            w.text(name)
        case .usernameTaken(let name):
            w.u8(3)
            w.text(name)
        case .accountSecrets(let id):
            w.u8(6)
            w.u64(id)
        case .pair(let a, let b):
            w.u8(4)
            w.u64(a)
            w.u64(b)
        case .peers(let u):
            w.u8(5)
            w.u64(u)
        case .group(let g):
            w.u8(7)
            w.u64(g)
        case .groupSummary(let g):
            w.u8(8)
            w.u64(g)
        case .inboxHeads(let users):
            w.u8(9)
            w.seqs(users)
        }
        return w.bytes
    }

    public static func decode(_ b: [UInt8]) -> MessagingQuery? {
        var r = Reader(b)
        let q: MessagingQuery?
        switch r.u8() {
        case 1: q = r.u64().map { .account($0) }
        case 2: q = r.text().map { .accountByUsername($0) }
        case 3: q = r.text().map { .usernameTaken($0) }
        case 4:
            guard let a = r.u64(), let b = r.u64() else { return nil }
            q = .pair(a, b)
        case 5: q = r.u64().map { .peers($0) }
        case 6: q = r.u64().map { .accountSecrets($0) }
        case 7: q = r.u64().map { .group($0) }
        case 8: q = r.u64().map { .groupSummary($0) }
        case 9:
            guard let users = r.seqs(), users.count <= Self.headsUsersMax else { return nil }
            q = .inboxHeads(users)
        default: q = nil
        }
        return r.atEnd ? q : nil
    }
}

extension Account {
    /// This account with its password hash and sealed TOTP secret emptied.
    public var withoutSecrets: Account {
        var a = self
        a.passwordHash = []
        a.totpSealed = []
        return a
    }
}

extension MessagingQuery.Answer {
    public func encode() -> [UInt8] {
        var w = Writer()
        switch self {
        case .account(let a):
            w.u8(1)
            w.u8(a == nil ? 0 : 1)
            a?.put(&w)
        case .taken(let t):
            w.u8(2)
            w.u8(t ? 1 : 0)
        case .pair(let p):
            w.u8(3)
            w.u8(p == nil ? 0 : 1)
            p?.put(&w)
        case .peers(let all):
            w.u8(4)
            PeerView.putAll(all, &w)
        case .group(let g):
            w.u8(5)
            w.u8(g == nil ? 0 : 1)
            g?.put(&w)
        case .heads(let seqs):
            w.u8(6)
            w.seqs(seqs)
        }
        return w.bytes
    }

    public static func decode(_ b: [UInt8]) -> MessagingQuery.Answer? {
        var r = Reader(b)
        let a: MessagingQuery.Answer?
        switch r.u8() {
        case 1:
            switch r.flag() {
            case false?: a = .account(nil)
            case true?: a = Account.take(&r).map { .account($0) }
            case nil: a = nil
            }
        case 2: a = r.flag().map { .taken($0) }
        case 3:
            switch r.flag() {
            case false?: a = .pair(nil)
            case true?: a = Pair.take(&r).map { .pair($0) }
            case nil: a = nil
            }
        case 4: a = PeerView.takeAll(&r).map { .peers($0) }
        case 5:
            switch r.flag() {
            case false?: a = .group(nil)
            case true?: a = Group.take(&r).map { .group($0) }
            case nil: a = nil
            }
        case 6:
            guard let seqs = r.seqs(), seqs.count <= MessagingQuery.headsUsersMax else { return nil }
            a = .heads(seqs)
        default: a = nil
        }
        return r.atEnd ? a : nil
    }

    public var account: Account? { if case .account(let a) = self { a } else { nil } }
    public var pair: Pair? { if case .pair(let p) = self { p } else { nil } }
    public var peers: [UInt64: PeerView] { if case .peers(let p) = self { p } else { [:] } }
    public var taken: Bool { if case .taken(let t) = self { t } else { false } }
    public var group: Group? { if case .group(let g) = self { g } else { nil } }
    public var heads: [StreamSeq] { if case .heads(let h) = self { h } else { [] } }
}
