import Foundation
import Hummingbird
import Messaging
import ShardState
import WeftCore

/// Group chats (Docs/groups.md): the routes, and the one write path every group change and message
/// takes — read the group, name its members as the record's recipients, write; apply checks the list
/// against the group's order and a change in between is retried.
extension MessagingAPI {
    func addGroups(to router: Router<BasicRequestContext>) {
        router.post("/api/v1/groups") { request, _ in try await createGroup(request) }
        router.get("/api/v1/groups") { request, _ in try await myGroups(request) }
        router.get("/api/v1/groups/{id}") { request, context in try await groupInfo(request, context) }
        router.patch("/api/v1/groups/{id}") { request, context in try await updateGroup(request, context) }
        router.delete("/api/v1/groups/{id}") { request, context in try await dissolveGroup(request, context) }
        router.post("/api/v1/groups/{id}/members") { request, context in try await addMembers(request, context) }
        router.delete("/api/v1/groups/{id}/members/{user_id}") { request, context in try await removeMember(request, context) }
        router.put("/api/v1/groups/{id}/members/{user_id}") { request, context in try await setRole(request, context) }
        router.post("/api/v1/groups/{id}/transfer") { request, context in try await transferGroup(request, context) }
    }

    static let unknownGroup = APIError(.notFound, "unknown_group", "no such group (or you are not a member)")

    // MARK: Reads

    /// The group's state, linearizably (the caller's own changes are in it), and the index it was read at
    /// (0 when another node answered).
    func groupAt(_ g: UInt64) async throws -> (Group?, LogIndex) {
        let shard = Ids.groupShard(g, shards: shards)
        if node.runner(shard) != nil {
            // Hedged: a replica just cut off from its leader would wait out the deadline (`WeftNode.hedged`).
            switch await node.linearizableHere(shard, .group(g), { m, applied in (m.group(g), applied) }, elsewhere: { ($0.group, 0) }) {
            case .success(let (group, applied)): return (group, applied)
            case .failure(let f): throw Self.readError(f, shard)
            }
        }
        return (try await asked(shard, .group(g), at: .linearizable).group, 0)
    }

    /// The group if `me` is a member (else 404, whether or not it exists).
    func memberGroup(_ g: UInt64, me: UInt64) async throws -> (Group, GroupMember, LogIndex) {
        let (group, applied) = try await groupAt(g)
        guard let group, let m = group.members[me] else { throw Self.unknownGroup }
        return (group, m, applied)
    }

    static func groupParameter(_ context: BasicRequestContext) throws -> UInt64 {
        guard let s = context.parameters.get("id"), let g = number(s), Ids.isGroupID(g) else { throw unknownGroup }
        return g
    }

    struct GroupBody: Encodable {
        struct Member: Encodable {
            var user_id: UInt64
            var role: String
            var joined_at: String
            var display_name: String?
        }
        var group_id: UInt64
        var conversation_id: String
        var name: String
        var notice: String
        var owner_id: UInt64
        var created_at: String
        var dissolved: Bool
        var member_count: Int
        var members: [Member]?
    }

    func groupBody(_ g: UInt64, _ group: Group, members: Bool) async -> GroupBody {
        var list: [GroupBody.Member]?
        if members {
            var out: [GroupBody.Member] = []
            for (u, m) in group.members.sorted(by: { ($0.value.role.rawValue, $1.key) > ($1.value.role.rawValue, $0.key) }) {
                // Names for the first 50 (the rest: GET /api/v1/users/{id}).
                let name = out.count < 50 ? (try? await account(u, consistency: .local))?.displayName : nil
                out.append(GroupBody.Member(user_id: u, role: m.role.name, joined_at: Self.iso(micros: m.joinedMicros), display_name: name))
            }
            list = out
        }
        return GroupBody(
            group_id: g, conversation_id: Ids.groupConversationID(g), name: group.name, notice: group.notice, owner_id: group.owner,
            created_at: Self.iso(micros: group.createdMicros), dissolved: group.dissolved, member_count: group.members.count, members: list)
    }

    func groupInfo(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        let me = try await authenticate(request)
        try Self.onlyQuery(request, [])
        let g = try Self.groupParameter(context)
        // A member list with names costs a read per member shown: counted like a history page.
        try await RateLimiter.take(.history, user: me.id, perMinute: node.config.messaging.historyReadsPerMinute, through: node)
        let (group, _, _) = try await memberGroup(g, me: me.id)
        return try HTTPAPI.json(await groupBody(g, group, members: true))
    }

    struct GroupsPage: Encodable {
        var groups: [GroupBody]
    }

