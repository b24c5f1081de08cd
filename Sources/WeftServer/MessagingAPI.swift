import ClusterConfig
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdOTP
import Messaging
import NIOCore
import Replication
import ShardState
import WeftCore

/// The messaging API (Docs/messaging.md, Docs/openapi.yaml): accounts, contacts, 1:1 messages, sync,
/// conversations. Every node serves every user; writes go to the leader of the shard that owns them.
struct MessagingAPI: Sendable {
    let node: WeftNode
    let auth: UserAuth
    /// Group message bodies as rendered for events, for a second: the sessions of a group's members on
    /// this node share one read of each message instead of one each (Docs/groups.md, "Fan-out").
    /// Message bodies just committed on this node, for the sessions' live pushes (Docs/delivery.md).
    let recentBodies = RecentBodies()
    var shards: Int { node.config.shards }

    static let bodyBytesMax = 16 << 10
    static let pageMax = 100

    // MARK: Routes

    func add(to router: Router<BasicRequestContext>) {
        router.post("/api/v1/auth/register") { request, _ in try await register(request) }
        router.post("/api/v1/auth/login") { request, _ in try await login(request) }
        router.post("/api/v1/auth/logout") { request, _ in try await logout(request) }
        router.post("/api/v1/auth/totp/enable") { request, _ in try await totpEnable(request) }
        router.post("/api/v1/auth/totp/confirm") { request, _ in try await totpConfirm(request) }
        router.post("/api/v1/auth/totp/disable") { request, _ in try await totpDisable(request) }
        router.get("/api/v1/users/me") { request, _ in try await me(request) }
        router.patch("/api/v1/users/me") { request, _ in try await updateMe(request) }
        router.get("/api/v1/users/{id}") { request, context in try await user(request, context) }
        router.get("/api/v1/users") { request, _ in try await userByName(request) }
        router.post("/api/v1/contacts/requests") { request, _ in try await contactRequest(request) }
        router.post("/api/v1/contacts/requests/{id}/accept") { request, context in try await contactAccept(request, context) }
        router.get("/api/v1/contacts") { request, _ in try await contacts(request) }
        router.delete("/api/v1/contacts/{id}") { request, context in try await contactRemove(request, context) }
        router.post("/api/v1/contacts/{id}/block") { request, context in try await block(request, context, on: true) }
        router.delete("/api/v1/contacts/{id}/block") { request, context in try await block(request, context, on: false) }
        router.post("/api/v1/messages") { request, _ in try await send(request) }
        router.get("/api/v1/messages") { request, _ in try await history(request) }
        router.delete("/api/v1/messages/{id}") { request, context in try await recall(request, context) }
        router.get("/api/v1/sync") { request, _ in try await sync(request) }
        router.get("/api/v1/conversations") { request, _ in try await conversations(request) }
        router.post("/api/v1/conversations/{id}/read") { request, context in try await markRead(request, context) }
        addGroups(to: router)
    }

    // MARK: Accounts

    struct RegisterBody: Decodable {
        var username: String
        var password: String
        var display_name: String?
        static let keys: Set<String> = ["username", "password", "display_name"]
    }

    func register(_ request: Request) async throws -> Response {
        let body = try await decode(RegisterBody.self, request, keys: RegisterBody.keys)
        guard let name = Ids.normalisedUsername(body.username) else {
            throw APIError(.badRequest, "invalid_username", "a username has 3-32 characters a-z 0-9 _ . and starts with a letter")
        }
        try Self.checkPassword(body.password)
        let display = body.display_name ?? name
        try Self.checkDisplayName(display)
        let shard = Ids.usernameShard(name, shards: shards)
        // Refused early if taken (no bcrypt spent); the write decides.
        if case .success(let a?) = await node.ask(shard, .usernameTaken(name), at: .local), a.taken {
            throw APIError(.conflict, "username_taken", "the username is taken")
        }
        let hash = try await hashPassword(body.password)
        let op = MessagingOp.register(
            username: name, displayName: display, passwordHash: Array(hash.utf8), shard: shard.rawValue, shards: UInt64(shards))
        let outcome = try await write(shard, op)
        guard case .accepted(let bytes) = outcome, let id = Self.u64(bytes) else { throw Self.refusal(outcome) }
        return try HTTPAPI.json(UserBody(user_id: id, username: name, display_name: display), status: .created)
    }

    struct LoginBody: Decodable {
        var username: String
        var password: String
        var totp_code: String?
        static let keys: Set<String> = ["username", "password", "totp_code"]
    }

    struct TokenBody: Encodable {
        var token: String
        var token_type = "Bearer"
        var user_id: UInt64
        var expires_at: String
    }

    func login(_ request: Request) async throws -> Response {
        let body = try await decode(LoginBody.self, request, keys: LoginBody.keys)
        let bad = APIError(.unauthorized, "invalid_credentials", "wrong username or password")
        guard body.password.utf8.count <= 72 else { throw bad }
        let name = Ids.normalisedUsername(body.username)
        // Per username (normalised, or as given), across the cluster: online guessing is slow.
        let who = FNV1a.hash(Array((name ?? body.username).utf8)) & Ids.userIDMax
        try await RateLimiter.take(.login, user: who, perMinute: node.config.messaging.loginsPerMinute, through: node)
        var account: Account?
        if let name {
            let shard = Ids.usernameShard(name, shards: shards)
            // The username's shard is the user's home shard: the id, then the account with its hash.
            if let id = try await asked(shard, .accountByUsername(name), at: .linearizable).account?.id {
                account = try await asked(shard, .accountSecrets(id), at: .linearizable).account
            }
        }
        // bcrypt runs whether or not the user exists: the time taken does not tell.
        let hash = account.map { String(decoding: $0.passwordHash, as: UTF8.self) }
        guard try await verifyPassword(body.password, hash: hash), let account else { throw bad }
        if account.totpState == 2 {
            guard let code = body.totp_code else { throw APIError(.unauthorized, "totp_required", "this account needs a totp_code") }
            guard let secret = auth.unseal(account.totpSealed, user: account.id), TOTPCheck.matches(code, secret: secret) else {
                throw APIError(.unauthorized, "invalid_totp", "wrong or expired TOTP code")
            }
        }
        let (token, expires) = try await auth.issue(user: account.id, version: account.tokenVersion)
        return try HTTPAPI.json(TokenBody(token: token, user_id: account.id, expires_at: Self.iso(expires)))
    }

    func logout(_ request: Request) async throws -> Response {
        let me = try await authenticate(request)
        try await action(me)
        try Self.noBody(request)
        try await write(Ids.homeShard(me.id, shards: shards), .revokeTokens(user: me.id))
        return Response(status: .noContent)
    }

    struct UserBody: Encodable {
        var user_id: UInt64
        var username: String
        var display_name: String
        var totp_enabled: Bool? = nil
        var created_at: String? = nil
        var push_preview: Bool? = nil
    }

    func me(_ request: Request) async throws -> Response {
        let me = try await authenticate(request)
        return try HTTPAPI.json(
            UserBody(
                user_id: me.id, username: me.username, display_name: me.displayName, totp_enabled: me.totpState == 2,
                created_at: Self.iso(micros: me.createdMicros), push_preview: me.pushPreview))
    }

