import Foundation
import Testing
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// Issue 11, end to end on real processes: accounts, contacts, 1:1 messages with retries across a SIGKILL,
/// histories, multi-device sync, recall, conversations and read positions.
extension Clusters {
    @Suite(.serialized) struct MessagingProcessTests {
        /// Two users, three devices (alice on nodes 1 and 2, bob on node 3); messages both ways, each sent
        /// twice with the same client_msg_id, through changing nodes, while the leader of the pair's shard
        /// is SIGKILLed and restarted. Afterwards both histories hold every acknowledged message once, in
        /// one order; each device's sync from 0 has each message event once; a recall shows on both sides.
        @Test(.timeLimit(.minutes(4))) func messagesSurviveRetriesAndAKillExactlyOnce() async throws {
            let c = try ClusterProcess(name: "chat", nodes: 3, shards: 4)
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<4 { _ = try #require(await c.leader(of: UInt64(s))) }
            let alice = try #require(await c.register("alice", via: 1))
            let bob = try #require(await c.register("bob", via: 2))
            #expect(alice != bob)
            let a1 = try #require(await c.login("alice", via: 1))
            let a2 = try #require(await c.login("alice", via: 2))
            let b3 = try #require(await c.login("bob", via: 3))
            #expect(await c.befriend((alice, a1), (bob, b3), via: 2))

            // The pair's shard: the one whose leader gets killed.
            let probe = await c.call(1, "POST", "/api/v1/messages", token: a1, json: ["receiver_id": bob, "message_type": "text", "content": "first", "client_msg_id": "probe"])
            #expect(probe.status == 200)
            let firstID = try #require(probe.u64("message_id"))
            let pairShard = firstID >> 43
            var acked: [UInt64: String] = [firstID: "first"]

            var killed: Int?
            for k in 0..<30 {
                let fromAlice = k % 2 == 0
                let token = fromAlice ? (k % 4 == 0 ? a1 : a2) : b3
                let to = fromAlice ? bob : alice
                let text = "m\(k) from \(fromAlice ? "alice" : "bob")"
                if k == 10 {
                    let l = try #require(await c.leader(of: pairShard))
                    c.kill9(l)
                    killed = l
                }
                if k == 20, let n = killed {
                    try c.start(n)
                    killed = nil
                }
                // Through whichever nodes are up; the same client_msg_id until one attempt is acknowledged.
                let up = c.nodes.filter { $0 != killed }
                var id: UInt64?
                var attempt = 0
                while id == nil && attempt < 60 {
                    let node = up[(k + attempt) % up.count]
                    let r = await c.call(node, "POST", "/api/v1/messages", token: token, json: ["receiver_id": to, "message_type": "text", "content": text, "client_msg_id": "c\(k)"])
                    if r.status == 200 { id = r.u64("message_id") } else { try? await Task.sleep(for: .milliseconds(100)) }
                    attempt += 1
                }
                let mid = try #require(id, "message \(k) was never acknowledged")
                // The same id again, on another node: the same message, nothing new.
                let again = await c.eventually {
                    let r = await c.call(up[(k + 1) % up.count], "POST", "/api/v1/messages", token: token, json: ["receiver_id": to, "message_type": "text", "content": text, "client_msg_id": "c\(k)"])
                    return r.status == 200 ? r : nil
                }
                #expect(again?.u64("message_id") == mid)
                #expect(again?.headers["idempotent-replayed"] == "true")
                acked[mid] = text
            }

            // Both sides see the same history: every acknowledged message once, one order (by seq).
            let ha = try #require(await c.eventually { await c.history(1, token: a1, peer: bob) })
            let hb = try #require(await c.eventually { await c.history(3, token: b3, peer: alice) })
            let idsA = ha.compactMap { ($0["message_id"] as? NSNumber)?.uint64Value }
            let idsB = hb.compactMap { ($0["message_id"] as? NSNumber)?.uint64Value }
            #expect(idsA == idsB)
            #expect(Set(idsA) == Set(acked.keys))
            #expect(idsA.count == acked.count)
            let seqs = ha.compactMap { ($0["seq"] as? NSNumber)?.uint64Value }
            #expect(seqs == seqs.sorted(by: >), "newest first")
            for m in ha {
                let id = (m["message_id"] as? NSNumber)?.uint64Value ?? 0
                #expect(m["content"] as? String == acked[id])
            }

            // Each device's sync from 0: every message once (after the relays have caught up).
            for (node, token, me) in [(1, a1, alice), (2, a2, alice), (3, b3, bob)] {
                let events = try #require(
                    await c.eventually {
                        let e = await c.syncAll(node, token: token)
                        return e.flatMap { es in es.filter { $0["type"] as? String == "message" }.count >= acked.count ? es : nil }
                    })
                let msgs = events.filter { $0["type"] as? String == "message" }
                let ids = msgs.compactMap { ($0["message_id"] as? NSNumber)?.uint64Value }
                #expect(ids.count == acked.count, "user \(me) on node \(node): \(ids.count) message events for \(acked.count) messages")
                #expect(Set(ids) == Set(acked.keys))
                let cursors = events.compactMap { ($0["cursor"] as? String).flatMap(UInt64.init) }
                #expect(cursors == Array(1...UInt64(cursors.count)), "dense, ordered cursors")
                for m in msgs { #expect((m["message"] as? [String: Any])?["content"] as? String == acked[(m["message_id"] as? NSNumber)?.uint64Value ?? 0]) }
            }

            // Recall the newest message (bob's) within two minutes: both histories show the notice.
            let newest = try #require(ha.first)
            let newestID = try #require((newest["message_id"] as? NSNumber)?.uint64Value)
            let senderToken = (newest["sender_id"] as? NSNumber)?.uint64Value == alice ? a1 : b3
            let otherToken = senderToken == a1 ? b3 : a1
            let notMine = await c.call(2, "DELETE", "/api/v1/messages/\(newestID)", token: otherToken)
            #expect(notMine.status == 403)
            let recalled = await c.eventually {
                let r = await c.call(2, "DELETE", "/api/v1/messages/\(newestID)", token: senderToken)
                return r.status == 200 ? r : nil
            }
            #expect(recalled != nil)
            for (node, token, peer) in [(1, a1, bob), (3, b3, alice)] {
                let h = try #require(await c.history(node, token: token, peer: peer))
                let m = try #require(h.first { ($0["message_id"] as? NSNumber)?.uint64Value == newestID })
                #expect(m["recalled"] as? Bool == true)
                #expect(m["content"] as? String == "")
            }
            let recallEvent = await c.eventually {
                await c.syncAll(3, token: b3)?.first { $0["type"] as? String == "recall" && ($0["message_id"] as? NSNumber)?.uint64Value == newestID }
            }
            #expect(recallEvent != nil)
        }

        /// The conversation list and read positions: bob's unread count for alice goes up with her
        /// messages and drops to 0 on all his devices when one of them marks the newest read.
        @Test(.timeLimit(.minutes(3))) func unreadCountsAndReadPositionsReachEveryDevice() async throws {
            let c = try ClusterProcess(name: "conv", nodes: 3, shards: 3)
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<3 { _ = try #require(await c.leader(of: UInt64(s))) }
            let alice = try #require(await c.register("alice", via: 1))
            let bob = try #require(await c.register("bob", via: 2))
            let a = try #require(await c.login("alice", via: 1))
            let b1 = try #require(await c.login("bob", via: 1))
            let b2 = try #require(await c.login("bob", via: 3))
            #expect(await c.befriend((alice, a), (bob, b1)))
            var last: UInt64 = 0
            for k in 0..<5 {
                let r = await c.eventually {
                    let r = await c.call(1 + k % 3, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "hello \(k)"])
                    return r.status == 200 ? r : nil
                }
                last = try #require(r?.u64("message_id"))
            }
            let conversation = try #require(
                await c.eventually { () -> [String: Any]? in
                    let r = await c.call(3, "GET", "/api/v1/conversations", token: b2)
                    guard let list = r["conversations"] as? [[String: Any]], let conv = list.first,
                        (conv["unread_count"] as? NSNumber)?.intValue == 5
                    else { return nil }
                    return conv
                })
            #expect((conversation["peer_id"] as? NSNumber)?.uint64Value == alice)
            #expect(((conversation["last_message"] as? [String: Any])?["content"] as? String) == "hello 4")
            let cid = try #require(conversation["conversation_id"] as? String)
            let read = await c.call(1, "POST", "/api/v1/conversations/\(cid)/read", token: b1, json: ["message_id": last])
            #expect(read.status == 204)
            // The other device sees it (through bob's inbox), and so does the conversation list.
            let cleared = await c.eventually { () -> Bool? in
                let r = await c.call(3, "GET", "/api/v1/conversations", token: b2)
                guard let list = r["conversations"] as? [[String: Any]], (list.first?["unread_count"] as? NSNumber)?.intValue == 0 else { return nil }
                return true
            }
            #expect(cleared == true)
            let events = try #require(await c.syncAll(3, token: b2))
            #expect(events.contains { $0["type"] as? String == "read" && $0["conversation_id"] as? String == cid })
            // Alice's own list has no unread messages (hers were sent by her).
            let mine = await c.call(2, "GET", "/api/v1/conversations", token: a)
            #expect(((mine["conversations"] as? [[String: Any]])?.first?["unread_count"] as? NSNumber)?.intValue == 0)
            // Someone else's conversation is not found.
            let carol = try #require(await c.register("carol", via: 3))
            let ct = try #require(await c.login("carol", via: 3))
            let foreign = await c.call(2, "POST", "/api/v1/conversations/\(cid)/read", token: ct, json: ["message_id": last])
            #expect(foreign.status == 404)
            let notContact = await c.call(2, "POST", "/api/v1/messages", token: ct, json: ["receiver_id": alice, "message_type": "text", "content": "hi"])
            #expect(notContact.status == 403)
            #expect(notContact.errorCode == "not_allowed")
            let peek = await c.call(2, "GET", "/api/v1/messages?receiver_id=\(alice)", token: ct)
            #expect(peek.status == 200)
            #expect((peek["messages"] as? [Any])?.isEmpty == true, "carol sees nothing of alice and bob's conversation (user \(carol))")
        }

