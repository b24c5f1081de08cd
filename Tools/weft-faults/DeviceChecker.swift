import Foundation

/// The WebSocket subscribers' rule (Subscribers.swift; Docs/faults.md, "WebSocket subscribers"): every
/// acknowledged message reaches every device of its receiver and of its sender, and no device has a gap
/// after a resume.
///
/// For each device:
/// - on each connection the cursors are increasing and leave none out between the cursor it resumed from
///   and the highest it got; `ready` names the highest cursor pushed before it;
/// - over all its connections, de-duplicated by cursor, the cursors are exactly 1...last; a cursor that
///   came twice (a resume from an earlier cursor) carries the same event both times;
/// - after the final catch-up it holds every event of the user's sync, each the same at the same cursor,
///   and nothing past the sync's end;
/// - every acknowledged message of the user (sent or received) is a message event on it exactly once; a
///   message event for a message no writer was acknowledged is one whose send had an unknown outcome and
///   landed (in the user's histories, content sent, between these users), at most once, else a phantom.
extension ChatChecker {
    /// One WebSocket connection of a device: what it asked for and what it got, in order.
    struct Connection: Sendable, Equatable {
        var node: Int
        /// The cursor the device resumed from (`{"type":"resume","cursor":…}`): the last one it had received.
        var resume: UInt64
        /// The events pushed, in the order they came.
        var events: [Event] = []
        /// `ready`'s cursor (nil: no ready came), and how many events had come before it.
        var ready: UInt64?
        var readyAfter = 0
        /// How it ended: the server's close code (nil: no close frame — lost, reset, silent, or closed by the
        /// device) and the reason.
        var closeCode: UInt16?
        var closeReason = ""
        /// The final catch-up after healing (connect, resume, read until ready).
        var final = false
        /// `{"type":"error"}` frames and frames that could not be read.
        var errors: [String] = []
        var seconds = 0.0
        /// When the WebSocket was open, when it ended, and when each of `events` came: seconds since the
        /// run began (the history's clock).
        var opened = 0.0
        var closed = 0.0
        var arrivals: [Double] = []
    }

    /// One device of a chat user: its connections, in order.
    struct Device: Sendable, Equatable {
        var user: UInt64
        var index: Int
        var connections: [Connection] = []
        /// Attempts that got no WebSocket (no connection, or no upgrade).
        var failedConnects = 0
        /// The final catch-up's ready cursor (nil: the device did not catch up after healing).
        var finalReady: UInt64?

        /// The cursor of the last event received (what the device resumes from).
        var lastCursor: UInt64 {
            for c in connections.reversed() {
                if let e = c.events.last(where: { UInt64($0.cursor) != nil }), let cursor = UInt64(e.cursor) { return cursor }
            }
            return 0
        }
    }

    /// Pushes while two nodes are cut from each other (a measurement, printed in the summary, not a rule):
    /// for each message acknowledged inside a two-way partition (up to 1 s before the heal), on each
    /// connection of its receiver's devices that was open from the acknowledgement through the heal,
    /// whether the event came before the heal and how long after the acknowledgement, overall and on the
    /// two cut nodes. Before stop 29 a cut node's sessions got nothing of a shard whose leader was on the
    /// other side until the heal.
    struct PartitionPushes: Equatable {
        var messages = 0
        var deliveries = 0, beforeHeal = 0
        var slowest = 0.0
        var onCutNodes = 0, onCutNodesBeforeHeal = 0
        var slowestOnCutNodes = 0.0
        /// The pushes that came after the heal or more than `slowAfter` after the acknowledgement, for the
        /// summary (where a slow path shows): message, route, times relative to the run's start.
        var slow: [String] = []
        static let slowAfter = 1.0
    }