    /// The caller's groups, from their inbox's view (the groups they are a member of), newest activity first.
    func myGroups(_ request: Request) async throws -> Response {
        let me = try await authenticate(request)
        try Self.onlyQuery(request, ["limit"])
        let limit = try Self.limit(request.uri.queryParameters.get("limit"))
        // One group read per group listed: counted like a history page.
        try await RateLimiter.take(.history, user: me.id, perMinute: node.config.messaging.historyReadsPerMinute, through: node)
        let peers = try await asked(Ids.homeShard(me.id, shards: shards), .peers(me.id), at: .linearizable).peers
        let mine = peers.filter { Ids.isGroupID($0.key) && $0.value.relation == .contact }
            .sorted { ($0.value.lastMicros, $0.key) > ($1.value.lastMicros, $1.key) }.prefix(limit)
        var out: [GroupBody] = []
        for (g, _) in mine {
            // The group's own shard decides (the view may trail a removal by the relay's lag).
            if let group = try? await asked(Ids.groupShard(g, shards: shards), .group(g), at: .local).group, group.members[me.id] != nil {
                // (The full group, for the membership check: at most `limit` of them.)
                out.append(await groupBody(g, group, members: false))
            }
        }
        return try HTTPAPI.json(GroupsPage(groups: out))
    }

    // MARK: Writes

    /// Writes `action` by `me` in group `g` with the members as recipients; a change to the group in
    /// between (refused `group_changed`) is read again and retried.
    ///
    /// With `key` (a `client_msg_id`), exactly once: the n-th key of a request is `key`, then `key 0x00 n`
    /// (a byte no client id has). A refusal by the leader's check writes nothing and leaves the key free,
    /// so it is retried with the same key; only a refusal in apply, which the key records, moves on to the
    /// next. Every retry of the request walks the same keys and stops at the one that was written (the
    /// leader replays a key's outcome before any check, so a sender who left since still gets theirs).
    func writeGroup(_ g: UInt64, by me: UInt64, _ action: GroupAction, key: [UInt8]? = nil) async throws -> (WeftNode.Written, StreamSeq) {
        let shard = Ids.groupShard(g, shards: shards)
        var used: UInt8 = 0
        for _ in 0..<6 {
            var recipients: [UInt64]
            if case .create(_, let members, _) = action {
                recipients = ([me] + members).sorted()
            } else {
                let (group, _) = try await groupAt(g)
                // Not a member (any more): only a keyed retry may still find its first answer.
                guard let group, key != nil || group.members[me] != nil else { throw Self.unknownGroup }
                recipients = group.recipients
                if case .add(let users, _) = action { recipients = Array(Set(recipients + users)).sorted() }
            }
            let op = MessagingOp.group(GroupOp(group: g, by: me, action: action, recipients: recipients))
            let k = key.map { used == 0 ? $0 : $0 + [0, used] }
            let written: WeftNode.Written
            do {
                written = try await writeRefs(shard, [op], key: k)
            } catch let e as APIError where e.code == "group_changed" {
                continue
            } catch let e as APIError where e.code == "not_member" && key != nil {
                throw Self.unknownGroup
            }
            guard let ref = written.refs.first else { throw APIError(.serviceUnavailable, "unavailable", "the write returned nothing") }
            if case .rejected(let code, _) = ref.outcome {
                if code == "group_changed" {
                    used += 1
                    continue
                }
                throw Self.refusal(ref.outcome)
            }
            return (written, ref.seq)
        }
        throw APIError(.serviceUnavailable, "busy", "the group kept changing; try again")
    }

    struct CreateGroupBody: Decodable {
        var name: String
        var member_ids: [UInt64]
        static let keys: Set<String> = ["name", "member_ids"]
    }

    struct CreatedGroupBody: Encodable {
        var group_id: UInt64
        var conversation_id: String
    }

    static func checkGroupName(_ n: String) throws {
        guard !n.isEmpty, n.utf8.count <= GroupLimits.nameBytesMax else {
            throw APIError(.badRequest, "invalid_name", "a group name has 1-\(GroupLimits.nameBytesMax) bytes")
        }
    }

