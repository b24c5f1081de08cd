import Delivery
import Foundation
import HummingbirdWebSocket
import Logging
import Messaging
import NIOConcurrencyHelpers
import NIOCore
import NIOWebSocket
import Replication
import WeftCore

/// What the hub hands a session: committed inbox records of its user, or a typing indicator.
enum HubEvent: Sendable {
    case records([Record])
    case typing(from: UInt64)
}

/// Follows the tails of this node's replicas (every replica it opens, at start or when it joins a shard
/// later) and hands each committed inbox record to the sessions of its user on this node
/// (Docs/delivery.md). One thread; a session's callback must only hand off.
final class InboxHub: @unchecked Sendable {
    let condition = NSCondition()
    /// Guarded by `condition`.
    var subscriptions: [(shard: ShardID, sub: TailSubscription)] = []
    var sessions: [UInt64: [UInt64: @Sendable (HubEvent) -> Void]] = [:]
    var sessionCount = 0
    var nextID: UInt64 = 1
    /// Sessions one user may have on a node (devices), and a node at most.
    static let sessionsPerUserMax = 16
    static let sessionsMax = 65_536
    var dirty = false
    var running = true

    init() {
        let t = Thread { [weak self] in self?.loop() }
        t.name = "weft-inbox-hub"
        t.start()
    }

    /// Starts following a local replica's tail from its applied index.
    func follow(shard: ShardID, tail: ShardTail) {
        guard let sub = try? tail.subscribe(from: tail.applied + 1, wake: { [weak self] in self?.wake() }) else { return }
        condition.withLock { subscriptions.append((shard, sub)) }
    }

    /// Nil when the user or the node has too many sessions; `first`: the user had none here before.
    func register(user: UInt64, _ deliver: @escaping @Sendable (HubEvent) -> Void) -> (id: UInt64, first: Bool)? {
        condition.withLock {
            guard sessionCount < Self.sessionsMax, (sessions[user]?.count ?? 0) < Self.sessionsPerUserMax else { return nil }
            let id = nextID
            nextID += 1
            sessionCount += 1
            let first = sessions[user] == nil
            sessions[user, default: [:]][id] = deliver
            return (id, first)
        }
    }

    /// True when it was the user's last session here.
    func unregister(user: UInt64, id: UInt64) -> Bool {
        condition.withLock {
            if sessions[user]?.removeValue(forKey: id) != nil { sessionCount -= 1 }
            guard sessions[user]?.isEmpty == true else { return false }
            sessions[user] = nil
            return true
        }
    }

    /// The users with sessions here.
    var users: [UInt64] { condition.withLock { Array(sessions.keys) } }

    func typing(from: UInt64, to: UInt64) {
        let callbacks = condition.withLock { sessions[to].map { Array($0.values) } ?? [] }
        for c in callbacks { c(.typing(from: from)) }
    }

    func stop() {
        condition.withLock {
            running = false
            condition.signal()
        }
    }

    func wake() {
        condition.withLock {
            dirty = true
            condition.signal()
        }
    }

    func loop() {
        while true {
            condition.lock()
            while running && !dirty { _ = condition.wait(until: Date().addingTimeInterval(0.25)) }
            guard running else {
                condition.unlock()
                return
            }
            dirty = false
            let subs = subscriptions
            condition.unlock()
            for (_, sub) in subs {
                // Drain each tail; a damaged file read is retried at the next wake.
                while let batch = try? sub.poll(limit: 1024), !batch.records.isEmpty {
                    var byUser: [UInt64: [Record]] = [:]
                    for r in batch.records where r.type == .messaging {
                        if let u = Ids.inboxUser(r.stream) { byUser[u, default: []].append(r) }
                    }
                    guard !byUser.isEmpty else { continue }
                    let targets = condition.withLock { byUser.compactMap { u, rs in sessions[u].map { (Array($0.values), rs) } } }
                    for (callbacks, rs) in targets { for c in callbacks { c(.records(rs)) } }
                }
            }
        }
    }
}

/// `GET /api/v1/ws`: a device's real-time session (Docs/delivery.md). The socket side of
/// `Delivery.Session`: client frames, inbox records (live from the hub, or polled when this node holds
/// no replica of the user's home shard) and ticks go into one queue; the session's actions come out.
enum DeliverySocket {
    static let path = "/api/v1/ws"
    /// Client frames are small JSON objects.
    static let frameBytesMax = 16 << 10

