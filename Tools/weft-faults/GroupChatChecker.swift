import Foundation

/// The group workload's rules (GroupChat.swift), checked after healing against what the group writers
/// and the membership driver were told and what was read back through the API.
///
/// Membership is decided by seq in the group's stream: the owner's sync gives every change with its
/// seq (`group_created`, `group_members_added` with `user_ids`, `group_member_removed` with `user_id`),
/// so each user has membership periods (joined at seq j, left at seq l or still a member) and message m
/// belongs to a period when j < m.seq < l.
///
/// - the owner's sync holds each membership change the driver made (acknowledged, or of unknown outcome
///   and confirmed by a retry) exactly once, none it did not make, and the changes in seq order; the
///   group's final member list (`GET /api/v1/groups/{id}`) is the timeline's;
/// - every acknowledged group message was sent by a member (its seq in one of the sender's periods);
/// - every final member's history (`GET /api/v1/messages?group_id=`) holds every acknowledged message
///   after their last join exactly once, with its acknowledged seq, sender and content, and nothing from
///   before that join; a user who is not a member at the end is refused the history (404);
/// - all histories agree on one order: one seq per message id, one message per seq, newest first, and
///   two members' histories list the same messages above the later of their joins;
/// - every user's sync has a `group_message` event for each acknowledged message (and each message of
///   unknown outcome that landed) of each of their periods exactly once, none outside their periods, at
///   the message's seq, from its sender, in seq order;
/// - no history or sync holds a message no writer sent, one whose every attempt was refused or never
///   connected, or a client_msg_id as two messages.
enum GroupChatChecker {
    /// One group send (one client_msg_id) and what its attempts got.
    struct Send: Sendable, Equatable {
        var key: String
        var writer: Int
        var from: UInt64
        var content: String
        var attempts = 0
        /// Some attempt's outcome is unknown (5xx, timeout, connection lost after sending): it may have landed.
        var unknown = false
        var messageID: UInt64?
        var seq: UInt64?
        /// The last refusal (4xx other than 429), if the send ended refused.
        var refusal: String?
        /// The message ids that sending it again after the acknowledgement answered (each must be `messageID`).
        var replays: [UInt64] = []
        var definitelyNotWritten: Bool { messageID == nil && !unknown }
    }

    /// A group message as a history page or a sync event shows it.
    struct Message: Sendable, Equatable {
        var id: UInt64
        var seq: UInt64
        var sender: UInt64
        var group: UInt64
        var content: String
    }

    /// A group event of a user's sync (`group_message`, `group_created`, `group_members_added`,
    /// `group_member_removed`, ...).
    struct Event: Sendable, Equatable {
        var cursor: String
        var type: String
        var group: UInt64?
        var messageID: UInt64?
        var seq: UInt64?
        /// `peer_id`: the sender of a message, the member who made a change.
        var by: UInt64?
        var userIDs: [UInt64] = []
        var userID: UInt64?
        var message: Message?
    }

    /// A membership change the driver made (adds by the owner, leaves by the member).
    struct Change: Sendable, Equatable {
        enum Kind: String, Sendable { case add, leave }
        var kind: Kind
        var user: UInt64
        var attempts = 0
        /// Some attempt's outcome is unknown.
        var unknown = false
        /// 204, or — after an unknown outcome — a retry's answer that it had happened (`already_member`
        /// for an add, 404 for a leave).
        var landed = false
        var refusal: String?
        var what: String { "\(kind.rawValue) user \(user)" }
    }

    /// A membership period: joined at the record with seq `join`, left at `leave` (nil: still a member).
    struct Period: Sendable, Equatable {
        var join: UInt64
        var leave: UInt64?
        func covers(_ seq: UInt64) -> Bool { seq > join && leave.map { seq < $0 } ?? true }
    }

    struct Setup: Sendable, Equatable {
        var group: UInt64
        var owner: UInt64
        /// The members at creation, the owner included.
        var initial: [UInt64]
        /// Every user of the workload (members or not).
        var users: [UInt64]
    }

    /// What was read back after healing.
    struct Observed: Sendable {
        /// The owner's sync (every event, the group's and others'); nil: not read.
        var ownerSync: [Event]?
        /// Final members' histories, newest first (absent: not read).
        var histories: [UInt64: [Message]] = [:]
        /// Every user's sync (absent: not read).
        var syncs: [UInt64: [Event]] = [:]
        /// The status a history read of a user who is not a member at the end got.
        var outsiderReads: [UInt64: UInt] = [:]
        /// The members `GET /api/v1/groups/{id}` lists at the end (nil: not read).
        var finalMembers: Set<UInt64>?
    }

