import ClusterConfig
import AsyncHTTPClient
import Crypto
import Foundation
import Logging
import Messaging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import Replication
import ShardState
import WeftCore

/// Devices' acknowledgements, coalesced per user and written to each user's home shard as `delivered`
/// marks (Docs/delivery.md, "Offline push"): at most one write per shard per flush, however many
/// devices ack how often.
final class AckWriter: Sendable {
    let pending = NIOLockedValueBox<[UInt64: StreamSeq]>([:])
    static let flushEvery: Duration = .milliseconds(250)
    /// Users with pending marks a node keeps at most (a flood of acks while the shards are unreachable
    /// drops marks: the cost is a notification that was not needed).
    static let pendingMax = 1 << 20

    /// The last mark written per user (bounded: forgotten wholesale past `pendingMax`), so a device that
    /// reconnects in a loop from the same cursor writes nothing new.
    let written = NIOLockedValueBox<[UInt64: StreamSeq]>([:])

    func note(user: UInt64, cursor: StreamSeq) {
        if let w = written.withLockedValue({ $0[user] }), w >= cursor { return }
        pending.withLockedValue { p in
            if let old = p[user] {
                p[user] = max(old, cursor)
            } else if p.count < Self.pendingMax {
                p[user] = cursor
            }
        }
    }

    /// Flushes until cancelled.
    func run(node: WeftNode) async {
        while !Task.isCancelled {
            try? await Task.sleep(for: Self.flushEvery)
            await flush(node: node)
        }
    }

    func flush(node: WeftNode) async {
        let marks = pending.withLockedValue { p in
            defer { p = [:] }
            return p
        }
        guard !marks.isEmpty else { return }
        let shards = node.config.shards
        var byShard: [ShardID: [MessagingOp]] = [:]
        for (u, c) in marks { byShard[Ids.homeShard(u, shards: shards), default: []].append(.delivered(user: u, seq: c)) }
        await withTaskGroup(of: Void.self) { group in
            for (shard, ops) in byShard {
                for chunk in stride(from: 0, to: ops.count, by: RequestWindow.keyedRecordsMax).map({ Array(ops[$0..<min($0 + RequestWindow.keyedRecordsMax, ops.count)]) }) {
                    group.addTask {
                        do {
                            _ = try await node.writeMessaging(shard: shard, chunk)
                            self.written.withLockedValue { w in
                                if w.count > Self.pendingMax { w = [:] }
                                for case .delivered(let u, let c) in chunk { w[u] = max(w[u] ?? 0, c) }
                            }
                        } catch {
                            // Kept for the next flush (a higher mark noted meanwhile wins).
                            for case .delivered(let u, let c) in chunk { self.note(user: u, cursor: c) }
                        }
                    }
                }
            }
        }
    }
}

