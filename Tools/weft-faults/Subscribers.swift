import Foundation
import NIOCore

/// The chat workload's WebSocket subscribers (`GET /api/v1/ws`, Docs/delivery.md): each chat user has
/// `devicesPerUser` devices that stay connected to random nodes for the whole run, through the faults.
/// On each connection a device authenticates with the user's token (its first frame), resumes from the
/// last cursor it received ("0" the first time), records every event pushed to it, sends a ping every
/// `pingInterval` and an ack every `ackEvery` events, and takes `silence` without any frame (not even a
/// pong) as a dead connection. On any close, error or silence it connects to another random node and
/// resumes from its last cursor; it also moves to another node on its own after 15-45 s (as a phone
/// changes networks), so that resumes happen while messages flow. After healing, each device catches up
/// once more (connect, resume, read until `ready`): then it holds every event of the user's inbox.
/// `ChatChecker.checkDevices` checks what they got; every connection is a line of `history.jsonl`
/// (`op: chat-ws`).
struct ChatSubscribers: Sendable {
    let chat: ChatWorkload
    let group: any EventLoopGroup
    let devicesPerUser: Int
    static let path = "/api/v1/ws"
    static let pingInterval: Duration = .seconds(2)
    static let silence: TimeAmount = .seconds(6)
    /// For the TCP connection, and again for the upgrade.
    static let connectTimeout: TimeAmount = .seconds(3)
    static let ackEvery = 16
    /// How long a device stays on one node at most before it moves on its own.
    static let stay = 15_000...45_000

    var history: History { chat.history }

    /// Every device until `end` (then each closes its connection): their connections, by user and device.
    func run(until end: ContinuousClock.Instant, seed: UInt64) async -> [ChatChecker.Device] {
        await withTaskGroup(of: ChatChecker.Device.self) { g in
            for (k, u) in chat.users.enumerated() {
                for d in 0..<devicesPerUser {
                    let s = seed ^ 0xDE71_CE00 ^ (UInt64(k * 64 + d + 1) &* 0x9E37_79B9_7F4A_7C15)
                    g.addTask { await self.device(u, index: d, until: end, seed: s) }
                }
            }
            var out: [ChatChecker.Device] = []
            for await d in g { out.append(d) }
            return out.sorted { ($0.user, $0.index) < ($1.user, $1.index) }
        }
    }

    func others(_ node: Int) -> [Int] {
        let o = chat.nodes.filter { $0 != node }
        return o.isEmpty ? chat.nodes : o
    }

    /// One device during the run: connected to one node after another, each time resuming from its last cursor.
    func device(_ u: ChatWorkload.User, index: Int, until end: ContinuousClock.Instant, seed: UInt64) async -> ChatChecker.Device {
        var rng = SplitMix(seed: seed)
        var d = ChatChecker.Device(user: u.id, index: index)
        var node = rng.pick(chat.nodes)
        while ContinuousClock.now < end {
            let moveAt = min(end, ContinuousClock.now + rng.millis(Self.stay))
            var pause: Duration
            switch await connection(u, device: index, node: node, resume: d.lastCursor, stopAt: moveAt, stopReason: moveAt < end ? "moved" : "end of the run") {
            case .success(let c):
                d.connections.append(c)
                pause = rng.millis(50...250)
            case .failure:
                // A node that is down refuses at once, one paused or cut off has used up the timeout: the
                // next one soon.
                d.failedConnects += 1
                pause = .milliseconds(100)
            }
            node = rng.pick(others(node))
            if ContinuousClock.now < end { try? await Task.sleep(for: pause) }
        }
        return d
    }

