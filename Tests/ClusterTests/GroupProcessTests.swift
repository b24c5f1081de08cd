import Foundation
import Testing

/// Issue 13, groups on a real 3-node cluster: a 500-member group (the default limit), messages from
/// several senders while members join, leave and are removed and the group shard's leader is SIGKILLed
/// and restarted; afterwards every member's history holds exactly the acknowledged messages it should
/// (by the group's order of joins and leaves), each once, in one order; and every refusal of the rights
/// model (non-members, removed members, members acting as admins, admins acting as the owner).
extension Clusters {
    @Suite(.serialized) struct GroupProcessTests {
        struct User: Sendable {
            var id: UInt64
            var token: String
        }

        /// `n` users registered and logged in, 8 at a time.
        static func users(_ c: ClusterProcess, _ prefix: String, _ n: Int) async throws -> [User] {
            let made = await withTaskGroup(of: (Int, User?).self) { g in
                var out: [Int: User] = [:]
                var next = 0
                func add(_ k: Int) {
                    g.addTask {
                        let name = "\(prefix)\(k)"
                        guard let id = await c.register(name, via: 1 + k % 3), let t = await c.login(name, via: 1 + k % 3) else { return (k, nil) }
                        return (k, User(id: id, token: t))
                    }
                }
                while next < min(8, n) {
                    add(next)
                    next += 1
                }
                for await (k, u) in g {
                    out[k] = u
                    if next < n {
                        add(next)
                        next += 1
                    }
                }
                return out
            }
            return try (0..<n).map { try #require(made[$0], "user \(prefix)\($0)") }
        }

        /// Runs `body` for each item, 8 at a time; the results in item order.
        static func each<T: Sendable, R: Sendable>(_ items: [T], _ body: @escaping @Sendable (T) async -> R) async -> [R] {
            await withTaskGroup(of: (Int, R).self) { g in
                var out: [Int: R] = [:]
                var next = 0
                while next < min(8, items.count) {
                    let k = next
                    g.addTask { (k, await body(items[k])) }
                    next += 1
                }
                for await (k, r) in g {
                    out[k] = r
                    if next < items.count {
                        let k2 = next
                        g.addTask { (k2, await body(items[k2])) }
                        next += 1
                    }
                }
                return (0..<items.count).compactMap { out[$0] }
            }
        }

        /// A history as read: its status (200, or the refusal's) and its messages (JSON objects: not Sendable
        /// by type, only read after the reads end).
        struct Seen: @unchecked Sendable {
            var status: Int
            var messages: [[String: Any]]
            init(_ status: Int, _ messages: [[String: Any]]) {
                self.status = status
                self.messages = messages
            }
        }

        /// Every message of a group as `token`'s user sees it, newest first.
        static func history(_ c: ClusterProcess, _ node: Int, token: String, group: UInt64) async -> Seen {
            var out: [[String: Any]] = []
            var cursor: String?
            for _ in 0..<100 {
                var path = "/api/v1/messages?group_id=\(group)&limit=100"
                if let cursor { path += "&cursor=\(cursor)" }
                let r = await c.call(node, "GET", path, token: token)
                guard r.status == 200, let page = r["messages"] as? [[String: Any]] else { return Seen(r.status, []) }
                out += page
                guard let next = r["next_cursor"] as? String else { return Seen(200, out) }
                cursor = next
            }
            return Seen(0, [])
        }

        @Test(.timeLimit(.minutes(8))) func aFullGroupKeepsOneOrderAcrossJoinsLeavesAndAKill() async throws {
            let c = try ClusterProcess(
                name: "groups", nodes: 3, shards: 2,
                messaging: """
                    bcrypt_cost = 4
                    actions_per_minute = 1000000
                    sends_per_minute = 1000000
                    history_reads_per_minute = 1000000
                    syncs_per_minute = 1000000
                    """)
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<2 { _ = try #require(await c.leader(of: UInt64(s))) }
            // The owner, 500 contacts of the owner, and a stranger.
            let all = try await Self.users(c, "gm", 502)
            let owner = all[0]
            let others = Array(all[1...500])
            let stranger = all[501]
            let befriended = await Self.each(others) { u in await c.befriend((owner.id, owner.token), (u.id, u.token), via: 1 + Int(u.id % 3)) }
            try #require(befriended.allSatisfy { $0 }, "every contact made")

            // Created with 498 others (499 members); the last contact joins later, one more is refused.
            let initial = Array(others[0..<498])
            let late = others[498]
            let tooMany = others[499]
            let refusedStranger = await c.call(1, "POST", "/api/v1/groups", token: owner.token, json: ["name": "x", "member_ids": [stranger.id]])
            #expect(refusedStranger.status == 403 && refusedStranger.errorCode == "not_contacts", "only contacts are brought in")
            let created = await c.eventually {
                let r = await c.call(2, "POST", "/api/v1/groups", token: owner.token, json: ["name": "Five hundred", "member_ids": initial.map(\.id)], timeout: 20)
                return r.status == 201 ? r.u64("group_id") : nil
            }
            let g = try #require(created)
            let info = await c.call(3, "GET", "/api/v1/groups/\(g)", token: initial[7].token)
            #expect(info.status == 200 && info.json?["member_count"] as? Int == 499 && info.json?["owner_id"] as? NSNumber == NSNumber(value: owner.id))

            // Rights: admin m1; members, admins and outsiders acting above their role are refused.
            let (m1, m2, m3, m4, m5, m6) = (initial[0], initial[1], initial[2], initial[3], initial[4], initial[5])
            #expect(await c.call(1, "PUT", "/api/v1/groups/\(g)/members/\(m1.id)", token: owner.token, json: ["role": "admin"]).status == 204)
            func status(_ node: Int, _ method: String, _ path: String, _ u: User, _ json: Any? = nil) async -> (Int, String?) {
                let r = await c.call(node, method, path, token: u.token, json: json)
                return (r.status, r.errorCode)
            }
            #expect(await status(2, "PATCH", "/api/v1/groups/\(g)", m2, ["name": "mine"]) == (403, "not_allowed"), "a member renames")
            #expect(await status(2, "DELETE", "/api/v1/groups/\(g)/members/\(m4.id)", m2) == (403, "not_allowed"), "a member removes")
            #expect(await status(3, "PUT", "/api/v1/groups/\(g)/members/\(m2.id)", m1, ["role": "admin"]) == (403, "not_allowed"), "an admin sets roles")
            #expect(await status(3, "POST", "/api/v1/groups/\(g)/transfer", m1, ["user_id": m1.id]) == (403, "not_allowed"), "an admin transfers")
            #expect(await status(3, "DELETE", "/api/v1/groups/\(g)", m1) == (403, "not_allowed"), "an admin dissolves")
            #expect(await status(1, "DELETE", "/api/v1/groups/\(g)/members/\(owner.id)", m1) == (403, "not_allowed"), "an admin removes the owner")
            #expect(await status(1, "DELETE", "/api/v1/groups/\(g)/members/\(owner.id)", owner) == (409, "owner_cannot_leave"))
            for (node, method, path, body): (Int, String, String, Any?) in [
                (1, "GET", "/api/v1/groups/\(g)", nil), (2, "GET", "/api/v1/messages?group_id=\(g)", nil),
                (3, "POST", "/api/v1/messages", ["group_id": g, "message_type": "text", "content": "let me in"]),
                (1, "POST", "/api/v1/groups/\(g)/members", ["user_ids": [stranger.id]]),
            ] {
                #expect(await status(node, method, path, stranger, body).0 == 404, "a non-member: \(method) \(path)")
            }
            #expect(await status(2, "PATCH", "/api/v1/groups/\(g)", m1, ["notice": "Be kind"]).0 == 200, "an admin sets the notice")
            #expect(await status(3, "POST", "/api/v1/messages", m5, ["group_id": g, "message_type": "text", "content": "@all", "mention_all": true]) == (403, "not_allowed"))

            // Messages in three batches; the order of joins and leaves between them decides who gets which.
            let senders = [owner, m1, m5]
            @Sendable func batch(_ name: String, during: (@Sendable () async -> Void)? = nil) async -> [UInt64] {
                async let side: Void = { if let during { await during() } }()
                let ids = await Self.each(Array(0..<15)) { k -> UInt64? in
                    let u = senders[k % 3]
                    var body: [String: Any] = ["group_id": g, "message_type": "text", "content": "\(name) \(k)", "client_msg_id": "\(name)-\(k)"]
                    if name == "A" && k == 2 { body["mentions"] = [m6.id] }
                    return await c.eventually(seconds: 30) {
                        let r = await c.call(1 + k % 3, "POST", "/api/v1/messages", token: u.token, json: body, timeout: 10)
                        return r.status == 200 ? r.u64("message_id") : nil
                    }
                }
                await side
                return ids.compactMap { $0 }
            }
            let a = await batch("A")
            #expect(await status(1, "POST", "/api/v1/groups/\(g)/members", owner, ["user_ids": [late.id]]).0 == 204)
            #expect(await status(2, "POST", "/api/v1/groups/\(g)/members", owner, ["user_ids": [tooMany.id]]) == (409, "group_full"))
            // B: the group shard's leader is SIGKILLed and restarted, and a spare contact joins and leaves
            // three times, so sends race membership changes (refused "group_changed" and retried).
            #expect(await status(1, "DELETE", "/api/v1/groups/\(g)/members/\(m3.id)", m1).0 == 204, "an admin removes a member")
            #expect(await status(1, "POST", "/api/v1/messages", m3, ["group_id": g, "message_type": "text", "content": "still here?"]).0 == 404, "removed")
            #expect(await status(2, "GET", "/api/v1/messages?group_id=\(g)", m3).0 == 404, "a removed member reads nothing")
            let shard = g % 2
            let b = await batch("B") {
                async let churn: Void = {
                    for _ in 0..<3 {
                        _ = await c.eventually { () -> Bool? in
                            let r = await c.call(2, "POST", "/api/v1/groups/\(g)/members", token: owner.token, json: ["user_ids": [tooMany.id]])
                            return r.status == 204 || r.errorCode == "already_member" ? true : nil
                        }
                        _ = await c.eventually { () -> Bool? in
                            let r = await c.call(3, "DELETE", "/api/v1/groups/\(g)/members/\(tooMany.id)", token: tooMany.token)
                            return r.status == 204 || r.status == 404 ? true : nil
                        }
                    }
                }()
                if let leader = await c.leader(of: shard) {
                    try? await Task.sleep(for: .milliseconds(150))
                    c.kill9(leader)
                    try? await Task.sleep(for: .seconds(2))
                    try? c.start(leader)
                }
                await churn
            }
            // Every B send again with its client_msg_id: the same message, replayed, nothing new.
            for k in 0..<15 where k < b.count {
                let r = await c.eventually(seconds: 30) { () -> Reply? in
                    let r = await c.call(1 + (k + 1) % 3, "POST", "/api/v1/messages", token: senders[k % 3].token, json: ["group_id": g, "message_type": "text", "content": "B \(k)", "client_msg_id": "B-\(k)"])
                    return r.status == 200 ? r : nil
                }
                #expect(r?.u64("message_id") == b[k] && r?.headers["idempotent-replayed"] == "true", "B \(k) replayed")
            }
            #expect(await status(3, "DELETE", "/api/v1/groups/\(g)/members/\(m2.id)", m2).0 == 204, "a member leaves")
            let cc = await batch("C")
            #expect(a.count == 15 && b.count == 15 && cc.count == 15, "every send acknowledged: \(a.count) \(b.count) \(cc.count)")
            let recalled = cc[2]  // m5's
            #expect(await status(2, "DELETE", "/api/v1/messages/\(recalled)", m1).0 == 200, "an admin recalls a member's message")
            #expect(await status(2, "DELETE", "/api/v1/messages/\(cc[0])", m5).0 == 403, "a member does not recall another's")

            // Histories: the members of the end see A+B+C (the late joiner B+C), each once, one order.
            let everything = Set(a + b + cc)
            let members = [owner] + initial.filter { $0.id != m2.id && $0.id != m3.id } + [late]
            #expect(members.count == 498)
            let histories = await Self.each(members) { u in await Self.history(c, 1 + Int(u.id % 3), token: u.token, group: g) }
            var orders = Set<[UInt64]>()
            for (u, h) in zip(members, histories) {
                let ids = h.messages.compactMap { ($0["message_id"] as? NSNumber)?.uint64Value }
                let want = u.id == late.id ? Set(b + cc) : everything
                #expect(h.status == 200 && ids.count == want.count && Set(ids) == want, "user \(u.id): \(h.status), \(ids.count) of \(want.count)")
                let seqs = h.messages.compactMap { ($0["seq"] as? NSNumber)?.uint64Value }
                #expect(zip(seqs, seqs.dropFirst()).allSatisfy { $0 > $1 }, "newest first, one order")
                orders.insert(u.id == late.id ? ids : ids.filter { Set(b + cc).contains($0) })
                if u.id == owner.id {
                    let r = h.messages.first { ($0["message_id"] as? NSNumber)?.uint64Value == recalled }
                    #expect(r?["recalled"] as? Bool == true && r?["content"] as? String == "")
                }
            }
            #expect(orders.count == 1, "every member sees the same order")
            for gone in [m2, m3] { #expect(await Self.history(c, 1, token: gone.token, group: g).status == 404) }

            // Inboxes: m2 (left after B) got A+B once; m6 was mentioned; m7's chat list counts them unread.
            let m2Events = await c.eventually(seconds: 30) { () -> [[String: Any]]? in
                guard let ev = await c.syncAll(2, token: m2.token) else { return nil }
                let msgs = ev.filter { $0["type"] as? String == "group_message" }
                return msgs.count >= 30 ? msgs : nil
            }
            let m2IDs = (m2Events ?? []).compactMap { ($0["message_id"] as? NSNumber)?.uint64Value }
            #expect(m2IDs.count == 30 && Set(m2IDs) == Set(a + b), "the member who left got exactly A and B once")
            let m6Events = await c.syncAll(3, token: m6.token) ?? []
            let mention = m6Events.first { ($0["message_id"] as? NSNumber)?.uint64Value == a[2] }
            #expect(mention?["mention"] as? String == "me")
            let m7 = initial[6]
            let list = await c.eventually(seconds: 30) { () -> [String: Any]? in
                let r = await c.call(1, "GET", "/api/v1/conversations", token: m7.token)
                let conv = (r["conversations"] as? [[String: Any]])?.first { ($0["group_id"] as? NSNumber)?.uint64Value == g }
                return (conv?["unread_count"] as? NSNumber)?.intValue == 44 ? conv : nil
            }
            #expect(list != nil, "45 messages, one recalled: 44 unread for a member who sent none")
            let groups = await c.call(2, "GET", "/api/v1/groups", token: late.token)
            #expect(((groups["groups"] as? [[String: Any]]) ?? []).contains { ($0["group_id"] as? NSNumber)?.uint64Value == g })
            print("group process test: 500 members, \(everything.count) messages acknowledged, histories of \(members.count) members identical")
        }
    }
}