    enum Input: Sendable {
        case frame(Session.ClientFrame)
        /// A message to send (`{"type":"send","request_id":…,"message":{…}}`): the message object's bytes.
        case send(requestID: String, message: Data)
        /// `{"type":"typing","to":<user id>}`.
        case typing(to: UInt64)
        /// A frame to write as is (a send's answer).
        case write(String)
        case malformed(String)
        case hub(HubEvent)
        /// The writer wrote this many pushed events.
        case written(Int)
        case tick
        case gone
    }

    /// What the writer task writes, in order.
    enum Outbound: Sendable {
        case events([String])
        case text(String)
        case close(UInt16, String)
    }

    /// A closed session's connection is closed this long after, whatever the close handshake is doing
    /// (a client that stopped reading cannot take the close frame).
    static let closeGrace: TimeAmount = .seconds(10)
    /// A session sends typing at most this often (more is dropped), and re-checks a peer after this long.
    static let typingEveryMillis: Int64 = 500
    static let typingCheckMillis: Int64 = 60_000
    /// Sends a session may have waiting for their commit (more are answered `too_many_requests`).
    static let sendsInFlightMax = 8

    static func serve(
        _ inbound: WebSocketInboundStream, _ outbound: WebSocketOutboundWriter, channel: any Channel, api: MessagingAPI, tier: DeliveryTier,
        logger: Logger
    ) async {
        // Inputs are bounded: a session whose inputs overflow (its loop cannot keep up) is closed with
        // "resume" rather than losing one silently.
        let (inputs, feed) = AsyncStream<Input>.makeStream(bufferingPolicy: .bufferingNewest(4096))
        let overflowed = NIOLockedValueBox(false)
        let put: @Sendable (Input) -> Void = { input in
            if case .dropped = feed.yield(input) { overflowed.withLockedValue { $0 = true } }
        }
        // Writes go through one task, so the session's loop never waits on a slow client: the session
        // counts what is pushed and not yet written, and closes past its limits.
        let (writes, writer) = AsyncStream<Outbound>.makeStream()
        let closing = NIOLockedValueBox(false)
        let now = { Int64(Date().timeIntervalSince1970 * 1000) }
        var session = Session(limits: tier.limits, nowMillis: now())
        var registration: (user: UInt64, id: UInt64)?
        var bearer: String?
        var typingSent: Int64 = 0
        var sendsInFlight = 0
        var typingAllowed: [UInt64: (ok: Bool, at: Int64)] = [:]
        let node = api.node
        let tickID = tier.ticker.register { put(.tick) }
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                do {
                    for try await message in inbound.messages(maxSize: frameBytesMax) {
                        guard case .text(let text) = message else {
                            put(.malformed("frames are JSON text"))
                            continue
                        }
                        put(parse(text))
                    }
                } catch {}
                put(.gone)
            }
            // Not a child of the group: the group is cancelled at the end, and a cancelled writer would
            // drop the close frame (and with it the close code the client needs).
            let writerTask = Task {
                for await o in writes {
                    switch o {
                    case .events(let texts):
                        // Closing: what is still queued is not worth writing (the client resumes).
                        for t in texts where !closing.withLockedValue({ $0 }) { try? await outbound.write(.text(t)) }
                        put(.written(texts.count))
                    case .text(let t):
                        if !closing.withLockedValue({ $0 }) { try? await outbound.write(.text(t)) }
                        put(.written(1))
                    case .close(let code, let why):
                        try? await outbound.close(.unknown(code), reason: why)
                        return
                    }
                }
            }
            var polling: Task<Void, Never>?
            loop: for await input in inputs {
                var actions: [Session.Action]
                if overflowed.withLockedValue({ $0 }) {
                    actions = session.close(.resume, "the session fell behind: resume from your cursor")
                } else {
                    switch input {
                    case .frame(let f): actions = session.received(f, nowMillis: now())
                    case .malformed(let why): actions = session.close(.protocolError, why)
                    case .hub(.records(let records)):
                        guard let u = session.user else { continue }
                        // Only what the session has not pushed is worth rendering (message bodies are reads).
                        let fresh = records.filter { $0.seq > session.delivered }
                        guard !fresh.isEmpty else { continue }
                        actions = session.live(await events(fresh, api: api, me: u))
                    case .hub(.typing(let from)):
                        guard let u = session.user, case .live = session.state else { continue }
                        writer.yield(.text(#"{"type":"typing","from":\#(from),"conversation_id":"\#(Ids.conversationID(u, from))"}"#))
                        actions = session.queued(1)
                    case .written(let n):
                        actions = session.written(n, nowMillis: now())
                    case .tick: actions = session.tick(nowMillis: now())
                    case .gone:
                        // The client closed (or the connection is gone): answer its close at once.
                        closing.withLockedValue { $0 = true }
                        writer.yield(.close(1000, ""))
                        break loop
                    case .write(let text):
                        sendsInFlight -= 1
                        writer.yield(.text(text))
                        actions = session.queued(1)
                    case .typing(let to):
                        guard let u = session.user, case .live = session.state else {
                            actions = session.close(.protocolError, "typing after auth and resume")
                            break
                        }
                        _ = session.received(.ping, nowMillis: now())
                        let t = now()
                        guard t - typingSent >= typingEveryMillis, to != u, Ids.isUserID(to) else { continue }
                        typingSent = t
                        // Only to a contact who has not blocked either way (checked once a minute per peer).
                        if let known = typingAllowed[to], t - known.at < typingCheckMillis {
                            if known.ok { tier.sendTyping(from: u, to: to) }
                            continue
                        }
                        let ok: Bool
                        if case .success(let a?) = await node.ask(Ids.pairShard(u, to, shards: node.config.shards), .pair(u, to), at: .local),
                            let p = a.pair, p.relation == .contacts, !p.isBlocked()
                        {
                            ok = true
                        } else {
                            ok = false
                        }
                        if typingAllowed.count > 1024 { typingAllowed = [:] }
                        typingAllowed[to] = (ok, t)
                        if ok { tier.sendTyping(from: u, to: to) }
                        continue
                    case .send(let requestID, let message):
                        guard session.user != nil, let token = bearer else {
                            actions = session.close(.protocolError, "send after auth and resume")
                            break
                        }
                        guard sendsInFlight < sendsInFlightMax else {
                            writer.yield(.text(#"{"type":"error","request_id":\#(jsonString(requestID)),"code":"too_many_requests","message":"at most \#(sendsInFlightMax) sends in flight per session"}"#))
                            actions = session.queued(1)
                            break
                        }
                        // Its own task: a send waits for a commit, pushes go on meanwhile; the answer comes back
                        // through the queue.
                        sendsInFlight += 1
                        Task {
                            put(.write(await sendAnswer(requestID: requestID, message: message, token: token, api: api)))
                        }
                        continue
                    }
                }
                var k = 0
                while k < actions.count {
                    let a = actions[k]
                    k += 1
                    switch a {
                    case .authenticate(let token):
                        do {
                            let account = try await api.account(bearer: token)
                            bearer = token
                            actions += session.authenticated(user: account.id)
                        } catch let e as APIError where e.status == .unauthorized {
                            actions += session.authFailed(e.message)
                        } catch {
                            // The token could not be checked now (its user's shard is unreachable): not a
                            // reason to log the user out; the client tries again.
                            actions += session.close(.resume, "the token cannot be checked now: reconnect and resume")
                        }
                    case .subscribe(let u):
                        guard let (id, first) = tier.hub.register(user: u, { put(.hub($0)) }) else {
                            actions += session.close(.tooMany, "too many sessions for this user (\(InboxHub.sessionsPerUserMax)) or this node")
                            continue
                        }
                        registration = (u, id)
                        if first { tier.announce([u], on: true) }
                        if node.runner(Ids.homeShard(u, shards: node.config.shards)) == nil {
                            // No replica of the home shard here: poll the inbox (the session drops repeats);
                            // the hub still brings typing.
                            let from = session.delivered
                            polling = Task {
                                var next: StreamSeq = from
                                while !Task.isCancelled {
                                    try? await Task.sleep(for: .milliseconds(250))
                                    let r = await node.readAnywhere(
                                        shard: Ids.homeShard(u, shards: node.config.shards), .stream(Ids.inbox(u), fromSeq: next &+ 1, limit: 100),
                                        consistency: .linearizable)
                                    if case .success(let rr) = r, let last = rr.records.last {
                                        next = last.seq
                                        put(.hub(.records(rr.records)))
                                    }
                                }
                            }
                        }
                    case .readInbox(let u, let from, let limit):
                        let r = await node.readAnywhere(
                            shard: Ids.homeShard(u, shards: node.config.shards), .stream(Ids.inbox(u), fromSeq: from, limit: limit), consistency: .linearizable)
                        switch r {
                        case .success(let rr):
                            actions += session.page(await events(rr.records, api: api, me: u), complete: rr.records.count < limit)
                        case .failure:
                            actions += session.close(.resume, "the inbox cannot be read now: resume from your cursor")
                        }
                    case .push(let events):
                        // Every event counts (the session counts them all); records that are no event go empty.
                        writer.yield(.events(events.map { String(decoding: $0.body, as: UTF8.self) }.filter { !$0.isEmpty }))
                        let skipped = events.filter { $0.body.isEmpty }.count
                        if skipped > 0 { actions += session.written(skipped, nowMillis: now()) }
                    case .reply(let reply):
                        writer.yield(.text(text(reply)))
                        actions += session.queued(1)
                    case .acknowledged(let u, let cursor):
                        tier.acks.note(user: u, cursor: cursor)
                    case .close(let code, let why):
                        closing.withLockedValue { $0 = true }
                        writer.yield(.close(code.rawValue, why))
                        break loop
                    }
                }
            }
            polling?.cancel()
            tier.ticker.unregister(tickID)
            if let (u, id) = registration, tier.hub.unregister(user: u, id: id) { tier.announce([u], on: false) }
            writer.finish()
            feed.finish()
            // The close frame may never get through to a client that stopped reading: the connection goes
            // after the grace whatever the writer is doing (which ends the writer's wait).
            channel.eventLoop.scheduleTask(in: closeGrace) { channel.close(promise: nil) }
            await writerTask.value
            group.cancelAll()
        }
    }

    /// A client frame: `{"type":"auth","token"}`, `{"type":"resume","cursor":"12"}`, `{"type":"ack","cursor":"12"}`, `{"type":"ping"}`.
    static func parse(_ text: String) -> Input {
        guard let o = try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any], let type = o["type"] as? String else {
            return .malformed("a frame is a JSON object with a type")
        }
        func cursor() -> StreamSeq? {
            guard let c = o["cursor"] as? String else { return nil }
            return MessagingAPI.number(c)
        }
        switch type {
        case "auth":
            guard let t = o["token"] as? String, t.utf8.count <= 4096 else { return .malformed("auth needs a token") }
            return .frame(.auth(token: t))
        case "resume":
            guard let c = cursor() else { return .malformed("resume needs a cursor string (\"0\" for the start)") }
            return .frame(.resume(cursor: c))
        case "ack":
            guard let c = cursor() else { return .malformed("ack needs a cursor string") }
            return .frame(.ack(cursor: c))
        case "ping":
            return .frame(.ping)
        case "typing":
            guard let to = o["to"] as? Int, to > 0 else { return .malformed("typing needs a user id: {\"type\":\"typing\",\"to\":42}") }
            return .typing(to: UInt64(to))
        case "send":
            guard let id = o["request_id"] as? String, (1...64).contains(id.utf8.count), let m = o["message"] as? [String: Any],
                let data = try? JSONSerialization.data(withJSONObject: m)
            else { return .malformed("send needs a request_id (1-64 characters) and a message object") }
            return .send(requestID: id, message: data)
        default:
            return .malformed("unknown frame type \(type.prefix(32))")
        }
    }

    /// A `send` frame's answer: `{"type":"sent","request_id",…}` with the HTTP route's fields, or
    /// `{"type":"error","request_id","code","message"}` (the same codes as the HTTP route's errors).
    static func sendAnswer(requestID: String, message: Data, token: String, api: MessagingAPI) async -> String {
        let rid = jsonString(requestID)
        do {
            // The token again: a logout during the session stops its sends.
            let me = try await api.account(bearer: token)
            let body = try MessagingAPI.decode(MessagingAPI.SendBody.self, message, keys: MessagingAPI.SendBody.keys)
            let (sent, replayed) = try await api.send(body, from: me)
            return #"{"type":"sent","request_id":\#(rid),"message_id":\#(sent.message_id),"created_at":"\#(sent.created_at)","conversation_id":"\#(sent.conversation_id)","seq":\#(sent.seq),"replayed":\#(replayed)}"#
        } catch let e as APIError {
            return #"{"type":"error","request_id":\#(rid),"code":\#(jsonString(e.code)),"message":\#(jsonString(e.message))}"#
        } catch {
            return #"{"type":"error","request_id":\#(rid),"code":"internal","message":\#(jsonString("\(error)"))}"#
        }
    }

    static func text(_ reply: Session.Reply) -> String {
        switch reply {
        case .ready(let c): #"{"type":"ready","cursor":"\#(c)"}"#
        case .pong: #"{"type":"pong"}"#
        case .error(let code, let m): #"{"type":"error","code":"\#(code)","message":\#(jsonString(m))}"#
        }
    }

    static func jsonString(_ s: String) -> String {
        (try? String(decoding: JSONEncoder().encode(s), as: UTF8.self)) ?? "\"\""
    }

    /// Records as session events: every record keeps its seq; the body is the event JSON (sync's shape,
    /// with `"type":"event"` around it) or empty for a record that is no event.
    static func events(_ records: [Record], api: MessagingAPI, me: UInt64) async -> [Session.Event] {
        await api.events(records, me: me, shared: true).map { seq, body in
            Session.Event(seq: seq, body: body?.pushFrame ?? [])
        }
    }
}
