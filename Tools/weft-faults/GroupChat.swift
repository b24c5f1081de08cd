import Foundation
import NIOHTTP1

/// The group workload (Docs/faults.md, "The group workload"), on the chat workload's users. Before the
/// faults the owner (chat0) befriends every other user (the ring already makes chat1 and the last user
/// its contacts) and creates a group with chat1...chat3. During the run `--group-writers` writers send
/// text messages "group<w>-<n>" with client_msg_id "g<w>-<n>" from a random member (as far as the
/// membership driver has settled it) through a random node, retrying an unknown outcome with the same
/// client_msg_id through any node until acknowledged (200) or refused (4xx but 429) or the run ends;
/// the membership driver adds an outsider (the owner adds) and has a member leave, in turns, every
/// 12-20 s, each change retried until it is known to have happened. After healing: the owner's sync
/// (the membership timeline), every final member's group history, every user's sync and the group's
/// member list; GroupChatChecker compares them with what the writers and the driver were told.
struct GroupChatWorkload: Sendable {
    let chat: ChatWorkload
    let setup: GroupChatChecker.Setup
    let members: Members

    var client: HTTPClient { chat.client }
    var nodes: [Int] { chat.nodes }
    var history: History { chat.history }
    var owner: ChatWorkload.User { chat.users[0] }

    /// The members who may send (the driver's settled view: a leaving member is taken out before the
    /// leave is sent, an added one put in once the add is known to have landed).
    actor Members {
        private var current: Set<UInt64>
        init(_ s: Set<UInt64>) { current = s }
        func insert(_ u: UInt64) { current.insert(u) }
        func remove(_ u: UInt64) { current.remove(u) }
        var sorted: [UInt64] { current.sorted() }
    }

    static let initialMembers = 3

    // MARK: Setup

    static func setUp(chat: ChatWorkload) async throws -> GroupChatWorkload {
        let client = chat.client
        let nodes = chat.nodes
        let users = chat.users
        guard users.count >= initialMembers + 2 else { throw HarnessError("group setup: needs \(initialMembers + 2) chat users") }
        let owner = users[0]
        // The owner's contacts: the ring gives users[1] and the last; the others are asked and accept.
        for k in 2..<(users.count - 1) {
            let b = users[k]
            _ = try await ChatWorkload.retry("\(owner.name) asking \(b.name)") { attempt -> Bool? in
                let (_, r) = await ChatWorkload.call(
                    client, node: nodes[(k + attempt) % nodes.count], .POST, "/api/v1/contacts/requests", json: ["user_id": b.id, "note": "group"], token: owner.token)
                guard let r else { return nil }
                return r.status == 200 || r.status == 202 || r.code == "already_requested" || r.code == "already_contacts" ? true : nil
            }
            _ = try await ChatWorkload.retry("\(b.name) accepting \(owner.name)") { attempt -> Bool? in
                let (_, r) = await ChatWorkload.call(client, node: nodes[(k + attempt + 1) % nodes.count], .POST, "/api/v1/contacts/requests/\(owner.id)/accept", token: b.token)
                guard let r else { return nil }
                return r.status == 200 || r.code == "already_contacts" ? true : nil
            }
            await chat.history.write(["op": "group-setup", "type": "contacts", "a": owner.id, "b": b.id])
        }
        // The group (a create of unknown outcome retried may leave a second group behind: only the one
        // answered 201 is used; the checker looks at that group's events only).
        let initial = users[1...initialMembers].map(\.id)
        let g = try await ChatWorkload.retry("creating the group") { attempt -> UInt64? in
            let (_, r) = await ChatWorkload.call(
                client, node: nodes[attempt % nodes.count], .POST, "/api/v1/groups", json: ["name": "faults", "member_ids": initial], token: owner.token)
            guard let r, r.status == 201, let g = r.u64("group_id") else { return nil }
            return g
        }
        await chat.history.write(["op": "group-setup", "type": "group", "group_id": g, "owner": owner.id, "members": initial])
        let setup = GroupChatChecker.Setup(group: g, owner: owner.id, initial: ([owner.id] + initial).sorted(), users: users.map(\.id))
        return GroupChatWorkload(chat: chat, setup: setup, members: Members(Set(setup.initial)))
    }

