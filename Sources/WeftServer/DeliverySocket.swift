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
    /// The user's inbox reached this seq (the heads check, for users served from afar): a session
    /// behind it reads the rest.
    case head(StreamSeq)
    /// The node is shutting down: the session closes with "resume".
    case shutdown
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
    /// Sees every batch of applied records before their inbox entries go to the sessions (guarded by
    /// `condition`; set once at start-up).
    var observer: (@Sendable ([Record], ShardID) -> Void)?
    /// Gets every batch's inbox records by user, after this node's sessions had theirs: the delivery
    /// tier sends them on to nodes with sessions of those users and no replica of the shard (set once).
    var forwarder: (@Sendable ([UInt64: [Record]], ShardID) -> Void)?
    /// Users whose inbox records come from other nodes (no replica of their home shard here): the
    /// highest seq handed to every session of theirs here (a forwarded record, or a head they were told
    /// of), so the same record forwarded by each of the shard's replicas reaches them once. Only the hub
    /// moves it, never a session (a session's cursor is its own). Dropped with the user's last session.
    var remoteSeen: [UInt64: StreamSeq] = [:]

    init() {
        NamedThread.start("inbox-hub") { [weak self] in self?.loop() }
    }

    /// Starts following a local replica's tail from its applied index.
    func follow(shard: ShardID, tail: ShardTail) {
        guard let sub = try? tail.subscribe(from: tail.applied + 1, wake: { [weak self] in self?.wake() }) else { return }
        condition.withLock { subscriptions.append((shard, sub)) }
    }

    /// Stops following `shard`'s local replica (it stopped after a storage failure).
    func unfollow(shard: ShardID) {
        condition.withLock { subscriptions.removeAll { $0.shard == shard } }
    }

    func observe(_ f: @escaping @Sendable ([Record], ShardID) -> Void) { condition.withLock { observer = f } }

    func forward(_ f: @escaping @Sendable ([UInt64: [Record]], ShardID) -> Void) { condition.withLock { forwarder = f } }

    /// Inbox records another node forwarded: to the sessions of their users here,
    /// each seq once (records at or below what was handed already are dropped).
    func remote(_ records: [Record]) {
        var byUser: [UInt64: [Record]] = [:]
        for r in records where r.type == .messaging {
            if let u = Ids.inboxUser(r.stream) { byUser[u, default: []].append(r) }
        }
        let targets = condition.withLock {
            byUser.compactMap { u, rs -> ([@Sendable (HubEvent) -> Void], [Record])? in
                guard let callbacks = sessions[u] else { return nil }
                let seen = remoteSeen[u] ?? 0
                let fresh = rs.filter { $0.seq > seen }
                guard let last = fresh.last else { return nil }
                remoteSeen[u] = max(seen, last.seq)
                return (Array(callbacks.values), fresh)
            }
        }
        for (callbacks, rs) in targets { for c in callbacks { c(.records(rs)) } }
    }

    /// The highest seq handed to `user`'s sessions here from afar; nil before any.
    func remoteMark(_ user: UInt64) -> StreamSeq? {
        condition.withLock { sessions[user] == nil ? nil : remoteSeen[user] }
    }

    /// The heads check found these users' inboxes at these seqs (seen at its previous pass too): every
    /// session of a user whose mark is below tells itself, and reads from its own cursor if behind. The
    /// mark moves up to the head (every session here now knows it). Returns how many users had a mark
    /// below the head (forwarding lost something; a user with no mark yet is not counted: their
    /// sessions read their own catch-up).
    @discardableResult
    func headsReached(_ heads: [(user: UInt64, seq: StreamSeq)]) -> Int {
        var lost = 0
        let targets = condition.withLock {
            heads.compactMap { u, seq -> ([@Sendable (HubEvent) -> Void], StreamSeq)? in
                guard let callbacks = sessions[u] else { return nil }
                let mark = remoteSeen[u]
                guard (mark ?? 0) < seq else { return nil }
                if mark != nil { lost += 1 }
                remoteSeen[u] = seq
                return (Array(callbacks.values), seq)
            }
        }
        for (callbacks, seq) in targets { for c in callbacks { c(.head(seq)) } }
        return lost
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
            remoteSeen[user] = nil
            return true
        }
    }

    /// The users with sessions here.
    var users: [UInt64] { condition.withLock { Array(sessions.keys) } }

    func typing(from: UInt64, to: UInt64) {
        let callbacks = condition.withLock { sessions[to].map { Array($0.values) } ?? [] }
        for c in callbacks { c(.typing(from: from)) }
    }

    /// Tells every session here that the node is shutting down.
    func closeAll() {
        let callbacks = condition.withLock { sessions.values.flatMap { Array($0.values) } }
        for c in callbacks { c(.shutdown) }
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
            let observer = self.observer
            let forwarder = self.forwarder
            condition.unlock()
            for (shard, sub) in subs {
                // Drain each tail; a damaged file read is retried at the next wake.
                while true {
                    let batch: TailSubscription.Batch
                    do {
                        batch = try sub.poll(limit: 1024)
                    } catch {
                        // The replica installed a catch-up whose log starts past what the hub had
                        // handed on: those records are not here any more. Go on from the first held; a
                        // session notices the gap at its next event and reads it from its own cursor.
                        // (Before, the hub stayed stuck there: no pushes of this shard on this node, and
                        // its position held back the shard's retention here.)
                        if let first = TailSubscription.firstHeld(after: error), first > sub.next {
                            sub.skip(to: first)
                            continue
                        }
                        break
                    }
                    guard !batch.records.isEmpty else { break }
                    observer?(batch.records, shard)
                    var byUser: [UInt64: [Record]] = [:]
                    for r in batch.records where r.type == .messaging {
                        if let u = Ids.inboxUser(r.stream) { byUser[u, default: []].append(r) }
                    }
                    guard !byUser.isEmpty else { continue }
                    let targets = condition.withLock {
                        byUser.compactMap { u, rs -> ([@Sendable (HubEvent) -> Void], [Record])? in
                            // A user served from afar for a while (the replica was cut off) has a mark;
                            // what the tail hands on is past it too, so a later cut starts from here.
                            if let mark = remoteSeen[u], let last = rs.last?.seq, last > mark { remoteSeen[u] = last }
                            return sessions[u].map { (Array($0.values), rs) }
                        }
                    }
                    for (callbacks, rs) in targets { for c in callbacks { c(.records(rs)) } }
                    forwarder?(byUser, shard)
                }
            }
        }
    }
}

