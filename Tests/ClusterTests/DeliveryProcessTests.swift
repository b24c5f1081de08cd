import Foundation
import HummingbirdWSClient
import Logging
import NIOCore
import Testing
import WeftTesting

/// Issue 12 (first part): WebSocket sessions on real processes — resume from a cursor, then live events,
/// each inbox event once and in order across the switch.
extension Clusters {
    @Suite(.serialized) struct DeliveryProcessTests {
        var logger: Logger {
            var l = Logger(label: "test-delivery")
            l.logLevel = .critical
            return l
        }

        final class Frames: @unchecked Sendable {
            let lock = NSLock()
            var all: [[String: Any]] = []
            func add(_ f: [String: Any]) { lock.withLock { all.append(f) } }
            var snapshot: [[String: Any]] { lock.withLock { all } }
        }

        /// Opens a session on `node`, resumes from `cursor`, and collects frames until `done` says so or
        /// `seconds` pass; `during` runs once the session is ready.
        /// `ack`: acknowledge each event as it comes. `pause`: stop reading while `during` runs (a slow
        /// consumer). A close frame from the server ends up as a last frame `{"type":"_closed","code":…}`.
        func session(
            _ c: ClusterProcess, node: Int, token: String, cursor: String, seconds: Double = 15, sendAfterReady: [String] = [],
            ack: Bool = false, pause: Bool = false,
            during: @escaping @Sendable () async -> Void = {}, done: @escaping @Sendable ([[String: Any]]) -> Bool
        ) async throws -> [[String: Any]] {
            let frames = Frames()
            let url = "ws://127.0.0.1:\(c.apiPorts[node]!)/api/v1/ws"
            let close = try await WebSocketClient.connect(url: url, logger: logger) { inbound, outbound, _ in
                try await outbound.write(.text(#"{"type":"auth","token":"\#(token)"}"#))
                try await outbound.write(.text(#"{"type":"resume","cursor":"\#(cursor)"}"#))
                let timer = Task {
                    try? await Task.sleep(for: .seconds(seconds))
                    try? await outbound.close(.normalClosure, reason: "test timeout")
                }
                var started = false
                var closing = false
                for try await message in inbound.messages(maxSize: 1 << 20) {
                    guard case .text(let t) = message, let f = try? JSONSerialization.jsonObject(with: Data(t.utf8)) as? [String: Any] else { continue }
                    frames.add(f)
                    if ack, let c = (f["event"] as? [String: Any])?["cursor"] as? String {
                        try? await outbound.write(.text(#"{"type":"ack","cursor":"\#(c)"}"#))
                    }
                    if f["type"] as? String == "ready", !started {
                        started = true
                        for text in sendAfterReady { try await outbound.write(.text(text)) }
                        if pause { await during() } else { Task { await during() } }
                    }
                    // Done: close, and keep reading until the server's close ends the stream (a client
                    // that stops reading cannot finish the close handshake).
                    if !closing, done(frames.snapshot) {
                        closing = true
                        try? await outbound.close(.normalClosure, reason: nil)
                    }
                }
                timer.cancel()
            }
            if let close {
                let code: Int = if case .unknown(let n) = close.closeCode { Int(n) } else { 1000 }
                frames.add(["type": "_closed", "code": code])
            }
            return frames.snapshot
        }

        /// alice (signed up on node 1) and bob (node 2), contacts: their ids and tokens.
        static func contacts(_ c: ClusterProcess) async throws -> (UInt64, String, UInt64, String) {
            let alice = try #require(await c.register("alice"))
            let bob = try #require(await c.register("bob", via: 2))
            let a = try #require(await c.login("alice"))
            let b = try #require(await c.login("bob", via: 2))
            #expect(await c.befriend((alice, a), (bob, b)))
            return (alice, a, bob, b)
        }

        /// Walks a session's frames in order: each event must be the cursor after the last one, and a
        /// `gap` must start at the last cursor and move it forward. Nil when all hold; else what broke.
        static func gapsAndEvents(_ frames: [[String: Any]], from start: UInt64) -> (gaps: [(UInt64, UInt64)], broken: String?) {
            var at = start
            var gaps: [(UInt64, UInt64)] = []
            for f in frames {
                if f["type"] as? String == "gap" {
                    guard let after = (f["after"] as? String).flatMap(UInt64.init), let through = (f["cursor"] as? String).flatMap(UInt64.init),
                        after == at, through > after
                    else { return (gaps, "a gap that does not start at cursor \(at): \(f)") }
                    gaps.append((after, through))
                    at = through
                } else if let c = ((f["event"] as? [String: Any])?["cursor"] as? String).flatMap(UInt64.init) {
                    guard c == at + 1 else { return (gaps, "event \(c) after cursor \(at)") }
                    at = c
                }
            }
            return (gaps, nil)
        }

        static func cursors(_ frames: [[String: Any]]) -> [UInt64] {
            frames.compactMap { ($0["event"] as? [String: Any])?["cursor"] as? String }.compactMap(UInt64.init)
        }

        @Test(.timeLimit(.minutes(3))) func aSessionResumesThenGetsLiveEventsOnceInOrder() async throws {
            let c = try ClusterProcess(name: "ws", nodes: 3, shards: 2)
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<2 { _ = try #require(await c.leader(of: UInt64(s))) }
            let (_, a, bob, b) = try await Self.contacts(c)
            for k in 0..<3 {
                _ = await c.eventually {
                    let r = await c.call(1 + k % 3, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "before \(k)"])
                    return r.status == 200 ? true : nil
                }
            }
            // Bob's inbox: request, accepted, 3 messages (after the relays): 5 events; then 3 more live.
            _ = await c.eventually { await c.syncAll(2, token: b).flatMap { $0.count >= 5 ? true : nil } }
            let sendMore: @Sendable () async -> Void = {
                for k in 0..<3 {
                    _ = await c.eventually {
                        let r = await c.call(3, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "live \(k)"])
                        return r.status == 200 ? true : nil
                    }
                }
            }
            let frames = try await session(c, node: 2, token: b, cursor: "0", during: sendMore) { Self.cursors($0).count >= 8 }
            let cursors = Self.cursors(frames)
            #expect(cursors == Array(1...8), "each event once, in order: \(cursors)")
            let contents = frames.compactMap { (($0["event"] as? [String: Any])?["message"] as? [String: Any])?["content"] as? String }
            #expect(contents == ["before 0", "before 1", "before 2", "live 0", "live 1", "live 2"])
            #expect(frames.contains { $0["type"] as? String == "ready" })

            // Another device resumes from cursor 6 on another node: only 7 and 8.
            let later = try await session(c, node: 3, token: b, cursor: "6", seconds: 5) { Self.cursors($0).count >= 2 }
            #expect(Self.cursors(later) == [7, 8])

            // Without a valid token the session is closed (no events).
            let refused = try await session(c, node: 1, token: "not-a-token", cursor: "0", seconds: 3) { _ in false }
            #expect(Self.cursors(refused).isEmpty)
        }

        /// Messages sent over the socket: the same validation and idempotency as POST /api/v1/messages.
        @Test(.timeLimit(.minutes(3))) func messagesSentOverTheSocketAreAnsweredAndWrittenOnce() async throws {
            let c = try ClusterProcess(name: "wssend", nodes: 3, shards: 2)
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<2 { _ = try #require(await c.leader(of: UInt64(s))) }
            let (alice, a, bob, b) = try await Self.contacts(c)
            let msg = #"{"receiver_id":\#(bob),"message_type":"text","content":"over the socket","client_msg_id":"s1"}"#
            let frames = try await session(
                c, node: 3, token: a, cursor: "0",
                sendAfterReady: [
                    #"{"type":"send","request_id":"r1","message":\#(msg)}"#, #"{"type":"send","request_id":"r2","message":\#(msg)}"#,
                    #"{"type":"send","request_id":"r3","message":{"receiver_id":\#(bob),"message_type":"sticker","content":"x"}}"#,
                ]
            ) { fs in fs.filter { $0["type"] as? String == "sent" || $0["type"] as? String == "error" }.count >= 3 }
            let sent = frames.filter { $0["type"] as? String == "sent" }
            #expect(sent.count == 2)
            let ids = Set(sent.compactMap { ($0["message_id"] as? NSNumber)?.uint64Value })
            #expect(ids.count == 1, "the same client_msg_id is one message")
            #expect(sent.contains { $0["replayed"] as? Bool == true })
            let error = frames.first { $0["type"] as? String == "error" }
            #expect(error?["request_id"] as? String == "r3" && error?["code"] as? String == "invalid_message_type")
            let history = await c.history(2, token: b, peer: alice)
            #expect(history?.count == 1 && history?.first?["content"] as? String == "over the socket")
        }

        /// The node holding a device's session is SIGKILLed; the device resumes from its last cursor on
        /// another node and, with the events of both sessions together, has every event once, in order.
        @Test(.timeLimit(.minutes(3))) func aDeviceResumesOnAnotherNodeAfterAKill() async throws {
            let c = try ClusterProcess(name: "wskill", nodes: 3, shards: 2)
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<2 { _ = try #require(await c.leader(of: UInt64(s))) }
            let (_, a, bob, b) = try await Self.contacts(c)
            let send: @Sendable (Int, [Int]) async -> Void = { k, nodes in
                _ = await c.eventually {
                    for n in nodes {
                        let r = await c.call(n, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "m\(k)", "client_msg_id": "k\(k)"])
                        if r.status == 200 { return true }
                    }
                    return nil
                }
            }
            // First session on node 2: the request, the accept and four messages (cursors 1...6).
            let first = try await session(c, node: 2, token: b, cursor: "0", during: { for k in 0..<4 { await send(k, [1, 3]) } }) {
                Self.cursors($0).count >= 6
            }
            let seen = Self.cursors(first)
            #expect(seen == Array(1...6))
            c.kill9(2)
            // Messages while the device is away, then a resume on node 3 from the last cursor it saw.
            for k in 4..<7 { await send(k, [1, 3]) }
            let second = try await session(c, node: 3, token: b, cursor: "\(seen.last ?? 0)", during: { for k in 7..<9 { await send(k, [1, 3]) } }) {
                Self.cursors($0).count >= 5
            }
            let all = seen + Self.cursors(second)
            #expect(all == Array(1...11), "every event once, in order, across the kill: \(all)")
            let contents = (first + second).compactMap { (($0["event"] as? [String: Any])?["message"] as? [String: Any])?["content"] as? String }
            #expect(contents == (0..<9).map { "m\($0)" })
        }

        /// Retention dropped the start of bob's inbox: a device resuming from before it is told the gap
        /// (`{"type":"gap"}`) and then gets every event after it once, in order, and live ones after that;
        /// HTTP sync from there is 410 `cursor_expired` naming the cursor to go on from. Before, the
        /// session held what it read (it did not follow the cursor) and read the same page for ever.
        @Test(.timeLimit(.minutes(4))) func aCursorBelowRetentionGetsAGapThenEveryEventAfterIt() async throws {
            let c = try ClusterProcess(
                name: "wsretain", nodes: 3, shards: 1, segmentBytes: 4096, storage: "snapshot_every_records = 100\nretention = \"16KiB\"",
                messaging: "bcrypt_cost = 4\nsends_per_minute = 100000")
            try c.startAll()
            defer { c.stopAll() }
            _ = try #require(await c.leader(of: 0))
            let (_, a, bob, b) = try await Self.contacts(c)
            let pad = String(repeating: "retention drops the start of the inbox ", count: 3)
            let sent = await withTaskGroup(of: Int.self) { g in
                for w in 0..<8 {
                    g.addTask {
                        var ok = 0
                        for k in stride(from: w, to: 400, by: 8) {
                            let r = await c.call(1 + k % 3, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "m\(k) \(pad)"])
                            if r.status == 200 { ok += 1 }
                        }
                        return ok
                    }
                }
                return await g.reduce(0, +)
            }
            #expect(sent == 400)
            // The retention check runs every 10 s: wait for sync from 0 to say the start is gone.
            let expired = await c.eventually(seconds: 90) { () async -> Reply? in
                let r = await c.call(2, "GET", "/api/v1/sync?cursor=0&limit=10", token: b)
                return r.status == 410 ? r : nil
            }
            let gone = try #require(expired, "retention never dropped the inbox's start")
            #expect(gone.errorCode == "cursor_expired")
            let floorText = try #require((gone.json?["error"] as? [String: Any])?["cursor"] as? String)
            let floor = try #require(UInt64(floorText))
            #expect(floor > 2)
            let fromThere = await c.call(2, "GET", "/api/v1/sync?cursor=\(floor)&limit=5", token: b)
            #expect(fromThere.status == 200)
            let firstCursor = ((fromThere.json?["events"] as? [[String: Any]])?.first?["cursor"] as? String).flatMap(UInt64.init)
            #expect(firstCursor == floor + 1, "sync goes on right after the cursor it named")
            // Each replica drops on its own schedule: wait for node 3's own, whose replica the session reads.
            let dropped3 = await c.eventually(seconds: 60) { () async -> Bool? in
                ((await c.status(3)?.shards.first?.first_index) ?? 0) > 1 ? true : nil
            }
            #expect(dropped3 == true, "node 3 never dropped its log's start")

            // A device that was away since cursor 0.
            let frames = try await session(
                c, node: 3, token: b, cursor: "0", seconds: 60,
                during: {
                    _ = await c.call(1, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "live"])
                }
            ) { fs in fs.contains { (($0["event"] as? [String: Any])?["message"] as? [String: Any])?["content"] as? String == "live" } }
            // A gap first (node 3 may drop more while the catch-up runs: a second gap is fine), and every
            // event after a gap once, in order.
            let walk = Self.gapsAndEvents(frames, from: 0)
            #expect(walk.broken == nil, "\(walk.broken ?? "")")
            #expect(walk.gaps.first.map { $0.0 == 0 && $0.1 > 2 } == true, "no gap frame from 0: \(frames.prefix(3))")
            #expect(Self.cursors(frames).count > 10)
            #expect(!frames.contains { $0["type"] as? String == "_closed" && $0["code"] as? Int != 1000 }, "\(frames.suffix(2))")
        }

        /// A node paused while the others write on and retention drops their logs' start comes back to
        /// a catch-up from the leader's files, which start past where its delivery hub stood. A device
        /// connected there the whole time is told the gap and then gets every later event once, in
        /// order, live ones included: the hub goes on from the files' start (stop 23; before, it stayed
        /// stuck and that node pushed nothing of the shard again) and the session's read of the gap
        /// finds the floor (stop 24; before, it read the same page for ever).
        @Test(.timeLimit(.minutes(5))) func aSessionOnANodeCaughtUpPastRetentionIsToldTheGapAndGoesOn() async throws {
            let c = try ClusterProcess(
                name: "wspause", nodes: 3, shards: 1, segmentBytes: 4096, storage: "snapshot_every_records = 100\nretention = \"16KiB\"",
                messaging: "bcrypt_cost = 4\nsends_per_minute = 100000")
            try c.startAll()
            defer {
                c.pause(3, false)
                c.stopAll()
            }
            _ = try #require(await c.leader(of: 0))
            let (_, a, bob, b) = try await Self.contacts(c)
            let pad = String(repeating: "a paused node misses all of this ", count: 3)
            // What the run reached, for the failure message.
            let steps = Frames()
            let frames = try await session(
                c, node: 3, token: b, cursor: "0", seconds: 200,
                during: {
                    let before = await c.status(3)?.shards.first?.applied_index ?? 0
                    steps.add(["ready": before])
                    // If node 3 led the shard, nodes 1 and 2 elect another leader; the sends below retry.
                    c.pause(3, true)
                    var written = 0
                    // Nodes 1 and 2 agree on a leader first (another one, if node 3 led): a write forwarded to
                    // the paused leader ends unknown after 5 s, which is not what this test is about
                    // (`PausedLeaderTests` is).
                    _ = await c.eventually(seconds: 30) { () async -> Bool? in
                        var leaders: Set<UInt64> = []
                        for n in [1, 2] {
                            guard let l = await c.status(n)?.shards.first?.leader, l != 3 else { return nil }
                            leaders.insert(l)
                        }
                        return leaders.count == 1 ? true : nil
                    }
                    for k in 0..<300 {
                        let ok = await c.eventually(seconds: 20) {
                            let r = await c.call(1 + k % 2, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "m\(k) \(pad)"])
                            return r.status == 200 ? true : nil
                        }
                        guard ok == true else { break }
                        written += 1
                    }
                    steps.add(["written": written])
                    // The retention check runs every 10 s on each replica: wait until both dropped past
                    // where node 3 stopped.
                    let dropped = await c.eventually(seconds: 60) { () async -> Bool? in
                        var firsts: [UInt64] = []
                        for n in [1, 2] { firsts.append(await c.status(n)?.shards.first?.first_index ?? 0) }
                        return firsts.allSatisfy { $0 > before + 1 } ? true : nil
                    }
                    steps.add(["dropped": dropped == true])
                    c.pause(3, false)
                    let installed = await c.eventually(seconds: 60) { () async -> Bool? in
                        guard let s = await c.status(3)?.shards.first, (s.stats?.catchUpsInstalled ?? 0) >= 1, s.repair?.recovering == false else { return nil }
                        return true
                    }
                    steps.add(["installed": installed == true])
                    _ = await c.eventually {
                        let r = await c.call(2, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "live"])
                        return r.status == 200 ? true : nil
                    }
                }
            ) { fs in fs.contains { (($0["event"] as? [String: Any])?["message"] as? [String: Any])?["content"] as? String == "live" } }
            let reached = steps.snapshot
            #expect(reached.contains { $0["written"] as? Int == 300 }, "not every send was answered: \(reached)")
            #expect(reached.contains { $0["installed"] as? Bool == true }, "node 3 never installed a catch-up: the test did not reach its case: \(reached)")
            let walk = Self.gapsAndEvents(frames, from: 0)
            #expect(walk.broken == nil, "\(walk.broken ?? "")")
            #expect(!walk.gaps.isEmpty, "no gap frame: \(frames.suffix(3))")
            #expect(!frames.contains { $0["type"] as? String == "_closed" && $0["code"] as? Int != 1000 }, "\(frames.suffix(2))")
        }

        /// Typing reaches the other user's sessions on another node (4 nodes: the presence directory of
        /// a user is on 3 of them), is never written to the log, and reaches no one who is not a contact.
        @Test(.timeLimit(.minutes(3))) func typingReachesAContactAcrossNodesAndNoOneElse() async throws {
            let c = try ClusterProcess(name: "wstyping", nodes: 4, shards: 4)
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<4 { _ = try #require(await c.leader(of: UInt64(s))) }
            let (alice, a, bob, b) = try await Self.contacts(c)
            let carol = try #require(await c.register("carol"))
            let cToken = try #require(await c.login("carol"))
            let typing: @Sendable ([[String: Any]]) -> [[String: Any]] = { $0.filter { $0["type"] as? String == "typing" } }
            // Alice on node 1 types to bob (on node 4) and to carol (not a contact) every 0.6 s, while
            // carol's session on node 3 listens too.
            let carolTask = Task { typing(try await self.session(c, node: 3, token: cToken, cursor: "0", seconds: 14) { _ in false }).count }
            let url = "ws://127.0.0.1:\(c.apiPorts[1]!)/api/v1/ws"
            let aliceTask = Task {
                try await WebSocketClient.connect(url: url, logger: logger) { inbound, outbound, _ in
                    try await outbound.write(.text(#"{"type":"auth","token":"\#(a)"}"#))
                    try await outbound.write(.text(#"{"type":"resume","cursor":"0"}"#))
                    let sender = Task {
                        for _ in 0..<20 {
                            try? await Task.sleep(for: .milliseconds(600))
                            try? await outbound.write(.text(#"{"type":"typing","to":\#(bob)}"#))
                            try? await outbound.write(.text(#"{"type":"typing","to":\#(carol)}"#))
                        }
                        try? await outbound.close(.normalClosure, reason: nil)
                    }
                    for try await _ in inbound.messages(maxSize: 1 << 20) {}
                    sender.cancel()
                }
            }
            let bobFrames = try await session(c, node: 4, token: b, cursor: "0", seconds: 14) { !typing($0).isEmpty }
            _ = try? await aliceTask.value
            let carolTyping = try await carolTask.value
            let seen = typing(bobFrames).first
            #expect(seen?["from"] as? Int == Int(alice), "bob sees alice typing: \(bobFrames)")
            #expect(seen?["conversation_id"] as? String == "d\(min(alice, bob))-\(max(alice, bob))")
            #expect(carolTyping == 0, "typing to someone who is not a contact goes nowhere")
            // Nothing of it in bob's inbox: request, accepted.
            let inbox = await c.syncAll(2, token: b)
            #expect(inbox?.count == 2)
        }

        /// A session on the node that holds no replica of its user's home shard (4 nodes, replication 3)
        /// gets the user's events, caught up and then live, each once and in order (another device of the
        /// user there resumed past the inbox's end changes nothing), forwarded by the
        /// shard's nodes: their forwarded-records counter moves and the far node's heads check found no
        /// loss (before, such a session polled the inbox four times a second).
        @Test(.timeLimit(.minutes(3))) func aSessionAwayFromTheHomeShardGetsItsEventsForwarded() async throws {
            let c = try ClusterProcess(name: "wsafar", nodes: 4, shards: 4)
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<4 { _ = try #require(await c.leader(of: UInt64(s))) }
            let (_, a, bob, b) = try await Self.contacts(c)
            let home = bob % 4
            var far: Int?
            for n in c.nodes {
                if let st = await c.status(n), !st.shards.contains(where: { $0.id == home }) { far = n }
            }
            let away = try #require(far, "one of 4 nodes holds no replica of shard \(home)")
            let sendMore: @Sendable () async -> Void = {
                for k in 0..<3 {
                    _ = await c.eventually {
                        let r = await c.call(1 + (away + k) % 4, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "live \(k)"])
                        return r.status == 200 ? true : nil
                    }
                }
            }
            // Another device of bob's on the same node resumes past the inbox's end (a cursor kept for
            // another account): it is closed with 4005, and must not silence the first.
            let ahead = Task { try await self.session(c, node: away, token: b, cursor: "999999", seconds: 8) { _ in false }.last?["code"] as? Int }
            try await Task.sleep(for: .seconds(1))
            // Request and accepted (caught up), then 3 messages live.
            let frames = try await session(c, node: away, token: b, cursor: "0", during: sendMore) { Self.cursors($0).count >= 5 }
            let aheadClose = try await ahead.value
            #expect(aheadClose == 4005, "a cursor past the inbox's end is refused: \(String(describing: aheadClose))")
            #expect(Self.cursors(frames) == Array(1...5), "each event once, in order: \(Self.cursors(frames))")
            var forwarded = 0.0
            var lost = 0.0
            for n in c.nodes {
                let text = await c.metricsText(n) ?? ""
                forwarded += ClusterProcess.metric(text, "weft_delivery_inbox_forwarded_total")
                if n == away { lost = ClusterProcess.metric(text, "weft_delivery_heads_lost_total") }
            }
            #expect(forwarded >= 3, "the home shard's nodes forwarded bob's records (\(forwarded))")
            #expect(lost == 0, "the heads check found nothing forwarding lost")
        }

        /// A node cut off from the leader of a user's home shard alone (the third node still reaches both)
        /// holds a replica that applies nothing while the cut lasts. It says so to the others, and they
        /// forward the user's inbox records to its sessions, as to a node without a replica
        /// (Docs/delivery.md, "Sessions away from the home shard"). Until stop 29 such a session got its
        /// events only once the cut healed. The cut: iptables `owner` rules on loopback dropping what
        /// each of the two nodes sends to the other's peer port (each node runs under its own group id).
        @Test(.enabled(if: Firewall.ownerMatchUsable), .timeLimit(.minutes(3)))
        func aSessionOnANodeCutOffFromTheLeaderGetsItsEventsThroughTheThird() async throws {
            let c = try ClusterProcess(name: "wscut", nodes: 3, shards: 2)
            c.ownGroups = true
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<2 { _ = try #require(await c.leader(of: UInt64(s))) }
            let (_, a, bob, b) = try await Self.contacts(c)
            let home = bob % 2
            let leader = try #require(await c.leader(of: home))
            let cut = try #require(c.nodes.first { $0 != leader })
            let third = try #require(c.nodes.first { $0 != leader && $0 != cut })
            let rules = [(cut, leader), (leader, cut)].map { from, to in
                ["OUTPUT", "-o", "lo", "-p", "tcp", "-m", "owner", "--gid-owner", "\(c.groupID(from))", "--dport", "\(c.peerPort(to))", "-j", "DROP"]
            }
            defer { for r in rules { try? Firewall.run(["-D"] + r) } }
            let arrived = CounterBox()  // 1 once the session has one of the messages
            let hedgedRead = CounterBox()  // the status of the read through the cut node as the cut began
            let cutAndSend: @Sendable () async -> Void = {
                do {
                    for r in rules { try Firewall.run(["-A"] + r) }
                } catch {
                    Issue.record("\(error)")
                    return
                }
                // At once, before the cut node can know it is cut off: applied by the third node's
                // replica before the announcement, so it goes to the cut node in the backlog.
                _ = await c.call(third, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "right after the cut"])
                // A linearizable read through the cut node while its replica still counts as serving (it
                // has not yet known no leader for two election timeouts): the read index names a record
                // this replica cannot get, so it alone would wait out the server's 5 s deadline and fail
                // (what held a session's gap catch-up, and its pushes, until the kernel closed the link).
                // Asked of the other replicas too after an election timeout, it is answered (`hedged`).
                // Started late on a slow machine, it goes to the others first anyway.
                let early = await c.call(cut, "GET", "/api/v1/shards/\(home)/log?from=1&limit=10000", token: ClusterProcess.token, timeout: 8)
                hedgedRead.withLock { $0 = early.status }
                // The cut node's replica counts as cut off after two of the longest election timeouts
                // past its pre-vote, and says so within 250 ms: a message a second from 2 s in, until the
                // session has one.
                try? await Task.sleep(for: .seconds(2))
                for k in 0..<25 {
                    if arrived.withLock({ $0 }) > 0 { return }
                    _ = await c.call(third, "POST", "/api/v1/messages", token: a, json: ["receiver_id": bob, "message_type": "text", "content": "through the cut \(k)"])
                    try? await Task.sleep(for: .seconds(1))
                }
            }
            @Sendable func throughTheCut(_ frames: [[String: Any]]) -> Bool {
                frames.contains { ((($0["event"] as? [String: Any])?["message"] as? [String: Any])?["content"] as? String)?.hasPrefix("through the cut") == true }
            }
            let frames = try await session(c, node: cut, token: b, cursor: "0", seconds: 40, during: cutAndSend) { frames in
                guard throughTheCut(frames) else { return false }
                arrived.withLock { $0 = 1 }
                return true
            }
            arrived.withLock { $0 = 1 }
            #expect(throughTheCut(frames), "a message reached bob's session on node \(cut) while it was cut off from node \(leader), leader of shard \(home)")
            #expect(Self.gapsAndEvents(frames, from: 0).broken == nil, "events in order: \(Self.cursors(frames))")
            // The rules did cut the pair (they stay until the test ends, after the event came): both
            // nodes find the links dead.
            let down = await c.eventually(seconds: 15) {
                let one = await Self.linkDown(c, from: cut, to: leader)
                let other = await Self.linkDown(c, from: leader, to: cut)
                return one && other ? true : nil
            }
            #expect(down == true, "nodes \(cut) and \(leader) report their links down")
            #expect(hedgedRead.withLock { $0 } == 200, "a linearizable read through node \(cut) as the cut began: \(hedgedRead.withLock { $0 })")
            // A raw linearizable read through the cut node is answered by the others (its own replica
            // would wait for a read index it cannot get).
            let read = await c.call(cut, "GET", "/api/v1/shards/\(home)/log?from=1&limit=10000", token: ClusterProcess.token, timeout: 8)
            #expect(read.status == 200, "a raw read of shard \(home) through node \(cut) during the cut: \(read.status) \(String(decoding: read.data.prefix(300), as: UTF8.self))")
            let metrics = await c.metricsText(third) ?? ""
            let forwarded = ClusterProcess.metric(metrics, "weft_delivery_inbox_forwarded_total")
            #expect(forwarded >= 1, "node \(third) forwarded bob's record to node \(cut) (\(forwarded))")
            // The message sent as the cut began came in the backlog the third node sent with the
            // announcement (stop 31; before, only a later record's gap or the heads check brought it).
            let backlog = ClusterProcess.metric(metrics, "weft_delivery_inbox_backlog_forwarded_total")
            #expect(backlog >= 1, "node \(third) sent node \(cut) the backlog since the cut (\(backlog))")
            #expect(frames.contains { ((($0["event"] as? [String: Any])?["message"] as? [String: Any])?["content"] as? String) == "right after the cut" })
        }

        /// Node `from`'s status says its link to `to` is down.
        static func linkDown(_ c: ClusterProcess, from: Int, to: Int) async -> Bool {
            guard let st = await c.status(from) else { return false }
            return (st.nodes ?? []).contains { $0.id == UInt64(to) && !$0.reachable }
        }

        /// A session that reads everything is never taken for a stalled one: with `write_stall_ms` at its
        /// least (1 s), sessions on every node hold still for 5 s after their ready and two pongs and stay
        /// open (every frame written to them was counted as written, including those the socket took at
        /// once).
        @Test(.timeLimit(.minutes(3))) func aSessionThatReadsIsNotTakenForAStalledOne() async throws {
            let c = try ClusterProcess(name: "wsidle", nodes: 3, shards: 2, tables: "[delivery]\nwrite_stall_ms = 1000")
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<2 { _ = try #require(await c.leader(of: UInt64(s))) }
            let (_, _, _, b) = try await Self.contacts(c)
            let pings = [#"{"type":"ping"}"#, #"{"type":"ping"}"#]
            async let one = session(c, node: 1, token: b, cursor: "0", seconds: 5, sendAfterReady: pings) { _ in false }
            async let two = session(c, node: 2, token: b, cursor: "0", seconds: 5, sendAfterReady: pings) { _ in false }
            async let three = session(c, node: 3, token: b, cursor: "0", seconds: 5, sendAfterReady: pings) { _ in false }
            for frames in try await [one, two, three] {
                #expect(frames.filter { $0["type"] as? String == "pong" }.count == 2, "\(frames)")
                #expect(Self.cursors(frames) == [1, 2], "the request and the acceptance: \(frames)")
                let closed = frames.last { $0["type"] as? String == "_closed" }
                #expect(closed?["code"] as? Int == 1000, "closed by the client's own close, not by the server: \(String(describing: closed))")
            }
        }

        /// A consumer that stops reading while 1 200 large messages arrive is cut off (its queue limit
        /// is 16 events) instead of the server buffering for it, and resumes without loss.
        @Test(.timeLimit(.minutes(5))) func aSlowConsumerIsCutOffAndResumesWithoutLoss() async throws {
            let c = try ClusterProcess(
                name: "wsslow", nodes: 3, shards: 2, messaging: "bcrypt_cost = 4\nsends_per_minute = 100000",
                tables: "[delivery]\nsession_queue_max = 16\nwrite_stall_ms = 2000")
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<2 { _ = try #require(await c.leader(of: UInt64(s))) }
            let (_, a, bob, b) = try await Self.contacts(c)
            let total = 1200
            let text = String(repeating: "x", count: 4000)
            let flood: @Sendable () async -> Void = {
                await withTaskGroup(of: Void.self) { group in
                    for w in 0..<16 {
                        group.addTask {
                            for k in stride(from: w, to: total, by: 16) {
                                _ = await c.eventually {
                                    let r = await c.call(1 + k % 3, "POST", "/api/v1/messages", token: a,
                                        json: ["receiver_id": bob, "message_type": "text", "content": text, "client_msg_id": "f\(k)"])
                                    return r.status == 200 ? true : nil
                                }
                            }
                        }
                    }
                }
            }
            // Reads up to "ready", then not at all until every message is sent.
            let first = try await session(c, node: 2, token: b, cursor: "0", seconds: 120, pause: true, during: flood) { _ in false }
            let got = Self.cursors(first)
            #expect(!got.isEmpty && got == Array(1...UInt64(max(1, got.count))), "in order from 1: \(got.prefix(5))…")
            #expect(got.count < total + 2, "cut off before the end (\(got.count) events)")
            let closed = first.last { $0["type"] as? String == "_closed" }
            #expect(closed == nil || closed?["code"] as? Int == 4000, "closed with 4000 resume (or the connection cut): \(String(describing: closed))")
            let rest = try await session(c, node: 3, token: b, cursor: "\(got.last ?? 0)", seconds: 90) { Self.cursors($0).count >= total + 2 - got.count }
            let all = got + Self.cursors(rest)
            #expect(all == Array(1...UInt64(total + 2)), "every event once, in order, after the resume (\(all.count) events)")
        }
    }
}