    // MARK: Writers

    func writer(_ w: Int, until end: ContinuousClock.Instant, seed: UInt64) async {
        var rng = SplitMix(seed: seed ^ 0x6A0C_0000 ^ (UInt64(w) &* 0x9E37_79B9_7F4A_7C15))
        var n = 0
        while ContinuousClock.now < end {
            let senders = await members.sorted
            guard !senders.isEmpty, let from = chat.user(rng.pick(senders)) else {
                try? await Task.sleep(for: .milliseconds(200))
                continue
            }
            n += 1
            let content = "group\(w)-\(n)"
            let key = "g\(w)-\(n)"
            let body: [String: Any] = ["group_id": setup.group, "message_type": "text", "content": content, "client_msg_id": key]
            var avoid: Int?
            attempts: while true {
                let candidates = nodes.filter { $0 != avoid }
                let node = rng.pick(candidates.isEmpty ? nodes : candidates)
                avoid = nil
                await history.groupInvoke(writer: w, key: key, from: from.id, content: content, node: node)
                let (outcome, reply) = await ChatWorkload.call(client, node: node, .POST, "/api/v1/messages", json: body, token: from.token)
                var pause = rng.millis(150...350)
                switch outcome {
                case .response(200, let b):
                    if let id = reply?.u64("message_id"), let seq = reply?.u64("seq") {
                        await history.groupOK(key: key, node: node, messageID: id, seq: seq)
                        if rng.chance(0.1) { await replay(key: key, from: from, body: body, node: rng.pick(nodes)) }
                        break attempts
                    }
                    await history.groupInfo(key: key, node: node, error: "200 with an unreadable body: \(String(decoding: b.prefix(200), as: UTF8.self))")
                case .response(429, let b):
                    await history.groupFail(key: key, node: node, status: 429, error: String(decoding: b, as: UTF8.self), final: false)
                    pause = .seconds(1)
                case .response(let status, let b) where (400..<500).contains(status):
                    await history.groupFail(key: key, node: node, status: status, error: String(decoding: b, as: UTF8.self), final: true)
                    break attempts
                case .response(let status, let b):
                    await history.groupInfo(key: key, node: node, error: "\(status) \(String(decoding: b.prefix(200), as: UTF8.self))")
                case .failed(let why) where why.hasPrefix("connect:"):
                    await history.groupFail(key: key, node: node, status: 0, error: why, final: false)
                    avoid = node
                    pause = .zero
                case .failed(let why):
                    await history.groupInfo(key: key, node: node, error: why)
                }
                guard ContinuousClock.now < end else { break attempts }
                if pause > .zero { try? await Task.sleep(for: pause) }
            }
            try? await Task.sleep(for: rng.millis(30...90))
        }
    }

    /// One more attempt of an acknowledged send: a 200 must name the same message.
    func replay(key: String, from: ChatWorkload.User, body: [String: Any], node: Int) async {
        let (outcome, reply) = await ChatWorkload.call(client, node: node, .POST, "/api/v1/messages", json: body, token: from.token)
        if case .response(200, _) = outcome, let id = reply?.u64("message_id"), let seq = reply?.u64("seq") {
            await history.groupOK(key: key, node: node, messageID: id, seq: seq)
            return
        }
        switch outcome {
        case .response(let status, let b): await history.write(["op": "group-send", "type": "replay-other", "key": key, "node": node, "status": status, "error": String(decoding: b.prefix(300), as: UTF8.self)])
        case .failed(let why): await history.write(["op": "group-send", "type": "replay-other", "key": key, "node": node, "error": String(why.prefix(300))])
        }
    }

    // MARK: Membership