    struct ProfileBody: Decodable {
        var display_name: String?
        /// Offline notifications may carry message text (Docs/delivery.md, "Offline push").
        var push_preview: Bool?
        static let keys: Set<String> = ["display_name", "push_preview"]
    }

    func updateMe(_ request: Request) async throws -> Response {
        let me = try await authenticate(request)
        try await action(me)
        let body = try await decode(ProfileBody.self, request, keys: ProfileBody.keys)
        guard body.display_name != nil || body.push_preview != nil else {
            throw APIError(.badRequest, "missing_field", "give display_name, push_preview or both")
        }
        if let d = body.display_name { try Self.checkDisplayName(d) }
        let home = Ids.homeShard(me.id, shards: shards)
        if let d = body.display_name { try await write(home, .profile(user: me.id, displayName: d)) }
        if let p = body.push_preview { try await write(home, .pushPreview(user: me.id, on: p)) }
        return try HTTPAPI.json(
            UserBody(
                user_id: me.id, username: me.username, display_name: body.display_name ?? me.displayName, totp_enabled: me.totpState == 2,
                created_at: Self.iso(micros: me.createdMicros), push_preview: body.push_preview ?? me.pushPreview))
    }

    func user(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        _ = try await authenticate(request)
        let id = try Self.userParameter(context)
        guard let a = try await account(id) else { throw Self.unknownUser }
        return try HTTPAPI.json(UserBody(user_id: a.id, username: a.username, display_name: a.displayName))
    }

    func userByName(_ request: Request) async throws -> Response {
        _ = try await authenticate(request)
        try Self.onlyQuery(request, ["username"])
        guard let given = request.uri.queryParameters.get("username") else {
            throw APIError(.badRequest, "missing_parameter", "username is required")
        }
        guard let name = Ids.normalisedUsername(given) else { throw Self.unknownUser }
        let shard = Ids.usernameShard(name, shards: shards)
        guard let a = try await asked(shard, .accountByUsername(name), at: .local).account else {
            throw Self.unknownUser
        }
        return try HTTPAPI.json(UserBody(user_id: a.id, username: a.username, display_name: a.displayName))
    }

    // MARK: TOTP

    struct TOTPEnableBody: Encodable {
        var secret: String
        var otpauth_uri: String
    }

    func totpEnable(_ request: Request) async throws -> Response {
        let me = try await authenticate(request)
        try await action(me)
        try Self.noBody(request)
        guard me.totpState != 2 else { throw APIError(.conflict, "totp_enabled", "TOTP is already on; disable it first") }
        // 32 characters of the base32 alphabet (160 bits): HummingbirdOTP keys HMAC with the secret's UTF-8
        // bytes, and an authenticator app gets those bytes base32-encoded in the URI.
        let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567".utf8)
        var rng = SystemRandomNumberGenerator()
        let secret = (0..<32).map { _ in alphabet[Int.random(in: 0..<alphabet.count, using: &rng)] }
        let sealed = try auth.seal(secret, user: me.id)
        try await write(Ids.homeShard(me.id, shards: shards), .totp(user: me.id, state: 1, sealed: sealed))
        let totp = TOTP(secret: String(decoding: secret, as: UTF8.self))
        let uri = totp.createAuthenticatorURL(label: "Weft:\(me.username)", issuer: "Weft")
        let b32 = URLComponents(string: uri)?.queryItems?.first { $0.name == "secret" }?.value ?? ""
        return try HTTPAPI.json(TOTPEnableBody(secret: b32, otpauth_uri: uri))
    }

    struct CodeBody: Decodable {
        var code: String
        static let keys: Set<String> = ["code"]
    }

    /// Turns TOTP on (from enrolling: the sealed secret stays) or off (the secret goes), with a current
    /// code. Either way every session of the user ends (the token version moves), this one too.
    func totpConfirm(_ request: Request) async throws -> Response {
        try await totpChange(request, from: 1, to: 2, notThere: APIError(.conflict, "totp_not_enrolling", "call /api/v1/auth/totp/enable first"))
    }

    func totpDisable(_ request: Request) async throws -> Response {
        try await totpChange(request, from: 2, to: 0, notThere: APIError(.conflict, "totp_not_enabled", "TOTP is not on"))
    }

    func totpChange(_ request: Request, from: UInt8, to: UInt8, notThere: APIError) async throws -> Response {
        let me = try await authenticate(request)
        try await action(me)
        let body = try await decode(CodeBody.self, request, keys: CodeBody.keys)
        let home = Ids.homeShard(me.id, shards: shards)
        let sealed = try await asked(home, .accountSecrets(me.id), at: .linearizable).account?.totpSealed ?? []
        guard me.totpState == from, let secret = auth.unseal(sealed, user: me.id) else { throw notThere }
        guard TOTPCheck.matches(body.code, secret: secret) else { throw APIError(.badRequest, "invalid_totp", "wrong or expired TOTP code") }
        try await write(home, .totp(user: me.id, state: to, sealed: to == 0 ? [] : sealed))
        return Response(status: .noContent)
    }

    // MARK: Contacts

    struct ContactRequestBody: Decodable {
        var user_id: UInt64
        var note: String?
        static let keys: Set<String> = ["user_id", "note"]
    }

    struct StatusBody: Encodable {
        var status: String
    }

    func contactRequest(_ request: Request) async throws -> Response {
        let me = try await authenticate(request)
        try await action(me)
        let body = try await decode(ContactRequestBody.self, request, keys: ContactRequestBody.keys)
        let note = body.note ?? ""
        guard note.utf8.count <= MessagingLimits.noteBytesMax else {
            throw APIError(.badRequest, "note_too_long", "a note has at most \(MessagingLimits.noteBytesMax) bytes")
        }
        guard body.user_id != me.id else { throw APIError(.badRequest, "invalid_user", "you cannot add yourself") }
        guard Ids.isUserID(body.user_id), try await account(body.user_id) != nil else { throw Self.unknownUser }
        let outcome = try await write(
            Ids.pairShard(me.id, body.user_id, shards: shards), .contactRequest(from: me.id, to: body.user_id, note: note))
        guard case .accepted(let b) = outcome else { throw Self.refusal(outcome) }
        return try HTTPAPI.json(StatusBody(status: b == [1] ? "contacts" : "requested"), status: b == [1] ? .ok : .accepted)
    }

    func contactAccept(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        let me = try await authenticate(request)
        try await action(me)
        try Self.noBody(request)
        let other = try Self.userParameter(context)
        guard other != me.id else { throw APIError(.notFound, "no_request", "no pending request from that user") }
        let outcome = try await write(Ids.pairShard(me.id, other, shards: shards), .contactAccept(by: me.id, other: other))
        guard case .accepted = outcome else { throw Self.refusal(outcome) }
        return try HTTPAPI.json(StatusBody(status: "contacts"))
    }

    struct ContactsBody: Encodable {
        struct Entry: Encodable {
            var user_id: UInt64
            var username: String?
            var display_name: String?
            var since: String
            var note: String?
        }
        var contacts: [Entry]
        var incoming_requests: [Entry]
        var outgoing_requests: [Entry]
        var blocked: [UInt64]
    }