        /// Four nodes, three replicas per shard: no node holds every shard, yet every node serves every user
        /// (state queries and reads go to a node that holds the shard).
        @Test(.timeLimit(.minutes(3))) func everyNodeServesEveryUserWithoutHoldingEveryShard() async throws {
            let c = try ClusterProcess(name: "spread", nodes: 4, shards: 4)
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<4 { _ = try #require(await c.leader(of: UInt64(s))) }
            var users: [(id: UInt64, name: String)] = []
            for k in 0..<4 { users.append((try #require(await c.register("user\(k)", via: 1 + k)), "user\(k)")) }
            var tokens: [[String]] = []
            for u in users {
                var perNode: [String] = []
                for n in c.nodes { perNode.append(try #require(await c.login(u.name, via: n))) }
                tokens.append(perNode)
            }
            #expect(await c.befriend((users[0].id, tokens[0][0]), (users[1].id, tokens[1][3]), via: 3))
            #expect(await c.befriend((users[2].id, tokens[2][1]), (users[3].id, tokens[3][2]), via: 4))
            var sent: [UInt64] = []
            for k in 0..<12 {
                let n = 1 + k % 4
                let (from, to) = k % 2 == 0 ? (0, 1) : (1, 0)
                let r = await c.eventually {
                    let r = await c.call(n, "POST", "/api/v1/messages", token: tokens[from][n - 1], json: ["receiver_id": users[to].id, "message_type": "text", "content": "spread \(k)"])
                    return r.status == 200 ? r : nil
                }
                sent.append(try #require(r?.u64("message_id")))
            }
            for n in c.nodes {
                let h = try #require(await c.history(n, token: tokens[0][n - 1], peer: users[1].id))
                #expect(h.compactMap { ($0["message_id"] as? NSNumber)?.uint64Value } == sent.reversed(), "history on node \(n)")
                let events = try #require(
                    await c.eventually {
                        await c.syncAll(n, token: tokens[1][n - 1]).flatMap { e in e.filter { $0["type"] as? String == "message" }.count == 12 ? e : nil }
                    })
                let synced = Set(events.compactMap { ($0["message_id"] as? NSNumber)?.uint64Value })
                #expect(synced.isSuperset(of: sent), "sync on node \(n)")
                let me = await c.call(n, "GET", "/api/v1/users/me", token: tokens[2][n - 1])
                #expect(me.u64("user_id") == users[2].id)
                let conv = await c.call(n, "GET", "/api/v1/conversations", token: tokens[0][n - 1])
                #expect((conv["conversations"] as? [[String: Any]])?.count == 1, "conversations on node \(n)")
                let contacts = await c.call(n, "GET", "/api/v1/contacts", token: tokens[3][n - 1])
                #expect(((contacts["contacts"] as? [[String: Any]])?.first?["user_id"] as? NSNumber)?.uint64Value == users[2].id)
            }
            // Logout on one node revokes on all, including nodes without the user's home shard.
            #expect(await c.call(2, "POST", "/api/v1/auth/logout", token: tokens[3][1]).status == 204)
            for n in c.nodes {
                let r = await c.eventually { () -> Int? in
                    let s = await c.call(n, "GET", "/api/v1/users/me", token: tokens[3][n - 1]).status
                    return s == 401 ? s : nil
                }
                #expect(r == 401, "revoked on node \(n)")
            }
            // A recall through every node but the sender's first.
            let recall = await c.call(4, "DELETE", "/api/v1/messages/\(sent[11])", token: tokens[1][3])
            #expect(recall.status == 200)
        }
    }
}