    /// Adds an outsider and has a member leave, in turns, every 12-20 s until `end` (each change is
    /// retried until known, so the last one starts at most `end`); stops after a change whose outcome
    /// stayed unknown (the settled view would be a guess).
    func membership(until end: ContinuousClock.Instant, seed: UInt64) async {
        var rng = SplitMix(seed: seed ^ 0x6E3B_E500)
        var step = 0
        let others = chat.users.map(\.id).filter { $0 != setup.owner }
        while true {
            try? await Task.sleep(for: rng.millis(12_000...20_000))
            guard ContinuousClock.now < end else { return }
            let current = Set(await members.sorted)
            let outsiders = others.filter { !current.contains($0) }
            let leavers = others.filter { current.contains($0) }
            let add = step % 2 == 0 ? !outsiders.isEmpty : leavers.count < 2
            step += 1
            guard let u = (add ? outsiders : leavers).isEmpty ? nil : rng.pick(add ? outsiders : leavers) else { continue }
            if !add { await members.remove(u) }
            let c = await change(add ? .add : .leave, user: u, until: end + .seconds(20), rng: &rng)
            await history.groupChange(c)
            if c.landed && add { await members.insert(u) }
            if !c.landed && c.unknown { return }
            if !c.landed && !add { await members.insert(u) }
        }
    }

    /// One change, through random nodes, until it is known: 204; after an unknown outcome, the answer
    /// that it had landed (409 `already_member` for an add, 404 for a leave); or another 4xx.
    func change(_ kind: GroupChatChecker.Change.Kind, user u: UInt64, until end: ContinuousClock.Instant, rng: inout SplitMix) async -> GroupChatChecker.Change {
        var c = GroupChatChecker.Change(kind: kind, user: u)
        guard let member = chat.user(u) else { return c }
        while ContinuousClock.now < end {
            c.attempts += 1
            let node = rng.pick(nodes)
            let (outcome, reply) =
                kind == .add
                ? await ChatWorkload.call(client, node: node, .POST, "/api/v1/groups/\(setup.group)/members", json: ["user_ids": [u]], token: owner.token)
                : await ChatWorkload.call(client, node: node, .DELETE, "/api/v1/groups/\(setup.group)/members/\(u)", token: member.token)
            var status: UInt = 0
            var error = ""
            var pause = rng.millis(200...400)
            switch outcome {
            case .response(let st, let b):
                status = st
                error = String(decoding: b.prefix(200), as: UTF8.self)
                if status == 204 {
                    c.landed = true
                } else if c.unknown && ((kind == .add && reply?.code == "already_member") || (kind == .leave && status == 404)) {
                    c.landed = true
                } else if (400..<500).contains(status) && status != 429 {
                    c.refusal = "\(status) \(reply?.code ?? "")"
                } else if status >= 500 {
                    c.unknown = true
                } else {
                    pause = .seconds(1)
                }
            case .failed(let why):
                error = String(why.prefix(200))
                if why.hasPrefix("connect:") { pause = .zero } else { c.unknown = true }
            }
            await history.write(["op": "group-change", "type": "attempt", "kind": kind.rawValue, "user": u, "node": node, "attempt": c.attempts, "status": status, "error": error])
            if c.landed || c.refusal != nil { break }
            if pause > .zero { try? await Task.sleep(for: pause) }
        }
        return c
    }

    // MARK: Reading back

    struct ReadBack {
        var observed = GroupChatChecker.Observed()
        var failures: [String] = []
        var requests = 0
    }

    static func message(_ m: [String: Any]) -> GroupChatChecker.Message? {
        func u(_ k: String) -> UInt64? { (m[k] as? NSNumber)?.uint64Value }
        guard let id = u("message_id"), let seq = u("seq"), let s = u("sender_id"), let g = u("group_id") else { return nil }
        return GroupChatChecker.Message(id: id, seq: seq, sender: s, group: g, content: m["content"] as? String ?? "")
    }

    static func event(_ e: [String: Any]) -> GroupChatChecker.Event {
        func u(_ k: String) -> UInt64? { (e[k] as? NSNumber)?.uint64Value }
        return GroupChatChecker.Event(
            cursor: e["cursor"] as? String ?? "", type: e["type"] as? String ?? "", group: u("group_id"), messageID: u("message_id"), seq: u("seq"),
            by: u("peer_id"), userIDs: (e["user_ids"] as? [NSNumber])?.map(\.uint64Value) ?? [], userID: u("user_id"),
            message: (e["message"] as? [String: Any]).flatMap(Self.message))
    }