    func contacts(_ request: Request) async throws -> Response {
        let me = try await authenticate(request)
        try Self.onlyQuery(request, [])
        let home = Ids.homeShard(me.id, shards: shards)
        let peers = try await asked(home, .peers(me.id), at: .linearizable).peers
        var out = ContactsBody(contacts: [], incoming_requests: [], outgoing_requests: [], blocked: [])
        var lookups = 0
        for (id, v) in peers.sorted(by: { $0.key < $1.key }) where Ids.isUserID(id) {
            if v.blocked { out.blocked.append(id) }
            guard v.relation != .none else { continue }
            // Names for the first 200 entries (the rest: GET /api/v1/users/{id}); one lookup each.
            let a = lookups < 200 ? try? await account(id, consistency: .local) : nil
            lookups += 1
            let e = ContactsBody.Entry(
                user_id: id, username: a?.username, display_name: a?.displayName, since: Self.iso(micros: v.sinceMicros),
                note: v.relation == .incoming ? v.note : nil)
            switch v.relation {
            case .contact: out.contacts.append(e)
            case .incoming: out.incoming_requests.append(e)
            case .outgoing: out.outgoing_requests.append(e)
            case .none: break
            }
        }
        return try HTTPAPI.json(out)
    }

    func contactRemove(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        let me = try await authenticate(request)
        try await action(me)
        let other = try Self.userParameter(context)
        guard other != me.id else { throw APIError(.notFound, "not_contacts", "not a contact") }
        let outcome = try await write(Ids.pairShard(me.id, other, shards: shards), .contactRemove(by: me.id, other: other))
        guard case .accepted = outcome else { throw Self.refusal(outcome) }
        return Response(status: .noContent)
    }

    func block(_ request: Request, _ context: BasicRequestContext, on: Bool) async throws -> Response {
        let me = try await authenticate(request)
        try await action(me)
        try Self.noBody(request)
        let other = try Self.userParameter(context)
        guard other != me.id else { throw APIError(.badRequest, "invalid_user", "you cannot block yourself") }
        guard try await account(other) != nil else { throw Self.unknownUser }
        let outcome = try await write(Ids.pairShard(me.id, other, shards: shards), .block(by: me.id, other: other, on: on))
        guard case .accepted = outcome else { throw Self.refusal(outcome) }
        return Response(status: .noContent)
    }

    // MARK: Messages

    struct SendBody: Decodable {
        /// Exactly one of `receiver_id` (a 1:1 message) and `group_id`.
        var receiver_id: UInt64?
        var group_id: UInt64?
        var message_type: String
        var content: String?
        var media_url: String?
        var mime_type: String?
        var size: UInt64?
        var client_msg_id: String?
        /// Group messages: members named with @, and @all (owner and admins).
        var mentions: [UInt64]?
        var mention_all: Bool?
        static let keys: Set<String> = [
            "receiver_id", "group_id", "message_type", "content", "media_url", "mime_type", "size", "client_msg_id", "mentions", "mention_all",
        ]
    }

    struct SentBody: Encodable {
        var message_id: UInt64
        var status = "sent"
        var created_at: String
        var conversation_id: String
        var seq: UInt64
    }

    func send(_ request: Request) async throws -> Response {
        let me = try await authenticate(request)
        let body = try await decode(SendBody.self, request, keys: SendBody.keys)
        let (sent, replayed) = try await send(body, from: me)
        var response = try HTTPAPI.json(sent)
        if replayed { response.headers[HTTPAPI.replayedHeader] = "true" }
        return response
    }