    /// After healing: each device connects to a random node, resumes from its last cursor and reads until
    /// `ready`, trying other nodes for up to `timeout`. `failures`: devices that never got a ready.
    func catchUp(_ devices: [ChatChecker.Device], seed: UInt64, timeout: Duration = .seconds(60)) async -> (devices: [ChatChecker.Device], failures: [String]) {
        var rng = SplitMix(seed: seed ^ 0xCA7C_4000)
        var out = devices
        var failures: [String] = []
        for k in out.indices {
            guard let u = chat.user(out[k].user) else { continue }
            let end = ContinuousClock.now + timeout
            var node = rng.pick(chat.nodes)
            var last = ""
            while ContinuousClock.now < end {
                let stopAt = min(end, ContinuousClock.now + .seconds(20))
                switch await connection(u, device: out[k].index, node: node, resume: out[k].lastCursor, stopAt: stopAt, stopReason: "no ready in time", final: true) {
                case .success(let c):
                    out[k].connections.append(c)
                    if let r = c.ready { out[k].finalReady = r }
                    last = "node \(node): \(c.closeCode.map { "close code \($0) " } ?? "")\(c.closeReason)"
                case .failure(let e):
                    out[k].failedConnects += 1
                    last = "node \(node): \(e)"
                }
                if out[k].finalReady != nil { break }
                node = rng.pick(others(node))
                try? await Task.sleep(for: .milliseconds(300))
            }
            if out[k].finalReady == nil {
                failures.append("user \(u.id)'s device \(out[k].index): no ready in its final catch-up within \(timeout) (last: \(last))")
            }
        }
        return (out, failures)
    }

    /// A client frame.
    static func frame(_ fields: [String: String]) -> String {
        (try? JSONSerialization.data(withJSONObject: fields, options: [.sortedKeys])).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
    }

    /// One connection to `node`: auth, resume from `resume`, then every frame until the connection ends,
    /// `stopAt` passes (the device closes it, saying `stopReason`) or, for the final catch-up, `ready` comes.
    func connection(
        _ u: ChatWorkload.User, device: Int, node: Int, resume: UInt64, stopAt: ContinuousClock.Instant, stopReason: String, final: Bool = false
    ) async -> Result<ChatChecker.Connection, WebSocketError> {
        let started = ContinuousClock.now
        let ws: WebSocketConnection
        do {
            ws = try await WebSocketConnection.connect(
                group: group, host: TestNetwork.address(node), port: Cluster.apiPort, path: Self.path, silence: Self.silence, timeout: Self.connectTimeout)
        } catch {
            let e = error as? WebSocketError ?? WebSocketError(connect: false, description: "\(error)")
            await history.write(["op": "chat-ws", "type": "no-connection", "user": u.id, "device": device, "node": node, "final": final, "error": String(e.description.prefix(300))])
            return .failure(e)
        }
        ws.send(Self.frame(["type": "auth", "token": u.token]))
        ws.send(Self.frame(["type": "resume", "cursor": "\(resume)"]))
        var c = ChatChecker.Connection(node: node, resume: resume, final: final)
        let runStart = history.start
        c.opened = Date().timeIntervalSince(runStart)
        await withTaskGroup(of: Void.self) { g in
            g.addTask {
                while !Task.isCancelled {
                    try? await Task.sleep(for: Self.pingInterval)
                    if Task.isCancelled { return }
                    ws.send(Self.frame(["type": "ping"]))
                }
            }
            g.addTask {
                try? await Task.sleep(until: stopAt, clock: .continuous)
                if !Task.isCancelled { ws.close(stopReason) }
            }
            var unacked = 0
            for await item in ws.inbound {
                switch item {
                case .text(let text):
                    guard let o = (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any], let type = o["type"] as? String else {
                        c.errors.append("unreadable frame: \(text.prefix(200))")
                        continue
                    }
                    switch type {
                    case "event":
                        guard let e = o["event"] as? [String: Any] else {
                            c.errors.append("an event frame without its event: \(text.prefix(200))")
                            continue
                        }
                        let event = ChatWorkload.event(e)
                        c.events.append(event)
                        c.arrivals.append(Date().timeIntervalSince(runStart))
                        unacked += 1
                        if unacked >= Self.ackEvery, UInt64(event.cursor) != nil {
                            ws.send(Self.frame(["type": "ack", "cursor": event.cursor]))
                            unacked = 0
                        }
                    case "ready":
                        // A session that found a gap in its live events catches up again and says ready
                        // again: the first one is the catch-up after the resume.
                        guard c.ready == nil else { continue }
                        guard let cursor = (o["cursor"] as? String).flatMap({ UInt64($0) }) else {
                            c.errors.append("ready without a cursor: \(text.prefix(200))")
                            continue
                        }
                        c.ready = cursor
                        c.readyAfter = c.events.count
                        if final { ws.close("caught up") }
                    case "pong":
                        break
                    default:
                        c.errors.append(String(text.prefix(300)))
                    }
                case .closed(let code, let reason):
                    c.closeCode = code
                    c.closeReason = reason
                }
            }
            g.cancelAll()
        }
        c.closed = Date().timeIntervalSince(runStart)
        let d = ContinuousClock.now - started
        c.seconds = Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
        var line: [String: Any] = [
            "op": "chat-ws", "type": final ? "catch-up" : "connection", "user": u.id, "device": device, "node": node, "resume": resume,
            "events": c.events.count, "cursors": Self.runs(c.events.map(\.cursor)), "reason": String(c.closeReason.prefix(300)),
            "seconds": (c.seconds * 1000).rounded() / 1000,
        ]
        if let r = c.ready { line["ready"] = r }
        if let code = c.closeCode { line["close_code"] = Int(code) }
        if !c.errors.isEmpty { line["errors"] = c.errors.prefix(5).map { String($0.prefix(300)) } }
        await history.write(line)
        return .success(c)
    }