    static func partitionPushes(_ devices: [Device], sends: [String: Send], faults: [Availability.Fault]) -> PartitionPushes {
        var out = PartitionPushes()
        let byUser = Dictionary(grouping: devices, by: \.user)
        for f in faults where f.kind == "partition-two-way" {
            let cutNodes: Set<Int> = [f.victim, f.peer ?? f.victim]
            for s in sends.values {
                guard let id = s.messageID, let acked = s.ackedAt, acked >= f.start, acked <= f.end - 1 else { continue }
                out.messages += 1
                for d in byUser[s.to] ?? [] {
                    for c in d.connections where !c.final && c.opened <= acked && c.closed >= f.end {
                        out.deliveries += 1
                        let onCut = cutNodes.contains(c.node)
                        if onCut { out.onCutNodes += 1 }
                        let k = c.events.firstIndex(where: { $0.type == "message" && ($0.messageID ?? $0.message?.id) == id })
                        let arrival = k.flatMap { $0 < c.arrivals.count ? c.arrivals[$0] : nil }
                        if arrival.map({ $0 > f.end || $0 - acked > PartitionPushes.slowAfter }) ?? true {
                            let at = arrival.map { String(format: "%.2f (%.2f s after the ack)", $0, $0 - acked) } ?? "never on this connection"
                            out.slow.append(
                                "message \(id) (\(s.key), \(s.from)->\(s.to)) acknowledged at \(String(format: "%.2f", acked)) in the cut of nodes \(f.victim)-\(f.peer ?? f.victim) (\(String(format: "%.2f", f.start))-\(String(format: "%.2f", f.end))), pushed on node \(c.node) at \(at)"
                            )
                        }
                        guard let arrival, arrival <= f.end else { continue }
                        let delay = max(0, arrival - acked)
                        out.beforeHeal += 1
                        out.slowest = max(out.slowest, delay)
                        if onCut {
                            out.onCutNodesBeforeHeal += 1
                            out.slowestOnCutNodes = max(out.slowestOnCutNodes, delay)
                        }
                    }
                }
            }
        }
        return out
    }

    static func describe(_ s: Send) -> String { "\(s.content) (client_msg_id \(s.key), \(s.from)->\(s.to))" }

    static func describe(_ e: Event) -> String {
        if e.type == "message" {
            let id = (e.messageID ?? e.message?.id).map { "\($0)" } ?? "?"
            return "message \(id)" + (e.message.map { " \"\($0.content.prefix(40))\"" } ?? "")
        }
        return e.type + (e.peer.map { " with \($0)" } ?? "")
    }

    /// The same event, as far as both copies tell (a message event may lack its message, a sync event
    /// read before the fields were known may lack from_me; a recalled message has no content).
    static func sameEvent(_ a: Event, _ b: Event) -> Bool {
        guard a.cursor == b.cursor, a.type == b.type, (a.messageID ?? a.message?.id) == (b.messageID ?? b.message?.id), a.peer == b.peer else { return false }
        if let x = a.fromMe, let y = b.fromMe, x != y { return false }
        if let x = a.conversation, let y = b.conversation, x != y { return false }
        if let x = a.message, let y = b.message {
            if x.id != y.id || x.seq != y.seq || x.sender != y.sender || x.receiver != y.receiver { return false }
            if !x.recalled && !y.recalled && x.content != y.content { return false }
        }
        return true
    }

    /// "3...5, 9" for [3, 4, 5, 9] (sorted).
    static func ranges(_ xs: [UInt64]) -> String {
        var parts: [String] = []
        var k = 0
        let s = xs.sorted()
        while k < s.count {
            var j = k
            while j + 1 < s.count && s[j + 1] == s[j] + 1 { j += 1 }
            parts.append(j == k ? "\(s[k])" : "\(s[k])...\(s[j])")
            k = j + 1
        }
        return parts.joined(separator: ", ")
    }

