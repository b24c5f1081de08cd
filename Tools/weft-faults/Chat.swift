import Foundation
import NIOHTTP1

/// The chat workload, on the messaging API (Docs/messaging.md) with user tokens, as an app would use it.
/// Before the faults: `userCount` users (chat0, chat1, ...) registered, logged in (one token each) and
/// made contacts in a ring (0-1, 1-2, ..., last-0). During the run each chat writer sends text messages
/// "chat<w>-<n>" with client_msg_id "w<w>-<n>" along a random pair and direction through a random node,
/// and retries an unknown outcome (5xx, timeout, connection lost after sending) with the same
/// client_msg_id through any node until it is acknowledged (200) or refused (4xx but 429), or the run
/// ends; right after each acknowledgement the sender reads the newest history page of the conversation
/// through a random node (read your writes). After healing, every pair's history is read from both sides and every user's sync from cursor 0;
/// ChatChecker compares them with what the writers were told.
struct ChatWorkload: Sendable {
    struct User: Sendable {
        var name: String
        var id: UInt64
        var token: String
    }

    let client: HTTPClient
    let nodes: [Int]
    let history: History
    let users: [User]
    static let userCount = 6
    static let password = "password-123"

    /// The ring of contacts.
    var pairs: [ChatChecker.Pair] {
        users.indices.map { ChatChecker.Pair(a: users[$0].id, b: users[($0 + 1) % users.count].id) }
    }

    func user(_ id: UInt64) -> User? { users.first { $0.id == id } }

    // MARK: HTTP

    struct Reply {
        var status: UInt
        var json: [String: Any]?
        var code: String { (json?["error"] as? [String: Any])?["code"] as? String ?? "" }
        func u64(_ key: String) -> UInt64? { (json?[key] as? NSNumber)?.uint64Value }
    }

    static func call(
        _ client: HTTPClient, node: Int, _ method: HTTPMethod, _ path: String, json: [String: Any]? = nil, token: String?, timeout: Duration = .seconds(6)
    ) async -> (HTTPOutcome, Reply?) {
        let body = json.flatMap { try? JSONSerialization.data(withJSONObject: $0, options: [.sortedKeys]) }.map { [UInt8]($0) } ?? []
        let o = await client.request(
            method, host: TestNetwork.address(node), port: Cluster.apiPort, path: path, body: body, auth: token.map { .header("Bearer \($0)") } ?? .none,
            timeout: timeout)
        guard case .response(let status, let b) = o else { return (o, nil) }
        return (o, Reply(status: status, json: (try? JSONSerialization.jsonObject(with: Data(b))) as? [String: Any]))
    }

    /// Tries `body(attempt)` (each attempt picks its node) until it gives a value or `timeout` passes.
    static func retry<T>(_ what: String, timeout: Duration = .seconds(60), _ body: (Int) async -> T?) async throws -> T {
        let end = ContinuousClock.now + timeout
        var attempt = 0
        while ContinuousClock.now < end {
            if let v = await body(attempt) { return v }
            attempt += 1
            try await Task.sleep(for: .milliseconds(300))
        }
        throw HarnessError("chat setup: \(what) did not succeed within \(timeout)")
    }

    // MARK: Setup

    /// Registers, logs in and befriends the users (before the faults: the cluster is healthy, but an
    /// election may still be settling, so every step is retried; a retry's "username_taken",
    /// "already_requested" or "already_contacts" means an earlier attempt landed).
    static func setUp(client: HTTPClient, nodes: [Int], history: History) async throws -> ChatWorkload {
        var users: [User] = []
        for i in 0..<userCount {
            let name = "chat\(i)"
            func login(_ node: Int) async -> (id: UInt64, token: String)? {
                let (_, r) = await call(client, node: node, .POST, "/api/v1/auth/login", json: ["username": name, "password": password], token: nil)
                guard let r, r.status == 200, let id = r.u64("user_id"), let token = r.json?["token"] as? String else { return nil }
                return (id, token)
            }
            let id = try await retry("registering \(name)") { attempt -> UInt64? in
                let node = nodes[(i + attempt) % nodes.count]
                let (_, r) = await call(client, node: node, .POST, "/api/v1/auth/register", json: ["username": name, "password": password], token: nil)
                if let r, r.status == 201, let id = r.u64("user_id") { return id }
                if let r, r.code == "username_taken" { return await login(node)?.id }
                return nil
            }
            let session = try await retry("logging \(name) in") { attempt in await login(nodes[(i + attempt + 1) % nodes.count]) }
            guard session.id == id else { throw HarnessError("chat setup: \(name) registered as user \(id), logs in as user \(session.id)") }
            users.append(User(name: name, id: id, token: session.token))
            await history.write(["op": "chat-setup", "type": "user", "name": name, "user_id": id])
        }
        for k in users.indices {
            let a = users[k]
            let b = users[(k + 1) % users.count]
            _ = try await retry("\(a.name) asking \(b.name)") { attempt -> Bool? in
                let (_, r) = await call(
                    client, node: nodes[(k + attempt) % nodes.count], .POST, "/api/v1/contacts/requests", json: ["user_id": b.id, "note": "hi"], token: a.token)
                guard let r else { return nil }
                return r.status == 200 || r.status == 202 || r.code == "already_requested" || r.code == "already_contacts" ? true : nil
            }
            _ = try await retry("\(b.name) accepting \(a.name)") { attempt -> Bool? in
                let (_, r) = await call(client, node: nodes[(k + attempt + 1) % nodes.count], .POST, "/api/v1/contacts/requests/\(a.id)/accept", token: b.token)
                guard let r else { return nil }
                return r.status == 200 || r.code == "already_contacts" ? true : nil
            }
            await history.write(["op": "chat-setup", "type": "contacts", "a": a.id, "b": b.id])
        }
        return ChatWorkload(client: client, nodes: nodes, history: history, users: users)
    }