    /// Cursors as they came, runs of consecutive ones joined: "1...40, 42, 41".
    static func runs(_ cursors: [String]) -> String {
        var parts: [String] = []
        var k = 0
        while k < cursors.count {
            var j = k
            while j + 1 < cursors.count, let a = UInt64(cursors[j]), let b = UInt64(cursors[j + 1]), b == a + 1 { j += 1 }
            parts.append(j == k ? cursors[k] : "\(cursors[k])...\(cursors[j])")
            k = j + 1
        }
        return parts.joined(separator: ", ")
    }

    /// The summary's `chat ws:` line.
    static func summary(_ devices: [ChatChecker.Device], perUser: Int) -> String {
        let live = devices.flatMap { $0.connections.filter { !$0.final } }
        let final = devices.flatMap { $0.connections.filter(\.final) }
        let all = live + final
        let events = all.reduce(0) { $0 + $1.events.count }
        let messages = all.reduce(0) { $0 + $1.events.filter { $0.type == "message" }.count }
        var ends: [String: Int] = [:]
        for c in live {
            let why: String
            if let code = c.closeCode {
                why = "close \(code)"
            } else if c.closeReason == "moved" || c.closeReason == "end of the run" {
                why = c.closeReason
            } else if c.closeReason.hasPrefix("silent") {
                why = "silent"
            } else {
                why = "no close frame (killed, reset)"
            }
            ends[why, default: 0] += 1
        }
        let reconnects = live.count - devices.filter { !$0.connections.filter { !$0.final }.isEmpty }.count
        let caughtUp = devices.filter { $0.finalReady != nil }.count
        let errors = all.reduce(0) { $0 + $1.errors.count }
        let failed = devices.reduce(0) { $0 + $1.failedConnects }
        let endedBy = ends.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        let cursors = devices.map(\.lastCursor)
        return "\(devices.count) devices (\(perUser) per user); \(live.count) connections during the run (\(reconnects) reconnects, \(failed) attempts without a WebSocket), "
            + "ended by: \(endedBy); \(events) events received (\(messages) message events), \(live.filter { $0.ready != nil }.count) connections caught up (ready), "
            + "\(errors) error frames; final catch-up: \(caughtUp) of \(devices.count) devices got ready in \(final.count) connections, "
            + "last cursors \(cursors.min() ?? 0)...\(cursors.max() ?? 0)"
    }
}