    /// `devices`: every device with every connection; `syncs`, `histories`: the users' syncs and histories
    /// read back after healing (absent: not read), as for `check`.
    static func checkDevices(_ devices: [Device], sends: [String: Send], pairs: [Pair], histories: [Side: [Message]], syncs: [UInt64: [Event]]) -> Checker.Result {
        var res = Checker.Result()
        var byContent: [String: Send] = [:]
        for s in sends.values { byContent[s.content] = s }
        var ackedByID: [UInt64: Send] = [:]
        for s in sends.values { if let id = s.messageID { ackedByID[id] = s } }
        var historyIDs: [UInt64: Set<UInt64>] = [:]
        for (side, h) in histories { historyIDs[side.viewer, default: []].formUnion(h.map(\.id)) }
        func allRead(_ user: UInt64) -> Bool {
            pairs.allSatisfy { p in
                p.a == user ? histories[Side(viewer: user, peer: p.b)] != nil : p.b == user ? histories[Side(viewer: user, peer: p.a)] != nil : true
            }
        }

        for d in devices.sorted(by: { ($0.user, $0.index) < ($1.user, $1.index) }) {
            let u = d.user
            let who = "user \(u)'s device \(d.index)"
            // Each cursor's first copy, and the connection it came on.
            var canonical: [UInt64: (event: Event, connection: Int)] = [:]
            // Cursors a connection's finding already names as never come.
            var reported = Set<UInt64>()
            for (k, c) in d.connections.enumerated() {
                let at = "connection \(k + 1) (node \(c.node), resumed from \(c.resume)\(c.final ? ", the final catch-up" : ""))"
                var seen = Set<UInt64>()
                var highest = c.resume
                var beforeReady = c.resume
                var disorder: String?
                for (i, e) in c.events.enumerated() {
                    guard let cursor = UInt64(e.cursor), cursor > 0 else {
                        res.divergent.append("\(who), \(at): event \(i + 1) has cursor \"\(e.cursor)\"")
                        continue
                    }
                    if cursor <= highest && disorder == nil {
                        disorder = "event \(i + 1) has cursor \(cursor), after \(highest == c.resume && seen.isEmpty ? "resuming from \(highest)" : "cursor \(highest)")"
                    }
                    highest = max(highest, cursor)
                    if i < c.readyAfter { beforeReady = max(beforeReady, cursor) }
                    seen.insert(cursor)
                    if let prior = canonical[cursor] {
                        if !sameEvent(prior.event, e) {
                            res.divergent.append("\(who): cursor \(cursor) is \(describe(e)) on connection \(k + 1), it was \(describe(prior.event)) on connection \(prior.connection + 1)")
                        }
                    } else {
                        canonical[cursor] = (e, k)
                    }
                }
                if let disorder { res.misplaced.append("\(who), \(at): cursors not in increasing order: \(disorder)") }
                if highest > c.resume {
                    let skipped = (c.resume + 1...highest).filter { !seen.contains($0) }
                    if !skipped.isEmpty {
                        res.lost.append("\(who), \(at): cursor\(skipped.count == 1 ? "" : "s") \(ranges(skipped)) never came, cursors up to \(highest) did")
                        reported.formUnion(skipped)
                    }
                }
                if let r = c.ready {
                    if r > beforeReady {
                        res.lost.append("\(who), \(at): ready at cursor \(r), but the events before it end at \(beforeReady)")
                        reported.formUnion((beforeReady + 1...r).filter { !seen.contains($0) })
                    } else if r < beforeReady {
                        res.divergent.append("\(who), \(at): ready at cursor \(r) after events up to \(beforeReady)")
                    }
                }
            }
            let cursors = canonical.keys.sorted()
            let top = cursors.last ?? 0
            if top > 0 {
                let missing = (1...top).filter { canonical[$0] == nil && !reported.contains($0) }
                if !missing.isEmpty { res.lost.append("\(who) never received cursor\(missing.count == 1 ? "" : "s") \(ranges(missing)) (it has cursors up to \(top))") }
            }
            if let f = d.finalReady, top > f { res.divergent.append("\(who) has cursors up to \(top), past its final catch-up's ready at \(f)") }

            // The user's sync: the same event at each cursor, and all of it after the final catch-up.
            if let sync = syncs[u] {
                var syncByCursor: [UInt64: Event] = [:]
                for e in sync { if let c = UInt64(e.cursor) { syncByCursor[c] = e } }
                let syncTop = syncByCursor.keys.max() ?? 0
                var beyond: [UInt64] = []
                for cursor in cursors {
                    guard let e = canonical[cursor]?.event else { continue }
                    guard let s = syncByCursor[cursor] else {
                        if cursor > syncTop { beyond.append(cursor) }
                        continue
                    }
                    if !sameEvent(e, s) { res.divergent.append("\(who): cursor \(cursor) is \(describe(e)), the user's sync has \(describe(s)) there") }
                }
                if !beyond.isEmpty { res.divergent.append("\(who) has cursor\(beyond.count == 1 ? "" : "s") \(ranges(beyond)), past the end of the user's sync (\(syncTop))") }
                if d.finalReady != nil && top < syncTop {
                    res.lost.append("\(who) ends at cursor \(top) after its final catch-up; the user's sync has events up to \(syncTop)")
                }
            }

            // Message events (one per cursor).
            var at: [UInt64: [UInt64]] = [:]
            for cursor in cursors {
                guard let e = canonical[cursor]?.event, e.type == "message" else { continue }
                guard let id = e.messageID ?? e.message?.id else {
                    res.unexpected.append("\(who): the message event at cursor \(cursor) names no message")
                    continue
                }
                at[id, default: []].append(cursor)
                guard at[id]?.count == 1 else { continue }
                if let s = ackedByID[id] {
                    if s.from != u && s.to != u {
                        res.misplaced.append("\(who): message \(id) at cursor \(cursor) is \(describe(s)), which is not the user's")
                    } else if let p = e.peer, p != (s.from == u ? s.to : s.from) || e.fromMe.map({ $0 != (s.from == u) }) == true {
                        res.misplaced.append("\(who): message \(id) at cursor \(cursor) names peer \(p)\(e.fromMe.map { ", from_me \($0)" } ?? ""), it was sent \(s.from)->\(s.to)")
                    }
                    if let m = e.message, !m.recalled, m.content != s.content || m.sender != s.from || m.receiver != s.to {
                        res.divergent.append("\(who): message \(id) at cursor \(cursor) is \(m.sender)->\(m.receiver) \"\(m.content.prefix(60))\", it was acknowledged for \(describe(s))")
                    }
                    continue
                }
                // Acknowledged to no writer: only a send of unknown outcome that landed may be here.
                if let m = e.message {
                    guard let s = byContent[m.content] else {
                        res.unexpected.append("\(who): message \(id) at cursor \(cursor) has content \"\(m.content.prefix(60))\" that was never sent")
                        continue
                    }
                    if s.from != m.sender || s.to != m.receiver || (s.from != u && s.to != u) {
                        res.misplaced.append("\(who): message \(id) \"\(m.content)\" at cursor \(cursor) is \(m.sender)->\(m.receiver), it was sent \(s.from)->\(s.to)")
                        continue
                    }
                    if s.definitelyNotWritten {
                        res.unexpected.append("\(who): message \(id) at cursor \(cursor) is \(describe(s)), whose every attempt was refused or never connected")
                        continue
                    }
                }
                if allRead(u) && !(historyIDs[u]?.contains(id) ?? false) {
                    res.unexpected.append("\(who): message \(id) at cursor \(cursor) was acknowledged to no writer and is in none of the user's histories")
                }
            }
            let mine = sends.values.filter { $0.messageID != nil && ($0.from == u || $0.to == u) }.sorted { $0.key < $1.key }
            if d.finalReady != nil {
                for s in mine {
                    guard let id = s.messageID, at[id] == nil else { continue }
                    res.lost.append("\(who) lacks acknowledged message \(id) (the user \(s.from == u ? "sent" : "received") it): \(describe(s))")
                }
            }
            for (id, cs) in at.sorted(by: { $0.key < $1.key }) where cs.count > 1 {
                res.duplicated.append("\(who) has message \(id) at cursors \(ranges(cs))\(ackedByID[id].map { ": " + describe($0) } ?? "")")
            }
            res.notes.append(
                "chat ws: \(who): \(d.connections.count) connections, \(d.failedConnects) failed connects, cursors up to \(top)\(d.finalReady.map { ", final ready at \($0)" } ?? ", no final catch-up"), \(at.count) messages for \(mine.count) acknowledged"
            )
        }
        return res
    }
}