    /// `users`, ascending and distinct, all contacts of `me` (WeChat: you bring in people you know).
    func contactsOnly(_ users: [UInt64], of me: UInt64, field: String) async throws -> [UInt64] {
        guard users.allSatisfy({ Ids.isUserID($0) && $0 != me }), Set(users).count == users.count else {
            throw APIError(.badRequest, "invalid_members", "\(field) are distinct user ids other than yours")
        }
        let peers = try await asked(Ids.homeShard(me, shards: shards), .peers(me), at: .linearizable).peers
        var strangers = users.filter { peers[$0]?.relation != .contact || peers[$0]?.blocked == true }
        if strangers.isEmpty {
            // A block by the other side is known only to the pair's shard (and the blocker's inbox).
            let blocked = await withTaskGroup(of: UInt64?.self) { tasks in
                var out: [UInt64] = []
                var next = 0
                func add(_ u: UInt64) {
                    tasks.addTask {
                        let a = try? await asked(Ids.pairShard(me, u, shards: shards), .pair(me, u), at: .local)
                        return a?.pair?.isBlocked() == false && a?.pair?.relation == .contacts ? nil : u
                    }
                }
                while next < min(16, users.count) {
                    add(users[next])
                    next += 1
                }
                for await r in tasks {
                    if let r { out.append(r) }
                    if next < users.count {
                        add(users[next])
                        next += 1
                    }
                }
                return out
            }
            strangers = blocked.sorted()
        }
        guard strangers.isEmpty else {
            throw APIError(.forbidden, "not_contacts", "only your contacts can be brought into a group: \(strangers.prefix(10).map(String.init).joined(separator: ", "))")
        }
        return users.sorted()
    }

    func createGroup(_ request: Request) async throws -> Response {
        let me = try await authenticate(request)
        let body = try await decode(CreateGroupBody.self, request, keys: CreateGroupBody.keys)
        try Self.checkGroupName(body.name)
        let limit = node.config.messaging.groupMembersMax
        guard body.member_ids.count + 1 <= limit else { throw APIError(.conflict, "group_full", "a group has at most \(limit) members") }
        try await action(me)
        let members = try await contactsOnly(body.member_ids, of: me.id, field: "member_ids")
        // A random id; a taken one (about one in a million at a million groups) is drawn again.
        for _ in 0..<4 {
            let g = UInt64.random(in: Ids.groupIDMin...Ids.groupIDMax)
            do {
                _ = try await writeGroup(g, by: me.id, .create(name: body.name, members: members, limit: UInt32(limit)))
                return try HTTPAPI.json(CreatedGroupBody(group_id: g, conversation_id: Ids.groupConversationID(g)), status: .created)
            } catch let e as APIError where e.code == "group_exists" {
                continue
            }
        }
        throw APIError(.serviceUnavailable, "busy", "no free group id was found; try again")
    }

    struct UpdateGroupBody: Decodable {
        var name: String?
        var notice: String?
        static let keys: Set<String> = ["name", "notice"]
    }

    func updateGroup(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        let me = try await authenticate(request)
        let g = try Self.groupParameter(context)
        let body = try await decode(UpdateGroupBody.self, request, keys: UpdateGroupBody.keys)
        guard body.name != nil || body.notice != nil else { throw APIError(.badRequest, "missing_field", "name or notice is required") }
        if let n = body.name { try Self.checkGroupName(n) }
        if let t = body.notice, t.utf8.count > GroupLimits.noticeBytesMax {
            throw APIError(.badRequest, "invalid_notice", "a notice has at most \(GroupLimits.noticeBytesMax) bytes")
        }
        try await action(me)
        if let n = body.name { _ = try await writeGroup(g, by: me.id, .rename(n)) }
        if let t = body.notice { _ = try await writeGroup(g, by: me.id, .notice(t)) }
        let (group, _, _) = try await memberGroup(g, me: me.id)
        return try HTTPAPI.json(await groupBody(g, group, members: false))
    }

    func dissolveGroup(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        let me = try await authenticate(request)
        try Self.noBody(request)
        let g = try Self.groupParameter(context)
        try await action(me)
        _ = try await writeGroup(g, by: me.id, .dissolve)
        return Response(status: .noContent)
    }

    struct AddMembersBody: Decodable {
        var user_ids: [UInt64]
        static let keys: Set<String> = ["user_ids"]
    }

    func addMembers(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        let me = try await authenticate(request)
        let g = try Self.groupParameter(context)
        let body = try await decode(AddMembersBody.self, request, keys: AddMembersBody.keys)
        guard !body.user_ids.isEmpty, body.user_ids.count <= GroupLimits.addMax else {
            throw APIError(.badRequest, "invalid_members", "user_ids lists 1-\(GroupLimits.addMax) users (larger additions in several requests)")
        }
        guard body.user_ids.count <= node.config.messaging.groupMembersMax else {
            throw APIError(.conflict, "group_full", "a group has at most \(node.config.messaging.groupMembersMax) members")
        }
        try await action(me)
        // A non-member learns nothing (not even whom they could add).
        _ = try await memberGroup(g, me: me.id)
        let users = try await contactsOnly(body.user_ids, of: me.id, field: "user_ids")
        _ = try await writeGroup(g, by: me.id, .add(users: users, limit: UInt32(node.config.messaging.groupMembersMax)))
        return Response(status: .noContent)
    }