    // MARK: Writers

    func writer(_ w: Int, until end: ContinuousClock.Instant, seed: UInt64) async {
        var rng = SplitMix(seed: seed ^ 0xC4A7_0000 ^ (UInt64(w) &* 0x9E37_79B9_7F4A_7C15))
        let ring = users.indices.map { (users[$0], users[($0 + 1) % users.count]) }
        var n = 0
        while ContinuousClock.now < end {
            n += 1
            let (x, y) = rng.pick(ring)
            let (from, to) = rng.chance(0.5) ? (x, y) : (y, x)
            let content = "chat\(w)-\(n)"
            let key = "w\(w)-\(n)"
            let body: [String: Any] = ["receiver_id": to.id, "message_type": "text", "content": content, "client_msg_id": key]
            var avoid: Int?
            attempts: while true {
                let candidates = nodes.filter { $0 != avoid }
                let node = rng.pick(candidates.isEmpty ? nodes : candidates)
                avoid = nil
                await history.chatInvoke(writer: w, key: key, from: from.id, to: to.id, content: content, node: node)
                let (outcome, reply) = await Self.call(client, node: node, .POST, "/api/v1/messages", json: body, token: from.token)
                var pause = rng.millis(150...350)
                switch outcome {
                case .response(200, let b):
                    if let id = reply?.u64("message_id"), let seq = reply?.u64("seq") {
                        await history.chatOK(key: key, node: node, messageID: id, seq: seq, at: Date().timeIntervalSince(history.start))
                        // Read your writes: the newest history page, at once, through a random node.
                        await readYourWrite(w, key: key, from: from, to: to, messageID: id, seq: seq, node: rng.pick(nodes), rng: &rng)
                        // Now and then the same message again, through a random node: the answer must be
                        // the same message (replayed), and the histories must hold it once.
                        if rng.chance(replayChance) { await replay(w, key: key, from: from, to: to, content: content, body: body, node: rng.pick(nodes)) }
                        break attempts
                    }
                    await history.chatInfo(key: key, node: node, error: "200 with an unreadable body: \(String(decoding: b.prefix(200), as: UTF8.self))")
                case .response(429, let b):
                    await history.chatFail(key: key, node: node, status: 429, error: String(decoding: b, as: UTF8.self), final: false)
                    pause = .seconds(1)
                case .response(let status, let b) where (400..<500).contains(status):
                    await history.chatFail(key: key, node: node, status: status, error: String(decoding: b, as: UTF8.self), final: true)
                    break attempts
                case .response(let status, let b):
                    await history.chatInfo(key: key, node: node, error: "\(status) \(String(decoding: b.prefix(200), as: UTF8.self))")
                case .failed(let why) where why.hasPrefix("connect:"):
                    // Nothing was sent: not an unknown outcome. Another node, at once (a connect to a
                    // paused or cut-off node has already waited out its timeout).
                    await history.chatFail(key: key, node: node, status: 0, error: why, final: false)
                    avoid = node
                    pause = .zero
                case .failed(let why):
                    await history.chatInfo(key: key, node: node, error: why)
                }
                // The run is over: the outcome stays as it is (unknown, or never sent).
                guard ContinuousClock.now < end else { break attempts }
                if pause > .zero { try? await Task.sleep(for: pause) }
            }
            try? await Task.sleep(for: rng.millis(10...40))
        }
    }

    /// The page size of the read-your-writes reads (the API's default page).
    static let readYourWritesLimit = 20

