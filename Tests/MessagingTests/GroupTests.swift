@testable import Messaging
import ShardState
import Testing
import WeftCore

/// Groups in the messaging machine (Docs/groups.md): roles and rights, the member limit, recipients
/// checked against the group's order, void records, recall, the relay's fan-out, the members' views and
/// snapshots.
@Suite struct GroupTests {
    static let g: UInt64 = Ids.groupIDMin + 77

    static let ops: [MessagingOp] = [
        .group(GroupOp(group: g, by: 7, action: .create(name: "Family 👪", members: [9, 11], limit: 500), recipients: [7, 9, 11])),
        .group(GroupOp(group: g, by: 9, action: .add(users: [12, 13], limit: 500), recipients: [7, 9, 11, 12, 13])),
        .group(GroupOp(group: g, by: 7, action: .remove(user: 11), recipients: [7, 9, 11])),
        .group(GroupOp(group: g, by: 7, action: .role(user: 9, admin: true), recipients: [7, 9])),
        .group(GroupOp(group: g, by: 7, action: .role(user: 9, admin: false), recipients: [7, 9])),
        .group(GroupOp(group: g, by: 9, action: .rename("New name"), recipients: [7, 9])),
        .group(GroupOp(group: g, by: 9, action: .notice(""), recipients: [7, 9])),
        .group(GroupOp(group: g, by: 7, action: .transfer(to: 9), recipients: [7, 9])),
        .group(GroupOp(group: g, by: 7, action: .dissolve, recipients: [7, 9])),
        .group(
            GroupOp(
                group: g, by: 9, action: .message(kind: .text, content: "hi @7", mediaURL: "", mimeType: "", size: 0, mentions: [7], mentionAll: false),
                recipients: [7, 9])),
        .group(
            GroupOp(
                group: g, by: 7,
                action: .message(kind: .image, content: "", mediaURL: "https://m.example/p.png", mimeType: "image/png", size: 9, mentions: [], mentionAll: true),
                recipients: [7, 9])),
        .group(GroupOp(group: g, by: 7, action: .recall(seq: 4, messageID: 99), recipients: [7, 9])),
        .inbox(user: 7, .groupMessage(group: g, seq: 3, sender: 9, messageID: 55, mention: .me)),
        .inbox(user: 9, .groupMessage(group: g, seq: 3, sender: 9, messageID: 55, mention: .none)),
        .inbox(user: 9, .groupMessage(group: g, seq: 4, sender: 7, messageID: 56, mention: .all)),
        .inbox(user: 9, .groupRecall(group: g, seq: 4, by: 7, messageID: 56)),
        .inbox(user: 9, .groupChange(group: g, seq: 1, by: 7, .created(name: "Family"))),
        .inbox(user: 9, .groupChange(group: g, seq: 2, by: 9, .added([12, 13]))),
        .inbox(user: 9, .groupChange(group: g, seq: 5, by: 7, .removed(11))),
        .inbox(user: 9, .groupChange(group: g, seq: 6, by: 7, .role(user: 9, admin: true))),
        .inbox(user: 9, .groupChange(group: g, seq: 7, by: 9, .renamed("x"))),
        .inbox(user: 9, .groupChange(group: g, seq: 8, by: 9, .notice("read the rules"))),
        .inbox(user: 9, .groupChange(group: g, seq: 9, by: 7, .transferred(to: 9))),
        .inbox(user: 9, .groupChange(group: g, seq: 10, by: 9, .dissolved)),
        .readMark(user: 9, peer: g, seq: 4),
    ]

    /// A group shard with owner 7, admin 9 and members 11, 12 (`limit` members at most).
    static func setUp(limit: UInt32 = 500) -> TestShard {
        var s = TestShard()
        #expect(s.apply(op(7, .create(name: "Team", members: [9, 11, 12], limit: limit), [7, 9, 11, 12])).outcome.isAccepted)
        #expect(s.apply(op(7, .role(user: 9, admin: true), [7, 9, 11, 12])).outcome.isAccepted)
        return s
    }