/// `GET /api/v1/ws`: a device's real-time session (Docs/delivery.md). The socket side of
/// `Delivery.Session` is `DeliveryHandler`, a channel handler on the connection's event loop; these are
/// its frames and helpers.
enum DeliverySocket {
    static let path = "/api/v1/ws"
    /// Client frames are small JSON objects.
    static let frameBytesMax = 16 << 10
    /// Frames (all but a close: text, binary, protocol pings and pongs) a session may send:
    /// `framesPerSecond` on average, `frameBurst` at once, plus one per event pushed to it (its ack).
    /// Each is handled on the connection's event loop, which other sessions share; past this the session
    /// is closed with 1008 (policy violation). Protocol pings are not parsed (the pong echoes them); a
    /// client that pings within the rate and does not read its pongs is bounded by their queue
    /// (`session_queue_max`).
    static let framesPerSecond = 100
    static let frameBurst = 400

    enum Input: Sendable {
        case frame(Session.ClientFrame)
        /// A message to send (`{"type":"send","request_id":…,"message":{…}}`): the whole frame's bytes, or
        /// why its message was refused already (an unknown field, a null).
        case send(requestID: String, frame: Data, refused: APIError?)
        /// `{"type":"typing","to":<user id>}`.
        case typing(to: UInt64)
        /// A frame to write as is (a send's answer).
        case write(String)
        case malformed(String)
        case hub(HubEvent)
        /// The socket wrote this many queued frames.
        case written(Int)
        case tick
    }

    /// A closed session's connection is closed this long after, whatever the close handshake is doing
    /// (a client that stopped reading cannot take the close frame).
    static let closeGrace: TimeAmount = .seconds(10)
    /// A session sends typing at most this often (more is dropped), and re-checks a peer after this long.
    static let typingEveryMillis: Int64 = 500
    static let typingCheckMillis: Int64 = 60_000
    /// Sends a session may have waiting for their commit (more are answered `too_many_requests`).
    static let sendsInFlightMax = 8
    /// Inputs that may wait while the session performs an action (auth, a page read, rendering).
    static let pendingMax = 4096