    static func memberParameter(_ context: BasicRequestContext) throws -> UInt64 {
        guard let s = context.parameters.get("user_id"), let u = number(s), Ids.isUserID(u) else {
            throw APIError(.notFound, "not_member", "that user is not a member")
        }
        return u
    }

    func removeMember(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        let me = try await authenticate(request)
        try Self.noBody(request)
        let g = try Self.groupParameter(context)
        let u = try Self.memberParameter(context)
        try await action(me)
        _ = try await writeGroup(g, by: me.id, .remove(user: u))
        return Response(status: .noContent)
    }

    struct RoleBody: Decodable {
        var role: String
        static let keys: Set<String> = ["role"]
    }

    func setRole(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        let me = try await authenticate(request)
        let g = try Self.groupParameter(context)
        let u = try Self.memberParameter(context)
        let body = try await decode(RoleBody.self, request, keys: RoleBody.keys)
        guard body.role == "admin" || body.role == "member" else { throw APIError(.badRequest, "invalid_role", "role is admin or member") }
        try await action(me)
        _ = try await writeGroup(g, by: me.id, .role(user: u, admin: body.role == "admin"))
        return Response(status: .noContent)
    }

    struct TransferBody: Decodable {
        var user_id: UInt64
        static let keys: Set<String> = ["user_id"]
    }

    func transferGroup(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        let me = try await authenticate(request)
        let g = try Self.groupParameter(context)
        let body = try await decode(TransferBody.self, request, keys: TransferBody.keys)
        guard Ids.isUserID(body.user_id) else { throw APIError(.notFound, "not_member", "the new owner must be another member") }
        try await action(me)
        _ = try await writeGroup(g, by: me.id, .transfer(to: body.user_id))
        return Response(status: .noContent)
    }

    // MARK: Messages

    /// A group message from `me` (validated by `send`): written once per `client_msg_id`.
    func sendToGroup(_ g: UInt64, _ body: SendBody, kind: MessageKind, from me: Account, key: [UInt8]?) async throws -> (SentBody, replayed: Bool) {
        let mentions = Array(Set(body.mentions ?? [])).sorted()
        guard (body.mentions ?? []).count <= GroupLimits.mentionsMax, mentions.allSatisfy(Ids.isUserID) else {
            throw APIError(.badRequest, "invalid_mentions", "mentions are at most \(GroupLimits.mentionsMax) user ids")
        }
        let action = GroupAction.message(
            kind: kind, content: body.content ?? "", mediaURL: body.media_url ?? "", mimeType: body.mime_type ?? "", size: body.size ?? 0,
            mentions: mentions, mentionAll: body.mention_all ?? false)
        let (written, seq) = try await writeGroup(g, by: me.id, action, key: key)
        guard let ref = written.refs.first, case .accepted(let b) = ref.outcome, let micros = Self.u64(b) else {
            throw APIError(.serviceUnavailable, "unavailable", "the write returned nothing")
        }
        let shard = Ids.groupShard(g, shards: shards)
        let sent = SentBody(
            message_id: Ids.messageID(shard: shard, index: ref.index), created_at: Self.iso(micros: Int64(bitPattern: micros)),
            conversation_id: Ids.groupConversationID(g), seq: seq)
        return (sent, written.replayed)
    }

    /// A group's messages for a member, newest first, from after they joined.
    func groupHistory(_ g: UInt64, me: UInt64, limit: Int, before: UInt64?) async throws -> MessagesPage {
        let (group, member, applied) = try await memberGroup(g, me: me)
        let end = min(before ?? (group.lastSeq + 1), group.lastSeq + 1)
        let first = member.joinedSeq + 1
        guard end > first else { return MessagesPage(messages: [], next_cursor: nil) }
        let from = end - first > UInt64(limit) ? end - UInt64(limit) : first
        let shard = Ids.groupShard(g, shards: shards)
        let records = try Self.records(
            await node.readAnywhere(
                shard: shard, .stream(Ids.group(g), fromSeq: from, limit: Int(end - from)), consistency: applied > 0 ? .atLeast(applied) : .linearizable))
        var out: [MessageBody] = []
        for r in records.reversed() where r.seq < end && r.seq >= from && !group.isVoid(r.seq) {
            if let m = Self.groupMessage(r, shard: shard, recalled: group.isRecalled(r.seq)) { out.append(m) }
        }
        return MessagesPage(messages: out, next_cursor: from > first ? "\(from)" : nil)
    }