    static func op(_ by: UInt64, _ a: GroupAction, _ recipients: [UInt64]) -> MessagingOp {
        .group(GroupOp(group: g, by: by, action: a, recipients: recipients))
    }

    static func say(_ by: UInt64, _ text: String, mentions: [UInt64] = [], all: Bool = false) -> GroupAction {
        .message(kind: .text, content: text, mediaURL: "", mimeType: "", size: 0, mentions: mentions, mentionAll: all)
    }

    @Test func groupIDsAndStreamsAreTheirOwn() {
        #expect(!Ids.isGroupID(Ids.userIDMax) && Ids.isGroupID(Ids.groupIDMin) && Ids.isGroupID(Ids.groupIDMax) && !Ids.isGroupID(Ids.groupIDMax + 1))
        #expect(Ids.groupOf(Ids.group(Self.g)) == Self.g)
        #expect(Ids.groupOf(Ids.inbox(7)) == nil && Ids.groupOf(Ids.account(7)) == nil && Ids.groupOf(Ids.registry) == nil)
        #expect(Ids.inboxUser(Ids.group(Self.g)) == nil)
        #expect(Set([Ids.group(Self.g), Ids.inbox(7), Ids.account(7), Ids.registry, Ids.dm(7, 9), Ids.pair(7, 9)]).count == 6)
        #expect(Ids.groupShard(Self.g, shards: 8) == ShardID(Self.g % 8))
        #expect(Ids.parseGroupConversationID(Ids.groupConversationID(Self.g)) == Self.g)
        for bad in ["g", "g12", "g0\(Self.g)", "g+\(Self.g)", "d\(Self.g)", "g\(Ids.groupIDMax + 1)", "g-1"] {
            #expect(Ids.parseGroupConversationID(bad) == nil, "\(bad)")
        }
        #expect(MessagingOp.group(GroupOp(group: Self.g, by: 7, action: .dissolve, recipients: [7])).stream == Ids.group(Self.g))
    }

    @Test func rolesDecideWhoMayDoWhat() {
        var s = Self.setUp()
        let all: [UInt64] = [7, 9, 11, 12]
        func code(_ by: UInt64, _ a: GroupAction, _ r: [UInt64]) -> String? { s.apply(Self.op(by, a, r)).outcome.rejectionCode }
        // Members act as admins, admins as the owner: refused.
        #expect(code(11, .remove(user: 12), all) == "not_allowed")
        #expect(code(11, .rename("mine"), all) == "not_allowed")
        #expect(code(11, .notice("mine"), all) == "not_allowed")
        #expect(code(11, Self.say(11, "@all", all: true), all) == "not_allowed")
        #expect(code(9, .role(user: 11, admin: true), all) == "not_allowed")
        #expect(code(9, .transfer(to: 9), all) == "not_allowed")
        #expect(code(9, .dissolve, all) == "not_allowed")
        #expect(code(9, .remove(user: 7), all) == "not_allowed")
        // Non-members: refused whatever they try.
        #expect(code(40, Self.say(40, "let me in"), all) == "not_member")
        #expect(code(40, .add(users: [41], limit: 500), all + [41]) == "not_member")
        #expect(code(40, .remove(user: 40), all) == "not_member")
        // The owner cannot leave; the recipients must be the members.
        #expect(code(7, .remove(user: 7), all) == "owner_cannot_leave")
        #expect(code(11, Self.say(11, "hi"), [7, 9, 11]) == "group_changed")
        #expect(code(11, Self.say(11, "hi", mentions: [40]), all) == "invalid_mention")
        #expect(code(11, .add(users: [12], limit: 500), all) == "already_member")
        // Every refusal took a seq and is void; nothing else changed.
        let g = s.machine.group(Self.g)
        #expect(g?.members.count == 4 && g?.name == "Team" && g?.void.count == 15 && g?.lastSeq == 17)

        #expect(code(9, .rename("Renamed"), all) == nil)
        #expect(code(9, .remove(user: 12), all) == nil)
        #expect(code(11, .add(users: [20, 21], limit: 500), [7, 9, 11, 20, 21]) == nil)
        #expect(code(21, .remove(user: 21), [7, 9, 11, 20, 21]) == nil)
        #expect(code(7, .transfer(to: 9), [7, 9, 11, 20]) == nil)
        #expect(s.machine.group(Self.g)?.owner == 9 && s.machine.group(Self.g)?.role(of: 7) == .member && s.machine.group(Self.g)?.role(of: 9) == .owner)
        #expect(code(7, .dissolve, [7, 9, 11, 20]) == "not_allowed")
        #expect(code(9, .dissolve, [7, 9, 11, 20]) == nil)
        #expect(code(11, Self.say(11, "anyone?"), [7, 9, 11, 20]) == "group_dissolved")
        #expect(s.machine.group(Self.g)?.name == "Renamed" && s.machine.group(Self.g)?.dissolved == true)
    }