    /// The sender's newest history page of the conversation right after `messageID` was acknowledged,
    /// through `node`: one attempt, recorded whatever it gets (only a 200 is checked: the message must be
    /// on it, unless the page is full of newer ones). A node that takes no connection (killed: refused at
    /// once) got nothing, so the next untried node is asked at once instead.
    func readYourWrite(_ w: Int, key: String, from: User, to: User, messageID: UInt64, seq: UInt64, node first: Int, rng: inout SplitMix) async {
        let path = "/api/v1/messages?receiver_id=\(to.id)&limit=\(Self.readYourWritesLimit)"
        var node = first
        var unreachable: [Int] = []
        while true {
            var r = ChatChecker.Read(key: key, viewer: from.id, peer: to.id, node: node, messageID: messageID, seq: seq)
            r.unreachable = unreachable
            let (outcome, reply) = await Self.call(client, node: node, .GET, path, token: from.token, timeout: .seconds(4))
            switch outcome {
            case .response(let status, let b):
                r.status = status
                if status == 200, let msgs = reply?.json?["messages"] as? [[String: Any]] {
                    let page = msgs.compactMap(Self.message)
                    if page.count == msgs.count {
                        r.page = page
                        r.more = reply?.json?["next_cursor"] is String
                    } else {
                        r.error = "a message without its ids: \(String(decoding: b.prefix(200), as: UTF8.self))"
                    }
                } else {
                    r.error = String(decoding: b.prefix(200), as: UTF8.self)
                }
            case .failed(let why):
                r.error = why
                let untried = nodes.filter { $0 != node && !unreachable.contains($0) }
                if why.hasPrefix("connect:"), !untried.isEmpty {
                    unreachable.append(node)
                    node = rng.pick(untried)
                    continue
                }
            }
            await history.chatRead(r, writer: w)
            return
        }
    }

    /// The share of acknowledged messages sent once more with the same client_msg_id.
    let replayChance = 0.1

    /// One more attempt of an acknowledged send: a 200 is recorded (it must name the same message);
    /// anything else only in the history file.
    func replay(_ w: Int, key: String, from: User, to: User, content: String, body: [String: Any], node: Int) async {
        await history.write(["op": "chat-send", "type": "replay", "process": 200 + w, "key": key, "from": from.id, "to": to.id, "content": content, "node": node])
        let (outcome, reply) = await Self.call(client, node: node, .POST, "/api/v1/messages", json: body, token: from.token)
        if let id = reply?.u64("message_id"), let seq = reply?.u64("seq"), case .response(200, _) = outcome {
            await history.chatOK(key: key, node: node, messageID: id, seq: seq, at: Date().timeIntervalSince(history.start))
            return
        }
        switch outcome {
        case .response(let status, let b): await history.write(["op": "chat-send", "type": "replay-other", "key": key, "node": node, "status": status, "error": String(decoding: b.prefix(300), as: UTF8.self)])
        case .failed(let why): await history.write(["op": "chat-send", "type": "replay-other", "key": key, "node": node, "error": String(why.prefix(300))])
        }
    }

    // MARK: Reading back

    struct ReadBack {
        var histories: [ChatChecker.Side: [ChatChecker.Message]] = [:]
        var syncs: [UInt64: [ChatChecker.Event]] = [:]
        /// Reads that failed for good (a finding: the run could not be checked).
        var failures: [String] = []
        var requests = 0
        var syncPolls = 0
    }

    /// One page (a GET), through a random node, retrying what is transient (no answer, 5xx, 429) for up
    /// to a minute; a refusal (other 4xx) or a minute of failures ends it (nil, with the reason).
    func page(_ path: String, token: String, rng: inout SplitMix, _ rb: inout ReadBack) async -> [String: Any]? {
        let end = ContinuousClock.now + .seconds(60)
        var last = ""
        while ContinuousClock.now < end {
            rb.requests += 1
            let node = rng.pick(nodes)
            let (outcome, reply) = await Self.call(client, node: node, .GET, path, token: token, timeout: .seconds(10))
            switch outcome {
            case .response(200, _):
                if let j = reply?.json { return j }
                last = "node \(node): 200 with an unreadable body"
            case .response(let status, let b) where (400..<500).contains(status) && status != 429:
                rb.failures.append("GET \(path): node \(node) answered \(status) \(String(decoding: b.prefix(200), as: UTF8.self))")
                return nil
            case .response(let status, let b): last = "node \(node): \(status) \(String(decoding: b.prefix(200), as: UTF8.self))"
            case .failed(let why): last = "node \(node): \(why)"
            }
            try? await Task.sleep(for: .milliseconds(300))
        }
        rb.failures.append("GET \(path): no answer within a minute (last: \(last))")
        return nil
    }