    static func groupMessage(_ r: Record, shard: ShardID, recalled: Bool) -> MessageBody? {
        guard r.index >= 1, r.index <= Ids.messageIndexMax, r.type == .messaging, case .group(let op)? = MessagingOp.decode(r.payload),
            case .message(let kind, let content, let url, let mime, let size, let mentions, let all) = op.action
        else { return nil }
        return MessageBody(
            message_id: Ids.messageID(shard: shard, index: r.index), conversation_id: Ids.groupConversationID(op.group), seq: r.seq, sender_id: op.by,
            receiver_id: nil, group_id: op.group, message_type: kind.name, content: recalled ? "" : content, media_url: recalled || url.isEmpty ? nil : url,
            mime_type: recalled || mime.isEmpty ? nil : mime, size: recalled || kind == .text ? nil : size, created_at: iso(micros: r.timestampMicros),
            recalled: recalled, mentions: mentions.isEmpty ? nil : mentions, mention_all: all ? true : nil)
    }

    /// The group message a message id names, if `me` is a member of its group now (else nil).
    func groupMessageRecord(_ id: UInt64, me: UInt64) async throws -> (group: UInt64, record: Record, sender: UInt64)? {
        guard let (shard, index) = Ids.parseMessageID(id, shards: shards) else { return nil }
        let result = await node.readAnywhere(shard: shard, .log(from: index, limit: 1), consistency: .linearizable)
        guard case .success(let rr) = result else {
            if case .failure(.read(.compacted)) = result { return nil }
            throw APIError(.serviceUnavailable, "not_current", "the message's shard cannot be read now")
        }
        guard let r = rr.records.first, r.index == index, r.type == .messaging, case .group(let op)? = MessagingOp.decode(r.payload),
            case .message = op.action, Ids.groupShard(op.group, shards: shards) == shard
        else { return nil }
        // Not a member (or not from before their join): not found. A shard that cannot answer: 503.
        let (group, _) = try await groupAt(op.group)
        guard let group, let member = group.members[me], r.seq > member.joinedSeq, !group.isVoid(r.seq) else { return nil }
        return (op.group, r, op.by)
    }
}

/// Rendered message bodies for a short while (1 s, at most 4 096), shared by the sessions of one node.
/// A body cached just before its recall can reach a device within that second; the `group_recall` event
/// follows it in the same inbox, and history and sync pages (linearizable) never use the cache.
///
/// One fetch per body: a group message reaches all of a node's member sessions at once, and each used to
/// miss the cache, read the group and the record (500 members: a 500-id record decoded by every session,
/// 4 % of the servers' CPU). The first asker fetches; the others wait for its answer.
final class RecentBodies: @unchecked Sendable {
    private let lock = NSLock()
    private var entries: [UInt64: (body: MessagingAPI.MessageBody, at: ContinuousClock.Instant)] = [:]
    private var fetching: [UInt64: Task<MessagingAPI.MessageBody?, Never>] = [:]
    static let ttl: Duration = .seconds(1)
    static let countMax = 4096

    /// The cached body, if any.
    func cached(_ id: UInt64) -> MessagingAPI.MessageBody? {
        lock.withLock {
            guard let e = entries[id], ContinuousClock.now - e.at < Self.ttl else { return nil }
            return e.body
        }
    }

    /// The cached body, or the one `fetch` gives (run once however many ask at the same time; a nil
    /// answer is not kept).
    func get(_ id: UInt64, fetch: @escaping @Sendable () async -> MessagingAPI.MessageBody?) async -> MessagingAPI.MessageBody? {
        let (hit, task): (MessagingAPI.MessageBody?, Task<MessagingAPI.MessageBody?, Never>?) = lock.withLock {
            if let e = entries[id], ContinuousClock.now - e.at < Self.ttl { return (e.body, nil) }
            if let t = fetching[id] { return (nil, t) }
            let t = Task {
                let body = await fetch()
                // Cached before the fetch is forgotten: an asker in between finds one or the other.
                if let body { self.put(id, body) }
                self.lock.withLock { self.fetching[id] = nil }
                return body
            }
            fetching[id] = t
            return (nil, t)
        }
        if let hit { return hit }
        return await task?.value
    }

    func put(_ id: UInt64, _ body: MessagingAPI.MessageBody) {
        let now = ContinuousClock.now
        lock.withLock {
            if entries.count >= Self.countMax {
                entries = entries.filter { now - $0.value.at < Self.ttl }
                if entries.count >= Self.countMax { entries.removeAll(keepingCapacity: true) }
            }
            entries[id] = (body, now)
        }
    }
}