    @Test func theMemberLimitHolds() {
        var s = Self.setUp(limit: 5)
        #expect(s.apply(Self.op(11, .add(users: [20, 21], limit: 5), [7, 9, 11, 12, 20, 21])).outcome.rejectionCode == "group_full")
        #expect(s.apply(Self.op(11, .add(users: [20], limit: 5), [7, 9, 11, 12, 20])).outcome.isAccepted)
        #expect(s.apply(Self.op(11, .add(users: [21], limit: 5), [7, 9, 11, 12, 20, 21])).outcome.rejectionCode == "group_full")
        var t = TestShard()
        let members = Array(UInt64(100)..<UInt64(105))
        #expect(t.apply(Self.op(7, .create(name: "x", members: members, limit: 5), ([7] + members).sorted())).outcome.rejectionCode == "group_full")
        #expect(t.machine.group(Self.g) == nil)
        // One add brings in at most `addMax` users (every member's event names them all).
        let many = (1...UInt64(GroupLimits.addMax + 1)).map { 1_000 + $0 }
        #expect(s.apply(Self.op(11, .add(users: many, limit: 5_000), ([7, 9, 11, 12, 20] + many).sorted())).outcome.rejectionCode == "malformed")
        // A taken id is refused (the creator draws another).
        #expect(s.apply(Self.op(40, .create(name: "x", members: [], limit: 5), [40])).outcome.rejectionCode == "group_exists")
    }

    @Test func membersSeeMessagesFromTheirJoinOn() {
        var s = Self.setUp()
        let all: [UInt64] = [7, 9, 11, 12]
        #expect(s.apply(Self.op(11, Self.say(11, "before"), all)).outcome.isAccepted)
        let join = s.apply(Self.op(12, .add(users: [30], limit: 500), all + [30]))
        #expect(join.outcome.isAccepted)
        #expect(s.machine.group(Self.g)?.members[30]?.joinedSeq == join.record.seq)
        #expect(s.machine.group(Self.g)?.members[11]?.joinedSeq == 1)
    }

    @Test func recallBySenderOrManagerWithinTwoMinutes() {
        var s = Self.setUp()
        let all: [UInt64] = [7, 9, 11, 12]
        let t0: Int64 = 1_800_000_000_000_000
        let m1 = s.apply(Self.op(11, Self.say(11, "one"), all), at: t0)
        let m2 = s.apply(Self.op(12, Self.say(12, "two"), all), at: t0 + 1_000)
        let m3 = s.apply(Self.op(7, Self.say(7, "three"), all), at: t0 + 2_000)
        func recall(_ by: UInt64, _ m: Step, at: Int64) -> String? {
            s.apply(Self.op(by, .recall(seq: m.record.seq, messageID: 1), all), at: at).outcome.rejectionCode
        }
        #expect(recall(12, m1, at: t0 + 3_000) == "not_recallable", "a member recalls only their own")
        #expect(recall(9, m3, at: t0 + 3_000) == "not_recallable", "an admin does not recall the owner's")
        #expect(recall(9, m1, at: t0 + 4_000) == nil, "an admin recalls a member's")
        #expect(s.apply(Self.op(7, .role(user: 12, admin: true), all), at: t0 + 4_500).outcome.isAccepted)
        #expect(recall(9, m2, at: t0 + 4_600) == "not_recallable", "an admin does not recall another admin's")
        #expect(recall(11, m1, at: t0 + 5_000) == "not_recallable", "once")
        #expect(recall(12, m2, at: t0 + 1_000 + MessagingLimits.recallWindowMicros + 1) == "not_recallable", "two minutes")
        #expect(s.machine.group(Self.g)?.isRecalled(m1.record.seq) == true)
        #expect(s.machine.group(Self.g)?.isRecalled(m2.record.seq) == false)
    }