    /// A client frame: `{"type":"auth","token"}`, `{"type":"resume","cursor":"12"}`, `{"type":"ack","cursor":"12"}`, `{"type":"ping"}`.
    static func parse(_ text: String) -> Input {
        // UTF-16 or UTF-32 JSON (which JSONSerialization would read) always holds a NUL byte, and UTF-8
        // JSON never does: frames are UTF-8 (and the duplicate-key check reads UTF-8).
        if text.utf8.contains(0) { return .malformed("a frame is a JSON object in UTF-8") }
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
            guard let id = o["request_id"] as? String, (1...64).contains(id.utf8.count), let m = o["message"] as? [String: Any]
            else { return .malformed("send needs a request_id (1-64 characters) and a message object") }
            // The message's fields are checked here, on the parsed frame, and decoded from the frame's own
            // bytes in the send's task (before: the message object written out again and parsed twice more).
            do {
                try MessagingAPI.refuseDuplicateKeys(text.utf8)
                try MessagingAPI.checkFields(m, keys: MessagingAPI.SendBody.keys)
                return .send(requestID: id, frame: Data(text.utf8), refused: nil)
            } catch let e as APIError {
                return .send(requestID: id, frame: Data(), refused: e)
            } catch {
                return .malformed("send: \(error)")
            }
        default:
            return .malformed("unknown frame type \(type.prefix(32))")
        }
    }

    /// A `send` frame's answer: `{"type":"sent","request_id",…}` with the HTTP route's fields, or
    /// `{"type":"error","request_id","code","message"}` (the same codes as the HTTP route's errors).
    static func sendAnswer(requestID: String, frame: Data, refused: APIError?, token: String, api: MessagingAPI) async -> String {
        let rid = jsonString(requestID)
        do {
            // The token again: a logout during the session stops its sends.
            let me = try await api.account(bearer: token)
            if let refused { throw refused }
            let body = try MessagingAPI.decodeFields(SendFrame.self, frame, dropping: 1).message
            let (sent, replayed) = try await api.send(body, from: me)
            return #"{"type":"sent","request_id":\#(rid),"message_id":\#(sent.message_id),"created_at":"\#(sent.created_at)","conversation_id":"\#(sent.conversation_id)","seq":\#(sent.seq),"replayed":\#(replayed)}"#
        } catch let e as APIError {
            return #"{"type":"error","request_id":\#(rid),"code":\#(jsonString(e.code)),"message":\#(jsonString(e.message))}"#
        } catch {
            return #"{"type":"error","request_id":\#(rid),"code":"internal","message":\#(jsonString("\(error)"))}"#
        }
    }

    /// A send frame as `JSONDecoder` reads it: the message only (the frame's other keys were read already).
    struct SendFrame: Decodable {
        var message: MessagingAPI.SendBody
    }

    static func text(_ reply: Session.Reply) -> String {
        switch reply {
        case .ready(let c): #"{"type":"ready","cursor":"\#(c)"}"#
        case .pong: #"{"type":"pong"}"#
        case .gap(let after, let through): #"{"type":"gap","after":"\#(after)","cursor":"\#(through)"}"#
        case .error(let code, let m): #"{"type":"error","code":"\#(code)","message":\#(jsonString(m))}"#
        }
    }

    static func jsonString(_ s: String) -> String {
        var w = JSONWriter(capacity: s.utf8.count + 8)
        w.string(s)
        return String(decoding: w.bytes, as: UTF8.self)
    }

    /// Records as session events: every record keeps its seq; the body is the event JSON (sync's shape,
    /// with `"type":"event"` around it) or empty for a record that is no event.
    static func events(_ records: [Record], api: MessagingAPI, me: UInt64) async -> [Session.Event] {
        frames(await api.events(records, me: me, shared: true))
    }

    /// Events as the session's frames (an empty body for a record that is no event).
    static func frames(_ events: [(seq: StreamSeq, body: MessagingAPI.EventBody?)]) -> [Session.Event] {
        events.map { Session.Event(seq: $0.seq, body: $0.body?.pushFrame ?? []) }
    }
}
