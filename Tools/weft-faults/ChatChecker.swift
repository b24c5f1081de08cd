import Foundation

/// The chat workload's checker (Chat.swift): what the messaging API told the chat writers, against the
/// histories and syncs read back after healing. Findings are reported in a `Checker.Result`, like the
/// raw log's.
///
/// Rules (Docs/faults.md, "The chat workload"):
/// - sending an acknowledged message again (same client_msg_id) answers the same message id;
/// - every acknowledged message is exactly once in both users' histories, as it was sent (content,
///   sender, receiver);
/// - both users' histories of a pair list the same message ids in the same order, newest first;
/// - no history holds a message whose content no writer sent (invoked), or sent in another conversation
///   or direction, or one whose every attempt was refused or never connected;
/// - a message sent under one client_msg_id is in a history at most once, however many attempts were
///   made (an unknown outcome may have landed: once, or not at all);
/// - each user's sync has every acknowledged message that involves them, and every message of their
///   histories, exactly once (message events by message_id), none that is in no history, the messages of
///   each conversation in its order; its cursors are 1...n, dense and increasing;
/// - read your writes: the newest history page the sender reads right after an acknowledgement (any
///   node) holds the acknowledged message at its acknowledged seq, unless the page is full of newer
///   messages (it has a next_cursor and its oldest seq is above the acknowledged one). A read that fails
///   (no answer, 5xx, 429) is not a finding.
enum ChatChecker {
    /// One chat send (one client_msg_id) and what its attempts got.
    struct Send: Sendable, Equatable {
        var key: String
        var writer: Int
        var from: UInt64
        var to: UInt64
        var content: String
        var attempts = 0
        /// Some attempt's outcome is unknown (5xx, timeout, connection lost after sending): it may have landed.
        var unknown = false
        /// The acknowledged message (200).
        var messageID: UInt64?
        var seq: UInt64?
        /// The last refusal (4xx other than 429), if the send ended refused.
        var refusal: String?
        /// When it was first acknowledged, seconds since the run began.
        var ackedAt: Double?
        /// The message ids that sending it again after the acknowledgement answered (each must be `messageID`).
        var replays: [UInt64] = []
        /// Neither acknowledged nor possibly written: every attempt was refused or never connected.
        var definitelyNotWritten: Bool { messageID == nil && !unknown }
    }

    /// A message as a history page or a sync event shows it.
    struct Message: Sendable, Equatable {
        var id: UInt64
        var seq: UInt64
        var sender: UInt64
        var receiver: UInt64
        var content: String
        var recalled = false
    }

    /// One sync event, or one event a WebSocket device received (the same objects): only message events
    /// carry a message (and it may be missing when its conversation's shard did not answer in time).
    struct Event: Sendable, Equatable {
        var cursor: String
        var type: String
        var messageID: UInt64?
        var peer: UInt64?
        var message: Message?
        var fromMe: Bool?
        var conversation: String?
    }

    /// A read-your-writes read: the sender's newest history page of the conversation
    /// (`GET /api/v1/messages?receiver_id=<to>&limit=<n>`, one attempt through a random node, another
    /// at once if that one took no connection), right after the send `key` was acknowledged as
    /// `messageID` at `seq`.
    struct Read: Sendable, Equatable {
        var key: String
        var viewer: UInt64
        var peer: UInt64
        /// The node that answered (or the last one asked).
        var node: Int
        /// Nodes asked first that took no connection (nothing was sent: another node was asked at once).
        var unreachable: [Int] = []
        var messageID: UInt64
        var seq: UInt64
        /// The HTTP status; 0: no answer (no connection, timeout, connection lost).
        var status: UInt = 0
        /// A 200's messages, newest first (nil: no answer, another status, or a 200 without a readable page).
        var page: [Message]?
        /// The page has a `next_cursor` (older messages exist beyond it).
        var more = false
        var error: String?

        /// Read back and the acknowledged message is on the page.
        var found: Bool { page?.contains { $0.id == messageID } ?? false }
        /// Not on the page, but the page is full of newer messages: it cannot show it.
        var coveredByNewer: Bool {
            guard let page, !found, more else { return false }
            return page.allSatisfy { $0.seq > seq }
        }
    }

    /// A conversation: users a and b.
    struct Pair: Sendable, Hashable {
        var a: UInt64
        var b: UInt64
    }

    /// A history as `viewer` reads it (`receiver_id` = `peer`).
    struct Side: Sendable, Hashable {
        var viewer: UInt64
        var peer: UInt64
    }