/// Offline push (Docs/delivery.md): on each shard this node leads, users owed a notification for longer
/// than `[push] delay_ms` get their events POSTed to the webhook; a 2xx answer is recorded as the user's
/// `notified` mark through the log. The marks live in the shard's state, so a new leader carries on where
/// the old one stopped: nothing is lost, and what is sent again is at most what was in flight.
actor PushWorker {
    let node: WeftNode
    let api: MessagingAPI
    let config: PushConfig
    let webhook: WebhookClient
    let logger: Logger
    /// Users whose last attempt failed: attempts so far and when to try again.
    var backoff: [UInt64: (attempts: Int, until: ContinuousClock.Instant)] = [:]
    static let passEvery: Duration = .milliseconds(250)
    static let usersPerPass = 64
    static let eventsPerNotification = 100
    static let concurrentPosts = 8
    let sent = Counter(label: "weft_push_notifications_total", dimensions: [("result", "ok")])
    let failed = Counter(label: "weft_push_notifications_total", dimensions: [("result", "failed")])

    init(node: WeftNode, api: MessagingAPI, config: PushConfig, webhook: WebhookClient, logger: Logger) {
        self.node = node
        self.api = api
        self.config = config
        self.webhook = webhook
        self.logger = logger
    }

    func run() async {
        while !Task.isCancelled {
            try? await Task.sleep(for: Self.passEvery)
            await pass()
        }
    }

    /// One pass over the shards this node leads: their owed users first (a quick look at each shard's
    /// state), then the notifications, 8 at a time across all shards (a slow shard does not hold up the
    /// others' users behind it).
    func pass() async {
        let now = ContinuousClock.now
        backoff = backoff.filter { $0.value.until > now }
        let skip = Set(backoff.keys)
        let wall = Int64(Date().timeIntervalSince1970 * 1_000_000)
        let delay = Int64(config.delayMillis) * 1000
        var work: [(ShardID, PushDue)] = []
        for shard in node.ledShards {
            let due = await node.query(shard: shard, consistency: .local) { m, _ in
                // Not before the newest record's time: a new leader whose clock is behind the old one's
                // does not hold notifications back by the difference.
                m.pushDue(nowMicros: max(wall, m.clockMicros), delayMicros: delay, limit: Self.usersPerPass, skip: skip)
            }
            if case .success(let users) = due { work += users.map { (shard, $0) } }
        }
        guard !work.isEmpty else { return }
        var results: [(UInt64, Bool)] = []
        await withTaskGroup(of: (UInt64, Bool).self) { group in
            var started = 0
            for (shard, d) in work {
                if started >= Self.concurrentPosts, let r = await group.next() { results.append(r) }
                started += 1
                group.addTask { [self] in (d.user, await self.notify(d, shard: shard)) }
            }
            for await r in group { results.append(r) }
        }
        for (u, ok) in results {
            if ok {
                backoff[u] = nil
            } else {
                let attempts = (backoff[u]?.attempts ?? 0) + 1
                let wait = min(config.retryMaxMillis, 500 << min(attempts - 1, 20))
                backoff[u] = (attempts, ContinuousClock.now + .milliseconds(wait))
            }
        }
    }

    /// Reads the user's events after their mark, POSTs the ones worth a notification, and records the
    /// mark. False when it should be tried again later.
    nonisolated func notify(_ d: PushDue, shard: ShardID) async -> Bool {
        let read = await node.read(shard: shard, .stream(Ids.inbox(d.user), fromSeq: d.fromSeq, limit: Self.eventsPerNotification), consistency: .local)
        guard case .success(let rr) = read else { return false }
        guard let last = rr.records.last else {
            // Nothing there (dropped by retention): nothing to notify; the mark moves past it.
            return (try? await node.writeMessaging(shard: shard, [.notified(user: d.user, seq: d.pushableLast)])) != nil
        }
        // Message bodies (reads of the conversations' shards) only when the text will be shown.
        let events = await api.events(rr.records, me: d.user, bodies: d.preview).compactMap { seq, body in
            body.flatMap { Self.pushEvent($0, user: d.user, preview: d.preview) }
        }
        if !events.isEmpty {
            let enc = JSONEncoder()
            enc.outputFormatting = [.sortedKeys]
            let payload = PushPayload(
                notification_id: "\(d.user):\(events[0].cursor)-\(last.seq)", user_id: d.user, events: events)
            guard let body = try? enc.encode(payload) else { return false }
            var headers = [("Content-Type", "application/json"), ("X-Weft-Notification-Id", payload.notification_id)]
            if let secret = config.secret {
                let mac = HMAC<SHA256>.authenticationCode(for: body, using: SymmetricKey(data: Data(secret.utf8)))
                headers.append(("X-Weft-Signature", "sha256=" + mac.map { String(format: "%02x", $0) }.joined()))
            }
            do {
                let status = try await webhook.post(body: Array(body), headers: headers)
                guard (200..<300).contains(status) else {
                    logger.warning("push: the webhook answered \(status) for user \(d.user); retrying with back-off")
                    failed.increment()
                    return false
                }
            } catch {
                logger.warning("push: the webhook at \(webhook.url.text) failed for user \(d.user): \(error); retrying with back-off")
                failed.increment()
                return false
            }
            sent.increment()
        }
        do {
            _ = try await node.writeMessaging(shard: shard, [.notified(user: d.user, seq: last.seq)])
            return true
        } catch {
            // Notified but not recorded: the next leader or pass sends it again (receivers de-duplicate
            // by event id).
            return false
        }
    }

    /// The notification form of an inbox event: only messages (1:1 and group) and contact requests from
    /// someone else; the message text only when the user opted in.
    static func pushEvent(_ e: MessagingAPI.EventBody, user: UInt64, preview: Bool) -> PushEvent? {
        guard e.from_me != true, e.type == "message" || e.type == "group_message" || e.type == "contact_request" else { return nil }
        return PushEvent(
            event_id: "\(user):\(e.cursor)", cursor: e.cursor, type: e.type, created_at: e.created_at, peer_id: e.peer_id,
            conversation_id: e.conversation_id, message_id: e.message_id, group_id: e.group_id, mention: e.mention,
            text: preview && e.message?.message_type == "text" && e.message?.recalled == false ? e.message?.content : nil)
    }

    struct PushPayload: Encodable {
        var notification_id: String
        var user_id: UInt64
        var events: [PushEvent]
    }

    struct PushEvent: Encodable {
        /// `<user_id>:<cursor>`: the same event always has the same id (receivers de-duplicate by it).
        var event_id: String
        var cursor: String
        var type: String
        var created_at: String
        var peer_id: UInt64
        var conversation_id: String?
        var message_id: UInt64?
        /// Group messages: the group, and "me" or "all" when the message names the user.
        var group_id: UInt64?
        var mention: String?
        var text: String?
    }
}