    /// Membership periods from the owner's sync; problems (a change that contradicts the timeline) go to `res`.
    static func periods(_ setup: Setup, _ ownerSync: [Event], _ res: inout Checker.Result) -> [UInt64: [Period]] {
        var out: [UInt64: [Period]] = [:]
        let changes = ownerSync.filter { $0.group == setup.group && ["group_created", "group_members_added", "group_member_removed"].contains($0.type) }
        let created = changes.filter { $0.type == "group_created" }
        if created.count != 1 { res.lost.append("group: the owner's sync has \(created.count) group_created events for group \(setup.group), not one") }
        let start = created.first?.seq ?? 0
        for u in setup.initial { out[u] = [Period(join: start)] }
        var lastSeq: UInt64 = 0
        var seen = Set<UInt64>()
        for e in changes {
            guard let seq = e.seq else {
                res.divergent.append("group: the owner's sync has a \(e.type) event at cursor \(e.cursor) without a seq")
                continue
            }
            if !seen.insert(seq).inserted {
                res.duplicated.append("group: the owner's sync has two change events at seq \(seq) (cursor \(e.cursor): \(e.type))")
                continue
            }
            if seq <= lastSeq { res.misplaced.append("group: the owner's sync has \(e.type) at seq \(seq) after a change at seq \(lastSeq)") }
            lastSeq = max(lastSeq, seq)
            switch e.type {
            case "group_members_added":
                if e.userIDs.isEmpty { res.divergent.append("group: group_members_added at seq \(seq) names no users") }
                for u in e.userIDs {
                    if out[u]?.last.map({ $0.leave == nil }) ?? false {
                        res.divergent.append("group: user \(u) was added at seq \(seq) while a member")
                    } else {
                        out[u, default: []].append(Period(join: seq))
                    }
                }
            case "group_member_removed":
                guard let u = e.userID else {
                    res.divergent.append("group: group_member_removed at seq \(seq) names no user")
                    continue
                }
                if let k = out[u]?.indices.last, out[u]?[k].leave == nil {
                    out[u]?[k].leave = seq
                } else {
                    res.divergent.append("group: user \(u) was removed at seq \(seq) while not a member")
                }
            default:
                break
            }
        }
        return out
    }