    /// An inbox event as sync and the WebSocket sessions give it (the same object).
    static func event(_ e: [String: Any]) -> ChatChecker.Event {
        ChatChecker.Event(
            cursor: e["cursor"] as? String ?? "", type: e["type"] as? String ?? "", messageID: (e["message_id"] as? NSNumber)?.uint64Value,
            peer: (e["peer_id"] as? NSNumber)?.uint64Value, message: (e["message"] as? [String: Any]).flatMap(Self.message),
            fromMe: e["from_me"] as? Bool, conversation: e["conversation_id"] as? String)
    }

    static func message(_ m: [String: Any]) -> ChatChecker.Message? {
        func u(_ k: String) -> UInt64? { (m[k] as? NSNumber)?.uint64Value }
        guard let id = u("message_id"), let seq = u("seq"), let s = u("sender_id"), let r = u("receiver_id") else { return nil }
        return ChatChecker.Message(id: id, seq: seq, sender: s, receiver: r, content: m["content"] as? String ?? "", recalled: m["recalled"] as? Bool ?? false)
    }

    /// Every pair's history from both sides (following `next_cursor` until null), then every user's sync
    /// from cursor 0 until an empty page, polled (up to `syncWait`) until it has at least as many message
    /// events as the user has acknowledged messages and messages in their histories.
    func readBack(sends: [String: ChatChecker.Send], seed: UInt64, syncWait: Duration = .seconds(60)) async -> ReadBack {
        var rb = ReadBack()
        var rng = SplitMix(seed: seed ^ 0x5EAD_BAC4)
        for pair in pairs {
            for (viewer, peer) in [(pair.a, pair.b), (pair.b, pair.a)] {
                guard let u = user(viewer) else { continue }
                var out: [ChatChecker.Message] = []
                var cursor: String?
                var ok = false
                var pages = 0
                while !ok && pages < 10_000 {
                    pages += 1
                    var path = "/api/v1/messages?receiver_id=\(peer)&limit=100"
                    if let cursor { path += "&cursor=\(cursor)" }
                    guard let j = await page(path, token: u.token, rng: &rng, &rb) else { break }
                    guard let msgs = j["messages"] as? [[String: Any]] else {
                        rb.failures.append("GET \(path): no messages array")
                        break
                    }
                    for m in msgs {
                        if let x = Self.message(m) { out.append(x) } else { rb.failures.append("GET \(path): a message without its ids: \(m)") }
                    }
                    guard let next = j["next_cursor"] as? String else {
                        ok = true
                        break
                    }
                    cursor = next
                }
                guard ok else {
                    if pages >= 10_000 { rb.failures.append("user \(viewer)'s history with \(peer): no end after \(pages) pages") }
                    continue
                }
                rb.histories[ChatChecker.Side(viewer: viewer, peer: peer)] = out
                await history.write(["op": "chat-history", "viewer": viewer, "peer": peer, "count": out.count, "ids": out.map(\.id)])
            }
        }
        let end = ContinuousClock.now + syncWait
        for u in users {
            let acked = sends.values.filter { $0.messageID != nil && ($0.from == u.id || $0.to == u.id) }.count
            var inHistories = Set<UInt64>()
            for (side, h) in rb.histories where side.viewer == u.id { inHistories.formUnion(h.map(\.id)) }
            let expected = max(acked, inHistories.count)
            var polls = 0
            while true {
                polls += 1
                rb.syncPolls += 1
                guard let events = await sync(u, rng: &rng, &rb) else { break }
                let messages = events.filter { $0.type == "message" }.count
                if messages >= expected || ContinuousClock.now >= end {
                    rb.syncs[u.id] = events
                    await history.write(["op": "chat-sync", "user": u.id, "events": events.count, "message_events": messages, "expected": expected, "polls": polls])
                    break
                }
                try? await Task.sleep(for: .seconds(1))
            }
        }
        return rb
    }

    func sync(_ u: User, rng: inout SplitMix, _ rb: inout ReadBack) async -> [ChatChecker.Event]? {
        var out: [ChatChecker.Event] = []
        var cursor = "0"
        for _ in 0..<100_000 {
            let path = "/api/v1/sync?cursor=\(cursor)&limit=100"
            guard let j = await page(path, token: u.token, rng: &rng, &rb) else { return nil }
            guard let events = j["events"] as? [[String: Any]], let next = j["next_cursor"] as? String else {
                rb.failures.append("GET \(path): no events or next_cursor")
                return nil
            }
            if events.isEmpty { return out }
            out += events.map(Self.event)
            cursor = next
        }
        return out
    }
}