    /// A message from `me`, validated, rate-limited and written once per `client_msg_id`: the HTTP route's
    /// and the WebSocket's `send` frame's one path.
    func send(_ body: SendBody, from me: Account) async throws -> (SentBody, replayed: Bool) {
        guard let kind = MessageKind(name: body.message_type) else {
            throw APIError(.badRequest, "invalid_message_type", "message_type is one of text, image, video, audio, file")
        }
        guard (body.receiver_id == nil) != (body.group_id == nil) else {
            throw APIError(.badRequest, "invalid_receiver", "a message has exactly one of receiver_id and group_id")
        }
        if let g = body.group_id {
            guard Ids.isGroupID(g) else { throw Self.unknownGroup }
        } else {
            guard body.mentions == nil, body.mention_all == nil else {
                throw APIError(.badRequest, "unexpected_mentions", "mentions are for group messages")
            }
        }
        let receiver = body.receiver_id ?? 0
        if body.group_id == nil {
            guard receiver != me.id else { throw APIError(.badRequest, "invalid_receiver", "you cannot message yourself") }
            guard Ids.isUserID(receiver) else { throw Self.unknownUser }
        }
        let content = body.content ?? ""
        if kind == .text {
            guard !content.isEmpty else { throw APIError(.badRequest, "missing_content", "a text message needs content") }
            guard body.media_url == nil, body.mime_type == nil, body.size == nil else {
                throw APIError(.badRequest, "unexpected_media", "a text message has no media_url, mime_type or size")
            }
        } else {
            guard let url = body.media_url, !url.isEmpty, let mime = body.mime_type, !mime.isEmpty else {
                throw APIError(.badRequest, "missing_media", "a \(kind.name) message needs media_url and mime_type")
            }
            guard url.hasPrefix("https://") || url.hasPrefix("http://") else {
                throw APIError(.badRequest, "invalid_media_url", "media_url is an http(s) URL")
            }
            guard (body.size ?? 0) <= (1 << 53) - 1 else { throw APIError(.badRequest, "invalid_size", "size is at most 2^53 - 1") }
        }
        guard content.utf8.count <= MessagingLimits.textBytesMax else {
            throw APIError(.badRequest, "content_too_long", "content has at most \(MessagingLimits.textBytesMax) bytes")
        }
        guard (body.media_url ?? "").utf8.count <= MessagingLimits.mediaURLBytesMax, (body.mime_type ?? "").utf8.count <= MessagingLimits.mimeTypeBytesMax else {
            throw APIError(.badRequest, "field_too_long", "media_url has at most \(MessagingLimits.mediaURLBytesMax) bytes, mime_type \(MessagingLimits.mimeTypeBytesMax)")
        }
        var key: [UInt8]?
        if let id = body.client_msg_id {
            let u = Array(id.utf8)
            guard (1...48).contains(u.count), u.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
                throw APIError(.badRequest, "invalid_client_msg_id", "client_msg_id has 1-48 visible ASCII characters")
            }
            // Namespaced by sender and receiver (or group): one user's ids never meet another's.
            var k: [UInt8] = [body.group_id == nil ? 0x6D : 0x67]
            withUnsafeBytes(of: UInt32(me.id).littleEndian) { k += $0 }
            if let g = body.group_id {
                withUnsafeBytes(of: g.littleEndian) { k += $0 }
            } else {
                withUnsafeBytes(of: UInt32(receiver).littleEndian) { k += $0 }
            }
            key = k + u
        }
        try await RateLimiter.take(.send, user: me.id, perMinute: node.config.messaging.sendsPerMinute, through: node)
        if let g = body.group_id { return try await sendToGroup(g, body, kind: kind, from: me, key: key) }
        let shard = Ids.pairShard(me.id, receiver, shards: shards)
        let op = MessagingOp.message(
            from: me.id, to: receiver, kind: kind, content: content, mediaURL: body.media_url ?? "", mimeType: body.mime_type ?? "",
            size: body.size ?? 0)
        let written = try await writeRefs(shard, [op], key: key)
        guard let ref = written.refs.first else { throw APIError(.serviceUnavailable, "unavailable", "the write returned nothing") }
        guard case .accepted(let b) = ref.outcome, let micros = Self.u64(b) else { throw Self.refusal(ref.outcome) }
        let sent = SentBody(
            message_id: Ids.messageID(shard: shard, index: ref.index), created_at: Self.iso(micros: Int64(bitPattern: micros)),
            conversation_id: Ids.conversationID(me.id, receiver), seq: ref.seq)
        return (sent, written.replayed)
    }

    struct MessageBody: Encodable {
        var message_id: UInt64
        var conversation_id: String
        var seq: UInt64
        var sender_id: UInt64
        var receiver_id: UInt64?
        var group_id: UInt64?
        var message_type: String
        var content: String
        var media_url: String?
        var mime_type: String?
        var size: UInt64?
        var created_at: String
        var recalled: Bool
        var mentions: [UInt64]?
        var mention_all: Bool?
    }

    struct MessagesPage: Encodable {
        var messages: [MessageBody]
        var next_cursor: String?
        func encode(to e: any Encoder) throws {
            var c = e.container(keyedBy: Keys.self)
            try c.encode(messages, forKey: .messages)
            try c.encode(next_cursor, forKey: .next_cursor)
        }
        enum Keys: CodingKey { case messages, next_cursor }
    }

    func history(_ request: Request) async throws -> Response {
        let me = try await authenticate(request)
        try Self.onlyQuery(request, ["receiver_id", "group_id", "limit", "cursor"])
        let q = request.uri.queryParameters
        if let groupText = q.get("group_id") {
            guard q.get("receiver_id") == nil else { throw APIError(.badRequest, "invalid_parameter", "receiver_id or group_id, not both") }
            guard let g = Self.number(groupText), Ids.isGroupID(g) else { throw Self.unknownGroup }
            let limit = try Self.limit(q.get("limit"))
            var before: UInt64?
            if let c = q.get("cursor") {
                guard let v = Self.number(c), v >= 1 else { throw APIError(.badRequest, "invalid_cursor", "the cursor is not one this API gave") }
                before = v
            }
            try await RateLimiter.take(.history, user: me.id, perMinute: node.config.messaging.historyReadsPerMinute, through: node)
            return try HTTPAPI.json(await groupHistory(g, me: me.id, limit: limit, before: before))
        }
        guard let peerText = q.get("receiver_id") else { throw APIError(.badRequest, "missing_parameter", "receiver_id or group_id is required") }
        guard let peer = Self.number(peerText), Ids.isUserID(peer), peer != me.id else {
            throw APIError(.badRequest, "invalid_parameter", "receiver_id is a user id other than yours")
        }
        let limit = try Self.limit(q.get("limit"))
        var before: UInt64?
        if let c = q.get("cursor") {
            guard let v = Self.number(c), v >= 1 else { throw APIError(.badRequest, "invalid_cursor", "the cursor is not one this API gave") }
            before = v
        }
        try await RateLimiter.take(.history, user: me.id, perMinute: node.config.messaging.historyReadsPerMinute, through: node)
        let shard = Ids.pairShard(me.id, peer, shards: shards)
        // Linearizable: the caller's own sends (acknowledged before this read) are in it.
        let (pair, applied) = try await pairAt(shard, me.id, peer)
        let end = min(before ?? (pair.lastSeq + 1), pair.lastSeq + 1)
        guard end > 1 else { return try HTTPAPI.json(MessagesPage(messages: [], next_cursor: nil)) }
        let from = end > UInt64(limit) ? end - UInt64(limit) : 1
        // At least where the state was read: the same node's replica has them (or the node asked).
        let records = try Self.records(
            await node.readAnywhere(
                shard: shard, .stream(Ids.dm(me.id, peer), fromSeq: from, limit: Int(end - from)), consistency: applied > 0 ? .atLeast(applied) : .linearizable))
        var out: [MessageBody] = []
        for r in records.reversed() where r.seq < end && !pair.isVoid(r.seq) {
            if let m = Self.message(r, shard: shard, recalled: pair.isRecalled(r.seq)) { out.append(m) }
        }
        return try HTTPAPI.json(MessagesPage(messages: out, next_cursor: from > 1 ? "\(from)" : nil))
    }

    static func message(_ r: Record, shard: ShardID, recalled: Bool) -> MessageBody? {
        guard r.index >= 1, r.index <= Ids.messageIndexMax, r.type == .messaging, case .message(let from, let to, let kind, let content, let url, let mime, let size) = MessagingOp.decode(r.payload)
        else { return nil }
        return MessageBody(
            message_id: Ids.messageID(shard: shard, index: r.index), conversation_id: Ids.conversationID(from, to), seq: r.seq, sender_id: from,
            receiver_id: to, message_type: kind.name, content: recalled ? "" : content, media_url: recalled || url.isEmpty ? nil : url,
            mime_type: recalled || mime.isEmpty ? nil : mime, size: recalled || kind == .text ? nil : size, created_at: iso(micros: r.timestampMicros),
            recalled: recalled)
    }

    /// The message a message id names, if `me` is in its conversation (else nil: not found, whatever the reason).
    func messageRecord(_ id: UInt64, me: UInt64) async throws -> (shard: ShardID, record: Record, from: UInt64, to: UInt64)? {
        guard let (shard, index) = Ids.parseMessageID(id, shards: shards) else { return nil }
        let result = await node.readAnywhere(shard: shard, .log(from: index, limit: 1), consistency: .linearizable)
        guard case .success(let rr) = result else {
            if case .failure(.read(.compacted)) = result { return nil }
            throw APIError(.serviceUnavailable, "not_current", "the message's shard cannot be read now")
        }
        guard let r = rr.records.first, r.index == index, r.type == .messaging,
            case .message(let from, let to, _, _, _, _, _) = MessagingOp.decode(r.payload), from == me || to == me,
            Ids.pairShard(from, to, shards: shards) == shard
        else { return nil }
        return (shard, r, from, to)
    }

    struct RecalledBody: Encodable {
        var message_id: UInt64
        var status = "recalled"
    }

    func recall(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        let me = try await authenticate(request)
        try await action(me)
        guard let text = context.parameters.get("id"), let id = Self.number(text) else { throw Self.unknownMessage }
        if let (g, r, _) = try await groupMessageRecord(id, me: me.id) {
            // The sender, or the owner or an admin (the group's shard decides).
            _ = try await writeGroup(g, by: me.id, .recall(seq: r.seq, messageID: id))
            return try HTTPAPI.json(RecalledBody(message_id: id))
        }
        guard let (shard, r, from, to) = try await messageRecord(id, me: me.id) else { throw Self.unknownMessage }
        guard from == me.id else { throw APIError(.forbidden, "not_recallable", "only the sender can recall a message") }
        let outcome = try await write(shard, .recall(by: me.id, other: to, seq: r.seq, messageID: id))
        guard case .accepted = outcome else { throw Self.refusal(outcome) }
        return try HTTPAPI.json(RecalledBody(message_id: id))
    }

    // MARK: Sync

    struct EventBody: Encodable {
        var cursor: String
        var type: String
        var created_at: String
        var peer_id: UInt64
        var conversation_id: String?
        var message_id: UInt64?
        var seq: UInt64?
        var from_me: Bool?
        var note: String?
        var message: MessageBody?
        /// Group events: the group, whether a message names the user ("me" or "all"), and what changed.
        var group_id: UInt64?
        var mention: String?
        var user_ids: [UInt64]?
        var user_id: UInt64?
        var role: String?
        var name: String?
        var notice: String?
    }

    struct EventsPage: Encodable {
        var events: [EventBody]
        var next_cursor: String
    }

    func sync(_ request: Request) async throws -> Response {
        let me = try await authenticate(request)
        try Self.onlyQuery(request, ["cursor", "limit"])
        let q = request.uri.queryParameters
        var after: UInt64 = 0
        if let c = q.get("cursor") {
            guard let v = Self.number(c) else { throw APIError(.badRequest, "invalid_cursor", "the cursor is not one this API gave") }
            after = v
        }
        let limit = try Self.limit(q.get("limit"))
        try await RateLimiter.take(.sync, user: me.id, perMinute: node.config.messaging.syncsPerMinute, through: node)
        let home = Ids.homeShard(me.id, shards: shards)
        let result = await node.readAnywhere(shard: home, .stream(Ids.inbox(me.id), fromSeq: after &+ 1, limit: limit), consistency: .linearizable)
        let records = try Self.records(result)
        if case .success(let rr) = result {
            if let expired = Self.cursorExpired(after: after, floor: rr.floor) { throw expired }
            if let head = rr.head, after > head {
                // Not one this inbox gave (another account's, or from before the cluster's data was lost):
                // said, rather than answered with nothing until the inbox grows past it.
                throw APIError(.badRequest, "invalid_cursor", "cursor \(after) is past the end of your inbox (\(head)): sync from a cursor this account was given, or from 0")
            }
            // The cursor is the last event the client processed: an acknowledgement, as a WebSocket
            // `ack` is, so a device that syncs over HTTP gets no offline notification for what it
            // has (Docs/delivery.md, "Acknowledgements"). Within the inbox only: one past its end was
            // refused just above (`head` is set only for a read from past the end).
            if after > 0 { node.delivery.acks.note(user: me.id, cursor: after) }
        }
        let events = await events(records, me: me.id).compactMap(\.body)
        return try HTTPAPI.json(EventsPage(events: events, next_cursor: "\(records.last?.seq ?? after)"))
    }

    /// 410 `cursor_expired` when events right after `after` are no longer held (retention dropped the
    /// inbox's start through `floor - 1`): said, not skipped, so a client never takes a gap for nothing.
    /// `error.cursor` is where it can go on from.
    static func cursorExpired(after: UInt64, floor: UInt64) -> APIError? {
        guard floor > after &+ 1 else { return nil }
        var e = APIError(
            .gone, "cursor_expired",
            "the events after cursor \(after) through \(floor - 1) were dropped by retention; sync from cursor \(floor - 1)")
        e.cursor = "\(floor - 1)"
        return e
    }

    /// The read an event's message body needs: a 1:1 message (its record and the pair's recall marks) or
    /// a group message (its record and the group's).
    enum BodyRead {
        case pair(peer: UInt64, seq: UInt64, id: UInt64)
        case group(UInt64, seq: UInt64, id: UInt64)
    }

    /// Inbox records as client events, one per record (nil for a record that is no event), with message
    /// contents read from their conversations' shards and recall marks from the pairs' state. Used by
    /// sync and by the WebSocket sessions.
    /// `bodies`: false leaves messages out of message events (no reads of the conversations' shards).
    /// `shared`: group message bodies may come from this node's one-second cache (the WebSocket sessions).
    func events(_ records: [Record], me: UInt64, bodies: Bool = true, shared: Bool = false) async -> [(seq: StreamSeq, body: EventBody?)] {
        var events: [(seq: StreamSeq, body: EventBody?)] = []
        // Message contents come from their conversations' shards, recall marks from the pairs' state.
        var recalledCache: [UInt64: Pair] = [:]
        var groupCache: [UInt64: Group?] = [:]
        for r in records {
            guard let (body, read) = Self.event(r, me: me) else {
                events.append((r.seq, nil))
                continue
            }
            var e = body
            switch read {
            case .pair(let peer, let seq, let id)? where bodies:
                guard let (shard, index) = Ids.parseMessageID(id, shards: shards) else { break }
                let key = Ids.pairKey(me, peer)
                if recalledCache[key] == nil {
                    // Unknown (the pair's shard is slow): the event goes without its message below.
                    if case .success(let a?) = await node.ask(shard, .pair(me, peer), at: .atLeast(index)) { recalledCache[key] = a.pair ?? Pair() }
                }
                let read = await node.readAnywhere(shard: shard, .log(from: index, limit: 1), consistency: .atLeast(index))
                if case .success(let rr) = read, let mr = rr.records.first, mr.index == index, let pair = recalledCache[key] {
                    e.message = Self.message(mr, shard: shard, recalled: pair.isRecalled(seq))
                }
            case .group(let g, let seq, let id)? where bodies:
                guard let (shard, index) = Ids.parseMessageID(id, shards: shards) else { break }
                if shared {
                    // The node's sessions share one fetch and one rendering per message.
                    e.message = await recentBodies.get(id) {
                        guard let group = (try? await self.asked(shard, .groupSummary(g), at: .atLeast(index)))?.group else { return nil }
                        let read = await self.node.readAnywhere(shard: shard, .log(from: index, limit: 1), consistency: .atLeast(index))
                        guard case .success(let rr) = read, let mr = rr.records.first, mr.index == index else { return nil }
                        return Self.groupMessage(mr, shard: shard, recalled: group.isRecalled(seq))
                    }
                    break
                }
                var group: Group?
                if let cached = groupCache[g] {
                    group = cached
                } else {
                    group = (try? await asked(shard, .groupSummary(g), at: .atLeast(index)))?.group
                    groupCache[g] = group
                }
                let read = await node.readAnywhere(shard: shard, .log(from: index, limit: 1), consistency: .atLeast(index))
                if case .success(let rr) = read, let mr = rr.records.first, mr.index == index, let group {
                    e.message = Self.groupMessage(mr, shard: shard, recalled: group.isRecalled(seq))
                }
            default:
                break
            }
            events.append((r.seq, e))
        }
        return events
    }

    /// The sessions' events of these records when none needs a read this node has not cached (message
    /// bodies in `recentBodies`); nil when one does. Saves a session a task and two hops per push.
    func cachedEvents(_ records: [Record], me: UInt64) -> [(seq: StreamSeq, body: EventBody?)]? {
        var events: [(seq: StreamSeq, body: EventBody?)] = []
        events.reserveCapacity(records.count)
        for r in records {
            guard let (body, read) = Self.event(r, me: me) else {
                events.append((r.seq, nil))
                continue
            }
            var e = body
            switch read {
            case nil: break
            case .group(_, _, let id)?, .pair(_, _, let id)?:
                guard let body = recentBodies.cached(id) else { return nil }
                e.message = body
            }
            events.append((r.seq, e))
        }
        return events
    }

    /// Records just applied on this node (from the hub, before it hands their inbox entries to the
    /// sessions): the bodies of 1:1 and group messages among them go into `recentBodies`, so the
    /// sessions render their pushes without a read each. A message is not recalled when it commits; a
    /// recall within the cache's second reaches the devices as the `recall` event that follows.
    func noteCommitted(_ records: [Record], shard: ShardID) {
        for r in records where r.type == .messaging && (Ids.isDMStream(r.stream) || Ids.groupOf(r.stream) != nil) {
            guard let op = MessagingOp.decode(r.payload) else { continue }
            let body: MessageBody?
            switch op {
            case .message: body = Self.message(r, shard: shard, recalled: false)
            case .group(let g) where { if case .message = g.action { true } else { false } }(): body = Self.groupMessage(r, shard: shard, recalled: false)
            default: body = nil
            }
            if let body { recentBodies.put(body.message_id, body) }
        }
    }

    /// An inbox record's event without its message body, and the read that body needs; nil for a record
    /// that is no event.
    static func event(_ r: Record, me: UInt64) -> (EventBody, BodyRead?)? {
        guard r.type == .messaging, let op = MessagingOp.decode(r.payload) else { return nil }
        let at = iso(micros: r.timestampMicros)
        var e: EventBody
        var read: BodyRead?
        switch op {
        case .inbox(_, let ev):
            switch ev {
            case .message(let peer, let seq, let fromMe, let id), .recall(let peer, let seq, let fromMe, let id):
                let isMessage = { if case .message = ev { return true } else { return false } }()
                e = EventBody(
                    cursor: "\(r.seq)", type: isMessage ? "message" : "recall", created_at: at, peer_id: peer,
                    conversation_id: Ids.conversationID(me, peer), message_id: id, seq: seq, from_me: fromMe)
                if isMessage { read = .pair(peer: peer, seq: seq, id: id) }
            case .contactRequest(let peer, let fromMe, let note):
                e = EventBody(cursor: "\(r.seq)", type: "contact_request", created_at: at, peer_id: peer, from_me: fromMe, note: fromMe ? nil : note)
            case .contactAccepted(let peer):
                e = EventBody(cursor: "\(r.seq)", type: "contact_accepted", created_at: at, peer_id: peer)
            case .contactRemoved(let peer, let byMe):
                e = EventBody(cursor: "\(r.seq)", type: "contact_removed", created_at: at, peer_id: peer, from_me: byMe)
            case .blocked(let peer, let on):
                e = EventBody(cursor: "\(r.seq)", type: on ? "blocked" : "unblocked", created_at: at, peer_id: peer, from_me: true)
            case .read(let peer, let seq):
                e = EventBody(cursor: "\(r.seq)", type: "read", created_at: at, peer_id: peer, conversation_id: conversation(me, peer), seq: seq)
                if Ids.isGroupID(peer) {
                    e.peer_id = me
                    e.group_id = peer
                }
            case .groupMessage(let g, let seq, let sender, let id, let mention):
                e = EventBody(
                    cursor: "\(r.seq)", type: "group_message", created_at: at, peer_id: sender, conversation_id: Ids.groupConversationID(g), message_id: id,
                    seq: seq, from_me: sender == me, group_id: g, mention: mention == .none ? nil : (mention == .me ? "me" : "all"))
                read = .group(g, seq: seq, id: id)
            case .groupRecall(let g, let seq, let by, let id):
                e = EventBody(
                    cursor: "\(r.seq)", type: "group_recall", created_at: at, peer_id: by, conversation_id: Ids.groupConversationID(g), message_id: id,
                    seq: seq, from_me: by == me, group_id: g)
            case .groupChange(let g, let seq, let by, let change):
                e = EventBody(
                    cursor: "\(r.seq)", type: change.name, created_at: at, peer_id: by, conversation_id: Ids.groupConversationID(g), seq: seq,
                    from_me: by == me, group_id: g)
                switch change {
                case .created(let name): e.name = name
                case .added(let users): e.user_ids = users
                case .removed(let u), .transferred(let u): e.user_id = u
                case .role(let u, let admin):
                    e.user_id = u
                    e.role = admin ? "admin" : "member"
                case .renamed(let name): e.name = name
                case .notice(let t): e.notice = t
                case .dissolved: break
                }
            }
        case .readMark(_, let peer, let seq):
            e = EventBody(cursor: "\(r.seq)", type: "read", created_at: at, peer_id: peer, conversation_id: conversation(me, peer), seq: seq)
            if Ids.isGroupID(peer) {
                e.peer_id = me
                e.group_id = peer
            }
        default:
            return nil
        }
        return (e, read)
    }

    /// The conversation of `me` with a user or a group.
    static func conversation(_ me: UInt64, _ peer: UInt64) -> String {
        Ids.isGroupID(peer) ? Ids.groupConversationID(peer) : Ids.conversationID(me, peer)
    }

    // MARK: Conversations

    struct ConversationBody: Encodable {
        var conversation_id: String
        var peer_id: UInt64
        var peer_display_name: String?
        var last_message: MessageBody?
        var last_message_at: String
        var unread_count: UInt64
        var read_seq: UInt64
        /// Groups: the group, its name, and whether an unread message names the user.
        var group_id: UInt64?
        var group_name: String?
        var mentioned: Bool?
    }

    struct ConversationsPage: Encodable {
        var conversations: [ConversationBody]
    }

    func conversations(_ request: Request) async throws -> Response {
        let me = try await authenticate(request)
        try Self.onlyQuery(request, ["limit"])
        let limit = try Self.limit(request.uri.queryParameters.get("limit"))
        let home = Ids.homeShard(me.id, shards: shards)
        let peers = try await asked(home, .peers(me.id), at: .linearizable).peers
        // A group the user left stays listed (its history up to then is theirs) until it is of no interest.
        let recent = peers.filter { $0.value.lastSeq > 0 }.sorted { ($0.value.lastMicros, $0.key) > ($1.value.lastMicros, $1.key) }.prefix(limit)
        var out: [ConversationBody] = []
        for (peer, v) in recent {
            var last: MessageBody?
            if let (shard, index) = Ids.parseMessageID(v.lastMessageID, shards: shards) {
                let read = await node.readAnywhere(shard: shard, .log(from: index, limit: 1), consistency: .atLeast(index))
                if case .success(let rr) = read, let r = rr.records.first, r.index == index {
                    last = Ids.isGroupID(peer) ? Self.groupMessage(r, shard: shard, recalled: v.lastRecalled) : Self.message(r, shard: shard, recalled: v.lastRecalled)
                }
            }
            if Ids.isGroupID(peer) {
                let group = try? await asked(Ids.groupShard(peer, shards: shards), .groupSummary(peer), at: .local).group
                out.append(
                    ConversationBody(
                        conversation_id: Ids.groupConversationID(peer), peer_id: me.id, peer_display_name: nil, last_message: last,
                        last_message_at: Self.iso(micros: v.lastMicros), unread_count: v.unreadCount, read_seq: v.readSeq, group_id: peer,
                        group_name: group?.name, mentioned: v.mentionSeq > 0))
                continue
            }
            let a = try? await account(peer, consistency: .local)
            out.append(
                ConversationBody(
                    conversation_id: Ids.conversationID(me.id, peer), peer_id: peer, peer_display_name: a?.displayName, last_message: last,
                    last_message_at: Self.iso(micros: v.lastMicros), unread_count: v.unreadCount, read_seq: v.readSeq))
        }
        return try HTTPAPI.json(ConversationsPage(conversations: out))
    }

    struct ReadBody: Decodable {
        var message_id: UInt64
        static let keys: Set<String> = ["message_id"]
    }

    func markRead(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        let me = try await authenticate(request)
        try await action(me)
        if let cid = context.parameters.get("id"), let g = Ids.parseGroupConversationID(cid) {
            let body = try await decode(ReadBody.self, request, keys: ReadBody.keys)
            guard let (mg, r, _) = try await groupMessageRecord(body.message_id, me: me.id), mg == g else { throw Self.unknownMessage }
            try await write(Ids.homeShard(me.id, shards: shards), .readMark(user: me.id, peer: g, seq: r.seq))
            return Response(status: .noContent)
        }
        guard let cid = context.parameters.get("id"), let (lo, hi) = Ids.parseConversationID(cid), lo == me.id || hi == me.id else {
            throw APIError(.notFound, "unknown_conversation", "no such conversation")
        }
        let peer = lo == me.id ? hi : lo
        let body = try await decode(ReadBody.self, request, keys: ReadBody.keys)
        guard let (_, r, from, to) = try await messageRecord(body.message_id, me: me.id), Set([from, to]) == Set([lo, hi]) else {
            throw Self.unknownMessage
        }
        try await write(Ids.homeShard(me.id, shards: shards), .readMark(user: me.id, peer: peer, seq: r.seq))
        return Response(status: .noContent)
    }

    // MARK: Plumbing

    static let unknownUser = APIError(.notFound, "unknown_user", "no such user")
    static let unknownMessage = APIError(.notFound, "unknown_message", "no such message")

    /// The caller's account, from a valid bearer token whose version the account still has.
    func authenticate(_ request: Request) async throws -> Account {
        guard let header = request.headers[.authorization], header.hasPrefix("Bearer ") else {
            throw APIError(.unauthorized, "unauthorized", "this route needs Authorization: Bearer <token> from /api/v1/auth/login")
        }
        return try await account(bearer: String(header.dropFirst(7)))
    }

    /// The account a bearer token stands for, if the token is valid and not revoked.
    func account(bearer token: String) async throws -> Account {
        guard let (user, version) = await auth.check(token) else {
            throw APIError(.unauthorized, "invalid_token", "the token is not valid (malformed, tampered with or expired)")
        }
        guard let a = try await account(user), a.tokenVersion == version else {
            throw APIError(.unauthorized, "token_revoked", "the token was revoked (logged out); log in again")
        }
        return a
    }

    /// A user's account from their home shard: this node's replica as it is, and if it does not know
    /// the user (it may lag a registration), the leader's read point.
    func account(_ id: UInt64, consistency: ReadPoint? = nil) async throws -> Account? {
        let home = Ids.homeShard(id, shards: shards)
        if let consistency { return try await asked(home, .account(id), at: consistency).account }
        // This node's replica if it is current (has heard from a leader, applied all it knows committed,
        // not replaying or repairing: else it could hold a revoked token's old version) and knows the user;
        // else — and always when another node would have to answer, which may be cut off from its
        // shard's quorum without knowing it — the leader's read point.
        guard node.runner(home) != nil else { return try await asked(home, .account(id), at: .linearizable).account }
        switch await node.ask(home, .account(id), at: .localCurrent) {
        case .success(let a?) where a.account != nil: return a.account
        case .failure(let f): throw Self.readError(f, home)
        default: return try await asked(home, .account(id), at: .linearizable).account
        }
    }

    func asked(_ shard: ShardID, _ q: MessagingQuery, at point: ReadPoint) async throws -> MessagingQuery.Answer {
        switch await node.ask(shard, q, at: point) {
        case .success(let a?): return a
        case .success(nil): throw APIError(.serviceUnavailable, "not_current", "shard \(shard)'s replica is catching up")
        case .failure(let f): throw Self.readError(f, shard)
        }
    }

    /// A pair's state, linearizably (the caller's own writes are in it), and the index it was read at.
    func pairAt(_ shard: ShardID, _ a: UInt64, _ b: UInt64) async throws -> (Pair, LogIndex) {
        if node.runner(shard) != nil {
            // Hedged: a replica just cut off from its leader would wait out the deadline (`WeftNode.hedged`).
            switch await node.linearizableHere(shard, .pair(a, b), { m, applied in (m.pair(a, b), applied) }, elsewhere: { ($0.pair, 0) }) {
            case .success(let (p, applied)): return (p ?? Pair(), applied)
            case .failure(let f): throw Self.readError(f, shard)
            }
        }
        // Asked of another node (index 0): the stream read then asks for a read index of its own.
        return (try await asked(shard, .pair(a, b), at: .linearizable).pair ?? Pair(), 0)
    }

    static func readError(_ f: WeftNode.ReadFailure, _ shard: ShardID) -> APIError {
        switch f {
        case .noReplica: APIError(.serviceUnavailable, "unavailable", "this node holds no replica of shard \(shard); ask another node")
        case .invalid(let why): APIError(.badRequest, "invalid", why)
        case .read(.compacted(let first)): APIError(.gone, "compacted", "records before index \(first) were dropped by retention")
        case .read(.damaged(let why)), .read(.unavailable(let why)), .unavailable(let why): APIError(.serviceUnavailable, "not_current", why)
        }
    }

    static func records(_ r: Result<ReadResult, WeftNode.ReadFailure>) throws -> [Record] {
        switch r {
        case .success(let rr): return rr.records
        case .failure(let f): throw readError(f, ShardID(0))
        }
    }

    /// Writes one operation; a rejection by apply (a race the leader's check could not see) is thrown as
    /// the same refusal the check would have given.
    @discardableResult
    func write(_ shard: ShardID, _ op: MessagingOp) async throws -> ApplyOutcome {
        let w = try await writeRefs(shard, [op], key: nil)
        let outcome = w.refs.first?.outcome ?? .ok
        if case .rejected = outcome { throw Self.refusal(outcome) }
        return outcome
    }

    /// Other writes a user makes count against `actions_per_minute`.
    func action(_ me: Account) async throws {
        try await RateLimiter.take(.action, user: me.id, perMinute: node.config.messaging.actionsPerMinute, through: node)
    }

    func writeRefs(_ shard: ShardID, _ ops: [MessagingOp], key: [UInt8]?) async throws -> WeftNode.Written {
        do {
            return try await node.writeMessaging(shard: shard, ops, key: key)
        } catch let e as WriteError {
            if case .refused(let code, let message) = e { throw Self.refusal(.rejected(code: code, message: message)) }
            throw HTTPAPI.apiError(e)
        }
    }

    /// A domain refusal as the client sees it.
    static func refusal(_ o: ApplyOutcome) -> APIError {
        guard case .rejected(let code, let message) = o else { return APIError(.internalServerError, "internal", "unexpected outcome") }
        switch code {
        case "username_taken", "already_contacts", "already_requested", "totp_enabled", "group_full", "already_member", "owner_cannot_leave",
            "group_dissolved", "group_exists", "group_changed":
            return APIError(.conflict, code, message)
        case "not_allowed", "not_recallable": return APIError(.forbidden, code, message)
        case "no_request", "not_contacts", "unknown_user", "not_member": return APIError(.notFound, code, message)
        case "ids_exhausted": return APIError(.serviceUnavailable, code, message)
        default: return APIError(.badRequest, code, message)
        }
    }

    func hashPassword(_ p: String) async throws -> String {
        do { return try await auth.hash(p) } catch { throw Self.busy }
    }

    func verifyPassword(_ p: String, hash: String?) async throws -> Bool {
        do { return try await auth.verify(p, hash: hash) } catch { throw Self.busy }
    }

    static let busy = APIError(.serviceUnavailable, "busy", "too many password checks in progress on this node; retry shortly")

    static func checkPassword(_ p: String) throws {
        // bcrypt reads at most 72 bytes: a longer password would be silently cut.
        guard p.count >= 8, p.utf8.count <= 72 else {
            throw APIError(.badRequest, "invalid_password", "a password has at least 8 characters and at most 72 bytes")
        }
    }

    static func checkDisplayName(_ d: String) throws {
        guard !d.isEmpty, d.utf8.count <= MessagingLimits.displayNameBytesMax, !d.unicodeScalars.contains(where: { $0.properties.generalCategory == .control })
        else {
            throw APIError(.badRequest, "invalid_display_name", "a display name has 1-\(MessagingLimits.displayNameBytesMax) bytes and no control characters")
        }
    }

    static func userParameter(_ context: BasicRequestContext) throws -> UInt64 {
        guard let s = context.parameters.get("id"), let v = number(s), Ids.isUserID(v) else { throw unknownUser }
        return v
    }

    /// A decimal number as this API writes them (no sign, no leading zeros, at most 19 digits).
    static func number(_ s: String) -> UInt64? {
        guard !s.isEmpty, s.utf8.count <= 19, s.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }), s == "0" || s.first != "0" else { return nil }
        return UInt64(s)
    }

    static func limit(_ s: String?) throws -> Int {
        guard let s else { return 20 }
        guard let v = number(s), v >= 1, v <= UInt64(pageMax) else { throw APIError(.badRequest, "invalid_limit", "limit is 1-\(pageMax)") }
        return Int(v)
    }

    /// Refuses query parameters the route does not take (a typo must not be silently ignored).
    static func onlyQuery(_ request: Request, _ allowed: Set<String>) throws {
        for (k, _) in request.uri.queryParameters where !allowed.contains(String(k)) {
            throw APIError(.badRequest, "unknown_parameter", "unknown query parameter \(String(k).prefix(64))")
        }
    }

    /// Routes without a body refuse one (a client sending fields expects them to mean something).
    static func noBody(_ request: Request) throws {
        if let n = request.headers[.contentLength], n != "0" { throw APIError(.badRequest, "unexpected_body", "this route takes no body") }
    }

    /// Decodes a JSON object body strictly: valid UTF-8 JSON, an object, no unknown fields, the right types.
    func decode<T: Decodable>(_: T.Type, _ request: Request, keys: Set<String>) async throws -> T {
        let buffer = try await request.body.collect(upTo: Self.bodyBytesMax)
        return try Self.decode(T.self, Data(buffer.readableBytesView), keys: keys)
    }

    static func decode<T: Decodable>(_: T.Type, _ data: Data, keys: Set<String>) throws -> T {
        // Both Foundation parsers also read UTF-16 and UTF-32 (with or without a byte-order mark), which
        // always hold a NUL byte; UTF-8 JSON never does. Bodies are UTF-8 (and the duplicate-key check
        // reads UTF-8).
        guard !data.contains(0) else { throw APIError(.badRequest, "malformed_json", "the body is not valid JSON (UTF-8)") }
        guard let object = try? JSONSerialization.jsonObject(with: data, options: []) else {
            throw APIError(.badRequest, "malformed_json", "the body is not valid JSON (UTF-8)")
        }
        guard let dict = object as? [String: Any] else { throw APIError(.badRequest, "malformed_json", "the body must be a JSON object") }
        try refuseDuplicateKeys(data)
        try checkFields(dict, keys: keys)
        return try decodeFields(T.self, data)
    }

    /// A key that appears twice in one object (the field checks and the decoder would read different
    /// copies of it: `JSONDuplicateKeys`).
    static func refuseDuplicateKeys(_ data: some Collection<UInt8>) throws {
        if let key = JSONDuplicateKeys.first(in: data) {
            throw APIError(.badRequest, "duplicate_field", "the field \(key.prefix(64)) appears twice in one object")
        }
    }

    /// What `decode` refuses before decoding: a field not in `keys`, or a null.
    static func checkFields(_ dict: [String: Any], keys: Set<String>) throws {
        if let unknown = dict.keys.sorted().first(where: { !keys.contains($0) }) {
            throw APIError(.badRequest, "unknown_field", "unknown field \(unknown.prefix(64))")
        }
        // An optional field is left out, never null.
        if let null = dict.keys.sorted().first(where: { dict[$0] is NSNull }) {
            throw APIError(.badRequest, "wrong_type", "\(null) must not be null (leave it out)")
        }
    }

    /// `JSONDecoder` with its errors as the API's; `dropping` leading components of a field's path (the
    /// name of the object that held the body, when it was decoded inside another).
    static func decodeFields<T: Decodable>(_: T.Type, _ data: Data, dropping: Int = 0) throws -> T {
        func path(_ c: DecodingError.Context) -> String { c.codingPath.dropFirst(dropping).map(\.stringValue).joined(separator: ".") }
        do {
            return try JSONDecoder().decode(T.self, from: data)
        } catch let DecodingError.keyNotFound(key, _) {
            throw APIError(.badRequest, "missing_field", "\(key.stringValue) is required")
        } catch let DecodingError.typeMismatch(_, c) {
            throw APIError(.badRequest, "wrong_type", "\(path(c)) has the wrong type")
        } catch let DecodingError.valueNotFound(_, c) {
            throw APIError(.badRequest, "wrong_type", "\(path(c)) must not be null")
        } catch let DecodingError.dataCorrupted(c) {
            throw APIError(.badRequest, "wrong_type", "\(path(c)): \(c.debugDescription)")
        }
    }

    static func u64(_ b: [UInt8]) -> UInt64? {
        guard b.count == 8 else { return nil }
        return b.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
    }

    static func iso(_ d: Date) -> String {
        d.formatted(.iso8601.year().month().day().dateSeparator(.dash).time(includingFractionalSeconds: true).timeSeparator(.colon).timeZone(separator: .omitted))
    }

    static func iso(micros: Int64) -> String { ISOTime.string(micros: micros) }
}

/// TOTP codes (RFC 6238: 6 digits, 30 s, SHA-1, as authenticator apps do), one step of clock skew either way.
enum TOTPCheck {
    static func matches(_ code: String, secret: [UInt8], now: Date = Date()) -> Bool {
        guard code.utf8.count == 6, code.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }), let given = Int(code) else { return false }
        let totp = TOTP(secret: String(decoding: secret, as: UTF8.self))
        return [-30.0, 0, 30].contains { totp.compute(date: now.addingTimeInterval($0)) == given }
    }
}