/// The webhook's HTTP client: AsyncHTTPClient, one per push worker, so POSTs reuse kept-alive
/// connections (HTTP/1.1, or HTTP/2 when an https receiver offers it), and `https` webhooks are checked
/// against the system's trust store or the certificates of `[push] ca_file`, with the host name, TLS 1.2
/// or later. Redirects are not followed: a webhook that moved is a configuration to fix, not a place to
/// send users' events to.
final class WebhookClient: Sendable {
    struct SetupError: Error, CustomStringConvertible {
        var description: String
    }

    let url: WebhookURL
    let http: HTTPClient
    /// The answer's body is read and dropped (a connection is reused only once it is read): at most this
    /// much, for at most `drainTime`. The status alone decides: a receiver that accepted a notification
    /// and then sends a long or endless body has still accepted it (reading it to the end would let a
    /// receiver hold a POST, and with it the worker's pass, for as long as it likes).
    static let answerBytesMax = 64 << 10
    static let drainTime: Duration = .seconds(2)
    /// Kept connections idle longer are closed: below the usual keep-alive of HTTP servers (5 s), so a
    /// POST is not written on a connection the receiver is closing.
    static let idleTimeout: TimeAmount = .seconds(4)

    /// What an https webhook's certificate is checked against: the system's trust store, or the
    /// certificates in `caFile`. Throws, naming the file, when it holds none NIOSSL can read (checked
    /// before the node starts).
    static func tls(caFile: String?) throws -> TLSConfiguration {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv12
        guard let caFile else { return tls }
        let certificates: [NIOSSLCertificate]
        do {
            certificates = try NIOSSLCertificate.fromPEMFile(caFile)
        } catch {
            throw SetupError(description: "[push] ca_file \(caFile): no certificate could be read: \(error)")
        }
        guard !certificates.isEmpty else {
            throw SetupError(description: "[push] ca_file \(caFile): no certificate in the file")
        }
        tls.trustRoots = .certificates(certificates)
        return tls
    }

    /// Whether the client parses the URL as the configuration did (it parses the text again): checked
    /// before the node starts, so a URL that would fail every POST stops the start instead.
    static func check(_ url: WebhookURL) throws {
        guard let parsed = URL(string: url.text), parsed.scheme == (url.tls ? "https" : "http"),
            let host = parsed.host, !host.isEmpty, (parsed.port ?? (url.tls ? 443 : 80)) == url.port
        else {
            throw SetupError(description: "[push] webhook_url \(url.text): not a URL the HTTP client can use")
        }
    }

    /// Call `shutdown()` before letting go of it (AsyncHTTPClient's rule).
    init(url: WebhookURL, tls: TLSConfiguration, connectTimeout: TimeAmount = .seconds(5), readTimeout: TimeAmount = .seconds(5)) {
        var pool = HTTPClient.Configuration.ConnectionPool(idleTimeout: Self.idleTimeout)
        // A refused connection or a failed handshake fails the POST at once; the worker backs off per
        // user (the client would retry within the connect timeout, 5 s per POST while a webhook is down).
        pool.retryConnectionEstablishment = false
        let configuration = HTTPClient.Configuration(
            tlsConfiguration: tls, redirectConfiguration: .disallow,
            timeout: .init(connect: connectTimeout, read: readTimeout), connectionPool: pool)
        self.url = url
        self.http = HTTPClient(eventLoopGroup: MultiThreadedEventLoopGroup.singleton, configuration: configuration)
    }

    /// One POST: the status code, or an error on a refused connection, a failed TLS handshake (an
    /// untrusted certificate, a wrong host name), no status within `timeout`, or a connection closed
    /// before the status. Returns at most `drainTime` after the status.
    func post(body: [UInt8], headers: [(String, String)], timeout: TimeAmount = .seconds(10)) async throws -> Int {
        var request = HTTPClientRequest(url: url.text)
        request.method = .POST
        request.headers.add(name: "User-Agent", value: "weft-push")
        for (k, v) in headers { request.headers.add(name: k, value: v) }
        request.body = .bytes(ByteBuffer(bytes: body))
        let response = try await http.execute(request, timeout: timeout)
        let status = Int(response.status.code)
        // Cancelling the read (too long, or the time is up) closes that connection.
        await withTaskGroup(of: Void.self) { group in
            group.addTask { _ = try? await response.body.collect(upTo: Self.answerBytesMax) }
            group.addTask { try? await Task.sleep(for: Self.drainTime) }
            await group.next()
            group.cancelAll()
        }
        return status
    }

    /// Closes the kept connections; the client is not used after.
    func shutdown() async {
        try? await http.shutdown()
    }
}