    @Test func admitRefusesWhatApplyRefuses() {
        var s = Self.setUp()
        let cases: [MessagingOp] = [
            Self.op(11, .rename("x"), [7, 9, 11, 12]), Self.op(40, Self.say(40, "x"), [7, 9, 11, 12]), Self.op(11, Self.say(11, "x"), [7, 9, 11]),
            Self.op(7, .remove(user: 7), [7, 9, 11, 12]), Self.op(11, Self.say(11, "x"), [7, 9, 11, 12]),
            Self.op(11, .add(users: [50], limit: 500), [7, 9, 11, 12, 50]),
            .group(GroupOp(group: Self.g, by: 7, action: .rename(""), recipients: [7, 9, 11, 12])),
            .group(GroupOp(group: Self.g, by: 7, action: .add(users: [60, 50], limit: 500), recipients: [7, 9, 11, 12, 50, 60])),
        ]
        for op in cases {
            let admitted = s.machine.admit(op)
            let before = s.machine.stateHash
            let applied = s.apply(op).outcome
            #expect(admitted?.rejectionCode == applied.rejectionCode, "\(op)")
            if admitted != nil { #expect(s.machine.group(Self.g)?.void.last == s.machine.group(Self.g)?.lastSeq && before != s.machine.stateHash) }
        }
    }

    @Test func theRelayReachesEveryRecipientInItsHomeShardWithMentions() {
        let shards = 4
        var log = TestLog()
        let r = log.next(Self.op(9, Self.say(9, "hi @11 @12", mentions: [11, 12]), [7, 9, 11, 12, 13]))
        let derived = InboxRelay.derive(r, source: ShardID(2), shards: shards)
        #expect(derived.count == 5)
        let id = Ids.messageID(shard: ShardID(2), index: r.index)
        for d in derived {
            guard case .inbox(let u, .groupMessage(let g, let seq, let sender, let mid, let mention))? = MessagingOp.decode(d.payload) else {
                Issue.record("not a group message event: \(d)")
                continue
            }
            #expect(d.shard == Ids.homeShard(u, shards: shards) && d.stream == Ids.inbox(u))
            #expect(g == Self.g && seq == r.seq && sender == 9 && mid == id)
            #expect(mention == ([11, 12].contains(u) ? .me : .none), "user \(u)")
        }
        let all = log.next(Self.op(7, Self.say(7, "@all", all: true), [7, 9]))
        #expect(InboxRelay.derive(all, source: ShardID(2), shards: shards).allSatisfy {
            if case .inbox(_, .groupMessage(_, _, _, _, .all))? = MessagingOp.decode($0.payload) { true } else { false }
        })
        // A relay lane builds only its shard's part: the same entries as the whole fan-out's share.
        for d in 0..<UInt64(shards) {
            let part = InboxRelay.derive(r, source: ShardID(2), shards: shards, only: ShardID(d))
            #expect(part == derived.filter { $0.shard == ShardID(d) } && part.allSatisfy { $0.shard == ShardID(d) }, "shard \(d)")
        }
        #expect((0..<UInt64(shards)).reduce(0) { $0 + InboxRelay.derive(r, source: ShardID(2), shards: shards, only: ShardID($1)).count } == 5)
        // A removal reaches the removed member too.
        let removal = log.next(Self.op(7, .remove(user: 12), [7, 9, 12]))
        let users = InboxRelay.derive(removal, source: ShardID(2), shards: shards).compactMap { d -> UInt64? in
            if case .inbox(let u, .groupChange(_, _, 7, .removed(12)))? = MessagingOp.decode(d.payload) { u } else { nil }
        }
        #expect(users == [7, 9, 12])
    }

    @Test func membersViewsCountUnreadAndMentions() {
        var s = TestShard()
        let g = Self.g
        s.apply(.inbox(user: 9, .groupChange(group: g, seq: 1, by: 7, .created(name: "Team"))))
        s.apply(.inbox(user: 9, .groupMessage(group: g, seq: 2, sender: 7, messageID: 50, mention: .none)))
        s.apply(.inbox(user: 9, .groupMessage(group: g, seq: 3, sender: 7, messageID: 51, mention: .me)))
        s.apply(.inbox(user: 9, .groupMessage(group: g, seq: 4, sender: 11, messageID: 52, mention: .none)))
        var v = s.machine.peers(of: 9)[g]
        #expect(v?.relation == .contact && v?.unreadCount == 3 && v?.mentionSeq == 3 && v?.lastMessageID == 52)
        s.apply(.inbox(user: 9, .groupRecall(group: g, seq: 4, by: 11, messageID: 52)))
        s.apply(.readMark(user: 9, peer: g, seq: 2))
        v = s.machine.peers(of: 9)[g]
        #expect(v?.unreadCount == 1 && v?.mentionSeq == 3 && v?.lastRecalled == true)
        s.apply(.readMark(user: 9, peer: g, seq: 3))
        #expect(s.machine.peers(of: 9)[g]?.mentionSeq == 0 && s.machine.peers(of: 9)[g]?.unreadCount == 0)
        // Sending reads; a member who joins later starts read at their join; removal ends membership.
        s.apply(.inbox(user: 12, .groupChange(group: g, seq: 6, by: 9, .added([12]))))
        #expect(s.machine.peers(of: 12)[g]?.relation == .contact && s.machine.peers(of: 12)[g]?.readSeq == 6)
        s.apply(.inbox(user: 12, .groupChange(group: g, seq: 7, by: 9, .removed(12))))
        #expect(s.machine.peers(of: 12)[g]?.relation == PeerView.Relation.none && s.machine.peers(of: 12)[g]?.note == "removed")
        // Group messages from others are owed a notification; one's own are not.
        #expect(s.machine.push[9]?.pushableLast == 4)
        s.apply(.inbox(user: 7, .groupMessage(group: g, seq: 2, sender: 7, messageID: 50, mention: .none)))
        #expect(s.machine.push[7]?.pushableLast ?? 0 == 0)
    }

    @Test func aSnapshotWithGroupsRestoresTheSameBytes() throws {
        var s = Self.setUp()
        s.apply(Self.op(11, Self.say(11, "hello"), [7, 9, 11, 12]))
        s.apply(Self.op(11, .rename("nope"), [7, 9, 11, 12]))
        s.apply(Self.op(7, .notice("rules"), [7, 9, 11, 12]))
        s.apply(.inbox(user: 9, .groupMessage(group: Self.g, seq: 3, sender: 11, messageID: 9, mention: .all)))
        let bytes = s.machine.snapshot()
        let back = try MessagingMachine(snapshot: bytes)
        #expect(back.snapshot() == bytes)
        #expect(back.group(Self.g) == s.machine.group(Self.g))
        #expect(back.peers(of: 9) == s.machine.peers(of: 9))
        // The answer to a group question crosses nodes intact.
        let answer = MessagingQuery.group(Self.g).answer(s.machine)
        #expect(MessagingQuery.Answer.decode(answer.encode()) == answer)
        #expect(MessagingQuery.decode(MessagingQuery.group(Self.g).encode()) == .group(Self.g))
        for cut in stride(from: 0, to: bytes.count, by: 7) { #expect(throws: StateDecodeError.self) { try MessagingMachine(snapshot: Array(bytes.prefix(cut))) } }
    }
}