    /// `histories[side]`: every message, newest first (a side that could not be read is absent);
    /// `syncs[user]`: every event from cursor 0 (absent: not read).
    /// `reads`: the read-your-writes reads made during the run.
    static func check(sends: [String: Send], pairs: [Pair], histories: [Side: [Message]], syncs: [UInt64: [Event]], reads: [Read] = []) -> Checker.Result {
        var res = Checker.Result()
        var byContent: [String: Send] = [:]
        for s in sends.values { byContent[s.content] = s }
        let acked = sends.values.filter { $0.messageID != nil }
        var ackedByID: [UInt64: Send] = [:]
        for s in acked { if let id = s.messageID { ackedByID[id] = s } }
        func involves(_ s: Send, _ p: Pair) -> Bool { (s.from == p.a && s.to == p.b) || (s.from == p.b && s.to == p.a) }
        func name(_ s: Send) -> String { "\(s.content) (client_msg_id \(s.key), \(s.from)->\(s.to))" }

        // Sent again after the acknowledgement: the same message.
        for s in acked.sorted(by: { $0.key < $1.key }) where s.replays.contains(where: { $0 != s.messageID }) {
            res.divergent.append("\(name(s)) was acknowledged as message \(s.messageID!), sending it again answered \(s.replays)")
        }

        // Message ids each user's histories hold (the sync must hold exactly these messages).
        var historyIDs: [UInt64: [UInt64: Message]] = [:]
        var landed = Set<String>()
        for pair in pairs {
            let sides = [Side(viewer: pair.a, peer: pair.b), Side(viewer: pair.b, peer: pair.a)]
            for side in sides {
                guard let h = histories[side] else { continue }
                let who = "user \(side.viewer)'s history with \(side.peer)"
                var countByID: [UInt64: Int] = [:]
                var idsByContent: [String: Set<UInt64>] = [:]
                for m in h {
                    countByID[m.id, default: 0] += 1
                    idsByContent[m.content, default: []].insert(m.id)
                    historyIDs[side.viewer, default: [:]][m.id] = m
                }
                // Every acknowledged message of the pair: once, as sent.
                for s in acked where involves(s, pair) {
                    let id = s.messageID!
                    switch countByID[id] ?? 0 {
                    case 0: res.lost.append("\(who) lacks acknowledged message \(id): \(name(s))")
                    case 1: break
                    case let c: res.duplicated.append("\(who) lists acknowledged message \(id) \(c) times: \(name(s))")
                    }
                }
                for m in h {
                    if let s = ackedByID[m.id], s.content != m.content || s.from != m.sender || s.to != m.receiver || m.recalled {
                        res.divergent.append("\(who): message \(m.id) is \(m.sender)->\(m.receiver) \"\(m.content)\"\(m.recalled ? " (recalled)" : ""), it was acknowledged for \(name(s))")
                    }
                    guard let s = byContent[m.content] else {
                        res.unexpected.append("\(who): message \(m.id) (seq \(m.seq), \(m.sender)->\(m.receiver)) has content \"\(m.content.prefix(60))\" that was never sent")
                        continue
                    }
                    if s.from != m.sender || s.to != m.receiver {
                        res.misplaced.append("\(who): message \(m.id) \"\(m.content)\" is \(m.sender)->\(m.receiver), it was sent \(s.from)->\(s.to)")
                    } else if s.definitelyNotWritten {
                        res.unexpected.append("\(who): message \(m.id) is \(name(s)), whose every attempt was refused or never connected (\(s.refusal ?? "no connection"))")
                    }
                    if s.messageID == nil { landed.insert(s.key) }
                }
                // One client_msg_id, one message, however many attempts.
                for (content, ids) in idsByContent where ids.count > 1 {
                    let what = byContent[content].map(name) ?? "\"\(content)\""
                    res.duplicated.append("\(who): \(what) is there as \(ids.count) messages \(ids.sorted())")
                }
                // Newest first: seqs strictly decreasing.
                if let k = h.indices.dropFirst().first(where: { h[$0].seq >= h[$0 - 1].seq }) {
                    res.misplaced.append("\(who) is not newest first: position \(k) has seq \(h[k].seq) after seq \(h[k - 1].seq)")
                }
            }
            // Both sides: the same messages in the same order.
            if let ha = histories[sides[0]], let hb = histories[sides[1]] {
                let ia = ha.map(\.id)
                let ib = hb.map(\.id)
                if ia != ib {
                    let k = zip(ia, ib).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset ?? min(ia.count, ib.count)
                    res.divergent.append(
                        "the histories of \(pair.a) and \(pair.b) differ: \(ia.count) and \(ib.count) messages, first difference at position \(k) (\(k < ia.count ? "\(ia[k])" : "end") vs \(k < ib.count ? "\(ib[k])" : "end"))")
                } else if let k = ha.indices.first(where: { ha[$0] != hb[$0] }) {
                    res.divergent.append("the histories of \(pair.a) and \(pair.b) show message \(ha[k].id) differently: \(ha[k]) vs \(hb[k])")
                }
            }
        }

        // Syncs.
        for user in syncs.keys.sorted() {
            let events = syncs[user] ?? []
            let who = "user \(user)'s sync"
            let cursors = events.map { UInt64($0.cursor) }
            if let k = cursors.indices.first(where: { cursors[$0] != UInt64($0 + 1) }) {
                res.divergent.append("\(who): cursors are not 1...\(events.count), dense and increasing: event \(k + 1) has cursor \"\(events[k].cursor)\"")
            }
            var count: [UInt64: Int] = [:]
            var lastSeq: [UInt64: (seq: UInt64, id: UInt64)] = [:]
            for e in events where e.type == "message" {
                guard let id = e.messageID ?? e.message?.id else {
                    res.unexpected.append("\(who): message event at cursor \(e.cursor) names no message")
                    continue
                }
                count[id, default: 0] += 1
                guard let m = e.message else { continue }
                if let s = byContent[m.content] {
                    if s.from != m.sender || s.to != m.receiver || (s.from != user && s.to != user) {
                        res.misplaced.append("\(who): message \(id) \"\(m.content)\" is \(m.sender)->\(m.receiver), it was sent \(s.from)->\(s.to)")
                    }
                } else {
                    res.unexpected.append("\(who): message \(id) at cursor \(e.cursor) has content \"\(m.content.prefix(60))\" that was never sent")
                }
                if let s = ackedByID[id], s.content != m.content {
                    res.divergent.append("\(who): message \(id) is \"\(m.content)\", it was acknowledged for \(name(s))")
                }
                // One conversation's messages in its order.
                let peer = m.sender == user ? m.receiver : m.sender
                if let last = lastSeq[peer], m.seq <= last.seq {
                    res.misplaced.append("\(who): message \(id) (seq \(m.seq)) with \(peer) comes after message \(last.id) (seq \(last.seq))")
                }
                lastSeq[peer] = (m.seq, id)
            }
            for s in acked where s.from == user || s.to == user {
                let id = s.messageID!
                switch count[id] ?? 0 {
                case 0: res.lost.append("\(who) lacks acknowledged message \(id): \(name(s))")
                case 1: break
                case let c: res.duplicated.append("\(who) has acknowledged message \(id) \(c) times: \(name(s))")
                }
            }
            let inHistories = historyIDs[user] ?? [:]
            for (id, m) in inHistories where ackedByID[id] == nil {
                switch count[id] ?? 0 {
                case 0: res.lost.append("\(who) lacks message \(id) \"\(m.content)\" (outcome unknown to its writer, in the histories)")
                case 1: break
                case let c: res.duplicated.append("\(who) has message \(id) \"\(m.content)\" \(c) times")
                }
            }
            // (Only when every history of the user was read.)
            let allRead = pairs.allSatisfy { p in
                p.a == user ? histories[Side(viewer: user, peer: p.b)] != nil : p.b == user ? histories[Side(viewer: user, peer: p.a)] != nil : true
            }
            for (id, c) in count where allRead && ackedByID[id] == nil && inHistories[id] == nil && c > 0 {
                res.unexpected.append("\(who) has message \(id), which is in none of the user's histories")
            }
            res.notes.append(
                "chat: \(who): \(events.count) events, \(count.values.reduce(0, +)) message events for \(acked.filter { $0.from == user || $0.to == user }.count) acknowledged messages")
        }
        // Read your writes.
        for r in reads where r.status == 200 {
            let what = "user \(r.viewer)'s newest history page with \(r.peer), read through node \(r.node) right after \(r.key) was acknowledged as message \(r.messageID) (seq \(r.seq))"
            guard let page = r.page else {
                res.stale.append("\(what): 200 without a readable page (\(r.error ?? ""))")
                continue
            }
            if let m = page.first(where: { $0.id == r.messageID }) {
                if m.seq != r.seq || m.sender != r.viewer || m.receiver != r.peer {
                    res.divergent.append("\(what): shows it as seq \(m.seq), \(m.sender)->\(m.receiver)")
                }
            } else if !r.coveredByNewer {
                let seqs = page.isEmpty ? "no messages" : "\(page.count) messages, seqs \(page.last!.seq)...\(page.first!.seq)"
                res.stale.append("\(what) lacks it: \(seqs), \(r.more ? "more before" : "no next_cursor (the whole history)")")
            }
        }
        let unknown = sends.values.filter { $0.messageID == nil && $0.unknown }
        res.notes.append("chat: \(acked.count) acknowledged, \(landed.count) of \(unknown.count) sends of unknown outcome landed")
        return res
    }

    /// How the read-your-writes reads went (for the summary).
    static func readSummary(_ reads: [Read]) -> String {
        let ok = reads.filter { $0.status == 200 }
        let found = ok.filter(\.found).count
        let newer = ok.filter(\.coveredByNewer).count
        let unanswered = reads.filter { $0.status == 0 }.count
        let unavailable = reads.filter { $0.status >= 500 || $0.status == 429 }.count
        let refused = reads.filter { (400..<500).contains($0.status) && $0.status != 429 }
        var s = "\(reads.count) reads right after an acknowledgement: \(ok.count) answered 200 (\(found) held the message, \(newer) full of newer messages, \(ok.count - found - newer) without it), \(unavailable) 5xx/429, \(unanswered) unanswered, \(refused.count) other 4xx"
        if let r = refused.first { s += " (first: node \(r.node) \(r.status) \(r.error ?? ""))" }
        return s
    }
}