    /// A user's whole sync from cursor 0 (every event).
    func sync(_ u: ChatWorkload.User, rng: inout SplitMix, _ rb: inout ChatWorkload.ReadBack) async -> [GroupChatChecker.Event]? {
        var out: [GroupChatChecker.Event] = []
        var cursor = "0"
        for _ in 0..<100_000 {
            let path = "/api/v1/sync?cursor=\(cursor)&limit=100"
            guard let j = await chat.page(path, token: u.token, rng: &rng, &rb) else { return nil }
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

    /// After healing: the owner's sync (polled until it has every change the driver saw land), the
    /// group's member list, each final member's history, a history read of every other user (must be
    /// refused), and every user's sync (polled, up to `wait` in all, until it has a group_message event
    /// for every acknowledged message of the user's periods).
    func readBack(sends: [String: GroupChatChecker.Send], changes: [GroupChatChecker.Change], seed: UInt64, wait: Duration = .seconds(60)) async -> ReadBack {
        var out = ReadBack()
        var rb = ChatWorkload.ReadBack()
        var rng = SplitMix(seed: seed ^ 0x6EAD_6A0C)
        let end = ContinuousClock.now + wait
        let g = setup.group
        let landed = changes.filter(\.landed).count
        var scratch = Checker.Result()
        var periods: [UInt64: [GroupChatChecker.Period]] = [:]
        while true {
            guard let events = await sync(owner, rng: &rng, &rb) else { break }
            let n = events.filter { $0.group == g && ($0.type == "group_members_added" || $0.type == "group_member_removed") }.count
            if n >= landed || ContinuousClock.now >= end {
                out.observed.ownerSync = events
                periods = GroupChatChecker.periods(setup, events, &scratch)
                break
            }
            try? await Task.sleep(for: .seconds(1))
        }
        if let j = await chat.page("/api/v1/groups/\(g)", token: owner.token, rng: &rng, &rb), let list = j["members"] as? [[String: Any]] {
            out.observed.finalMembers = Set(list.compactMap { ($0["user_id"] as? NSNumber)?.uint64Value })
        }
        for u in chat.users {
            let isMember = periods[u.id]?.last.map { $0.leave == nil } ?? false
            if !isMember {
                rb.requests += 1
                let (outcome, _) = await ChatWorkload.call(client, node: rng.pick(nodes), .GET, "/api/v1/messages?group_id=\(g)&limit=10", token: u.token, timeout: .seconds(10))
                if case .response(let status, _) = outcome { out.observed.outsiderReads[u.id] = status }
                continue
            }
            var h: [GroupChatChecker.Message] = []
            var cursor: String?
            var ok = false
            for _ in 0..<10_000 {
                var path = "/api/v1/messages?group_id=\(g)&limit=100"
                if let cursor { path += "&cursor=\(cursor)" }
                guard let j = await chat.page(path, token: u.token, rng: &rng, &rb) else { break }
                guard let msgs = j["messages"] as? [[String: Any]] else {
                    rb.failures.append("GET \(path): no messages array")
                    break
                }
                for m in msgs {
                    if let x = Self.message(m) { h.append(x) } else { rb.failures.append("GET \(path): a message without its ids: \(m)") }
                }
                guard let next = j["next_cursor"] as? String else {
                    ok = true
                    break
                }
                cursor = next
            }
            if ok {
                out.observed.histories[u.id] = h
                await history.write(["op": "group-history", "viewer": u.id, "count": h.count, "ids": h.map(\.id), "seqs": h.map(\.seq)])
            }
        }
        let acked = sends.values.compactMap(\.seq)
        for u in chat.users {
            let expected = acked.filter { seq in periods[u.id]?.contains { $0.covers(seq) } ?? false }.count
            var polls = 0
            while true {
                polls += 1
                guard let events = await sync(u, rng: &rng, &rb) else { break }
                let n = events.filter { $0.group == g && $0.type == "group_message" }.count
                if n >= expected || ContinuousClock.now >= end {
                    out.observed.syncs[u.id] = events
                    await history.write(["op": "group-sync", "user": u.id, "events": events.count, "group_messages": n, "expected": expected, "polls": polls])
                    break
                }
                try? await Task.sleep(for: .seconds(1))
            }
        }
        out.failures = rb.failures
        out.requests = rb.requests
        return out
    }
}