    static func check(setup: Setup, sends: [String: Send], changes: [Change], observed: Observed) -> Checker.Result {
        var res = Checker.Result()
        let g = setup.group
        guard let ownerSync = observed.ownerSync else {
            res.lost.append("group: the owner's sync could not be read: membership cannot be decided")
            return res
        }
        let periods = periods(setup, ownerSync, &res)
        func member(_ u: UInt64, at seq: UInt64) -> Bool { periods[u]?.contains { $0.covers(seq) } ?? false }
        func name(_ s: Send) -> String { "\(s.content) (client_msg_id \(s.key), from \(s.from))" }

        // The timeline against what the driver did: per user, its changes in order.
        var timeline: [UInt64: [Change.Kind]] = [:]
        for (u, ps) in periods {
            for (k, p) in ps.enumerated() {
                if k > 0 || !setup.initial.contains(u) { timeline[u, default: []].append(.add) }
                if p.leave != nil { timeline[u, default: []].append(.leave) }
            }
        }
        for u in Set(timeline.keys).union(changes.map(\.user)).sorted() {
            var seen = timeline[u] ?? []
            // A change refused or never sent wrote nothing: it matches nothing (a change in the sync
            // that nothing matches is one nobody made).
            for c in changes where c.user == u && (c.landed || c.unknown) {
                if seen.first == c.kind {
                    seen.removeFirst()
                } else if c.landed {
                    res.lost.append("group: \(c.what) was acknowledged but the owner's sync does not have it (in order)")
                }
            }
            for k in seen { res.unexpected.append("group: the owner's sync has a change nobody made: \(k.rawValue) user \(u)") }
        }
        let finalMembers = Set(periods.filter { $0.value.last?.leave == nil && !$0.value.isEmpty }.keys)
        if let f = observed.finalMembers, f != finalMembers {
            res.divergent.append("group: the group lists members \(f.sorted()), its change events leave \(finalMembers.sorted())")
        }

        // Sends.
        var byContent: [String: Send] = [:]
        for s in sends.values { byContent[s.content] = s }
        let acked = sends.values.filter { $0.messageID != nil }.sorted { $0.key < $1.key }
        var ackedByID: [UInt64: Send] = [:]
        for s in acked { if let id = s.messageID { ackedByID[id] = s } }
        for s in acked where s.replays.contains(where: { $0 != s.messageID }) {
            res.divergent.append("group: \(name(s)) was acknowledged as message \(s.messageID ?? 0), sending it again answered \(s.replays)")
        }
        for s in acked {
            guard let seq = s.seq else { continue }
            if !member(s.from, at: seq) {
                res.unexpected.append("group: \(name(s)) was acknowledged at seq \(seq), when user \(s.from) was not a member")
            }
        }

        // Histories (final members: their last period).
        var seqOfID: [UInt64: UInt64] = [:]
        var idAtSeq: [UInt64: UInt64] = [:]
        var known: [UInt64: Message] = [:]
        var landed = Set<String>()
        for s in acked {
            if let id = s.messageID, let seq = s.seq {
                seqOfID[id] = seq
                idAtSeq[seq] = id
            }
        }
        for u in observed.histories.keys.sorted() {
            let h = observed.histories[u] ?? []
            let who = "group: user \(u)'s history"
            guard let period = periods[u]?.last, period.leave == nil else {
                res.divergent.append("\(who) was read (\(h.count) messages), but the user is not a member")
                continue
            }
            var count: [UInt64: Int] = [:]
            var idsByContent: [String: Set<UInt64>] = [:]
            for m in h {
                count[m.id, default: 0] += 1
                idsByContent[m.content, default: []].insert(m.id)
                if m.group != g { res.misplaced.append("\(who): message \(m.id) names group \(m.group)") }
                if let s = seqOfID[m.id], s != m.seq {
                    res.divergent.append("\(who): message \(m.id) is at seq \(m.seq), elsewhere at seq \(s)")
                } else if let other = idAtSeq[m.seq], other != m.id {
                    res.divergent.append("\(who): seq \(m.seq) is message \(m.id), elsewhere message \(other)")
                } else {
                    seqOfID[m.id] = m.seq
                    idAtSeq[m.seq] = m.id
                }
                if !period.covers(m.seq) {
                    res.unexpected.append("\(who) has message \(m.id) (seq \(m.seq)) from before the user joined at seq \(period.join)")
                }
                if let s = ackedByID[m.id], s.content != m.content || s.from != m.sender {
                    res.divergent.append("\(who): message \(m.id) is from \(m.sender) \"\(m.content.prefix(60))\", it was acknowledged for \(name(s))")
                }
                guard let s = byContent[m.content] else {
                    res.unexpected.append("\(who): message \(m.id) (seq \(m.seq), from \(m.sender)) has content \"\(m.content.prefix(60))\" that was never sent")
                    continue
                }
                if s.from != m.sender {
                    res.misplaced.append("\(who): message \(m.id) \"\(m.content)\" is from \(m.sender), it was sent by \(s.from)")
                } else if s.definitelyNotWritten {
                    res.unexpected.append("\(who): message \(m.id) is \(name(s)), whose every attempt was refused or never connected (\(s.refusal ?? "no connection"))")
                }
                if s.messageID == nil { landed.insert(s.key) }
                known[m.id] = m
            }
            for s in acked {
                guard let id = s.messageID, let seq = s.seq, period.covers(seq) else { continue }
                switch count[id] ?? 0 {
                case 0: res.lost.append("\(who) lacks acknowledged message \(id) (seq \(seq)): \(name(s))")
                case 1: break
                case let c: res.duplicated.append("\(who) lists acknowledged message \(id) \(c) times: \(name(s))")
                }
            }
            for (id, c) in count where c > 1 && ackedByID[id] == nil {
                res.duplicated.append("\(who) lists message \(id) \(c) times")
            }
            for (content, ids) in idsByContent where ids.count > 1 {
                res.duplicated.append("\(who): \(byContent[content].map(name) ?? "\"\(content)\"") is there as \(ids.count) messages \(ids.sorted())")
            }
            if let k = h.indices.dropFirst().first(where: { h[$0].seq >= h[$0 - 1].seq }) {
                res.misplaced.append("\(who) is not newest first: position \(k) has seq \(h[k].seq) after seq \(h[k - 1].seq)")
            }
        }
        // One order: two members' histories agree above the later of their joins.
        let readers = observed.histories.keys.sorted()
        for (i, a) in readers.enumerated() {
            for b in readers[(i + 1)...] {
                guard let ja = periods[a]?.last?.join, let jb = periods[b]?.last?.join else { continue }
                let w = max(ja, jb)
                let ia = (observed.histories[a] ?? []).filter { $0.seq > w }.map(\.id)
                let ib = (observed.histories[b] ?? []).filter { $0.seq > w }.map(\.id)
                if ia != ib {
                    let k = zip(ia, ib).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset ?? min(ia.count, ib.count)
                    res.divergent.append(
                        "group: the histories of \(a) and \(b) differ above seq \(w): \(ia.count) and \(ib.count) messages, first difference at position \(k) (\(k < ia.count ? "\(ia[k])" : "end") vs \(k < ib.count ? "\(ib[k])" : "end"))")
                }
            }
        }
        for u in setup.users.sorted() where !finalMembers.contains(u) {
            if let status = observed.outsiderReads[u], status != 404 {
                res.divergent.append("group: user \(u), not a member at the end, read the group's history: \(status), not 404")
            }
        }

        // Syncs.
        let mayLand = known.filter { ackedByID[$0.key] == nil }
        for u in observed.syncs.keys.sorted() {
            let who = "group: user \(u)'s sync"
            let events = (observed.syncs[u] ?? []).filter { $0.group == g && $0.type == "group_message" }
            var count: [UInt64: Int] = [:]
            var last: (seq: UInt64, id: UInt64)?
            for e in events {
                guard let id = e.messageID ?? e.message?.id else {
                    res.unexpected.append("\(who): group_message event at cursor \(e.cursor) names no message")
                    continue
                }
                count[id, default: 0] += 1
                let seq = e.seq ?? e.message?.seq
                if let seq {
                    if !member(u, at: seq) {
                        res.unexpected.append("\(who) has message \(id) (seq \(seq)), ordered while the user was not a member")
                    }
                    if let s = seqOfID[id], s != seq { res.divergent.append("\(who): message \(id) is at seq \(seq), in the histories at seq \(s)") }
                    if let l = last, seq <= l.seq { res.misplaced.append("\(who): message \(id) (seq \(seq)) comes after message \(l.id) (seq \(l.seq))") }
                    last = (seq, id)
                } else {
                    res.divergent.append("\(who): group_message event at cursor \(e.cursor) has no seq")
                }
                if let s = ackedByID[id] {
                    if let by = e.by, by != s.from { res.misplaced.append("\(who): message \(id) names sender \(by), it was sent by \(s.from)") }
                    if let m = e.message, m.content != s.content { res.divergent.append("\(who): message \(id) is \"\(m.content.prefix(60))\", it was acknowledged for \(name(s))") }
                } else if known[id] == nil {
                    let content = e.message.map { " \"\($0.content.prefix(60))\"" } ?? ""
                    res.unexpected.append("\(who) has message \(id)\(content), acknowledged to no writer and in none of the histories")
                }
            }
            for s in acked {
                guard let id = s.messageID, let seq = s.seq, member(u, at: seq) else { continue }
                switch count[id] ?? 0 {
                case 0: res.lost.append("\(who) lacks acknowledged message \(id) (seq \(seq)): \(name(s))")
                case 1: break
                case let c: res.duplicated.append("\(who) has acknowledged message \(id) \(c) times: \(name(s))")
                }
            }
            for (id, m) in mayLand where member(u, at: m.seq) {
                switch count[id] ?? 0 {
                case 0: res.lost.append("\(who) lacks message \(id) \"\(m.content)\" (seq \(m.seq); outcome unknown to its writer, in the histories)")
                case 1: break
                case let c: res.duplicated.append("\(who) has message \(id) \"\(m.content)\" \(c) times")
                }
            }
            let expected = acked.filter { s in s.seq.map { member(u, at: $0) } ?? false }.count
            res.notes.append("group: \(who.dropFirst(7)): \(events.count) group_message events for \(expected) acknowledged messages of the user's periods \(describe(periods[u] ?? []))")
        }
        let unknown = sends.values.filter { $0.messageID == nil && $0.unknown }
        res.notes.append(
            "group: \(acked.count) acknowledged, \(landed.count) of \(unknown.count) sends of unknown outcome landed; changes \(changes.map { "\($0.what)\($0.landed ? "" : $0.unknown ? " (unknown)" : " (refused)")" }.joined(separator: ", "))")
        return res
    }

    static func describe(_ ps: [Period]) -> String {
        ps.isEmpty ? "(never a member)" : ps.map { "(\($0.join), \($0.leave.map(String.init) ?? "-"))" }.joined(separator: " ")
    }
}
