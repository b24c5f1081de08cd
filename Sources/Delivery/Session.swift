import WeftCore

/// One device's real-time session (Docs/delivery.md): a state machine that takes what happens — frames
/// from the client, inbox events from the log, the clock — and returns actions for the socket adapter to
/// perform. No sockets, no clock, no I/O: tested by calling it.
///
/// ```
///  awaitingAuth ──auth ok──▶ authenticated ──resume(c)──▶ catchingUp(from c+1) ──caught up──▶ live
///        │                        │                          │  ▲ reads pages of the inbox       │
///        └──── idle / bad ────────┴──────────────────────────┴──┴──── close(code) ◀─────────────┘
/// ```
///
/// No gap, no duplicate across the switch from catch-up to live: live events are accepted from the moment
/// the session subscribes (before the first catch-up page), held in order, and every event — from a
/// page or live — is pushed only if its inbox seq is `delivered + 1`; lower seqs are dropped (already
/// pushed), higher ones wait until the seqs before them arrive (from a page). A session that falls more
/// than `queueCountMax` events behind is closed with `Close.resume`: the client resumes from its cursor.
public struct Session: Sendable {
    public struct Limits: Sendable, Equatable {
        /// Events queued for the socket at most (pushed, not yet written) plus events held out of order.
        public var queueCountMax: Int
        /// Events per catch-up page.
        public var pageCountMax: Int
        /// A session without a frame from the client for this long is closed (heartbeats count).
        public var idleMillisMax: Int64
        /// Auth must come this soon after connecting.
        public var authMillisMax: Int64
        /// Pushed events the socket has not written for this long (the client stopped reading and the
        /// connection's buffers are full) close the session with `Close.resume`.
        public var writeStallMillisMax: Int64
        public init(
            queueCountMax: Int = 1024, pageCountMax: Int = 100, idleMillisMax: Int64 = 90_000, authMillisMax: Int64 = 10_000,
            writeStallMillisMax: Int64 = 30_000
        ) {
            self.queueCountMax = queueCountMax
            self.pageCountMax = pageCountMax
            self.idleMillisMax = idleMillisMax
            self.authMillisMax = authMillisMax
            self.writeStallMillisMax = writeStallMillisMax
        }
    }

    /// Close codes (WebSocket private range 4000-4999) and what a client should do.
    public enum Close: UInt16, Sendable {
        /// Fell behind (queue full) or the server is moving the session: reconnect and resume from the last cursor.
        case resume = 4000
        /// Not authenticated in time, or a bad token: log in again.
        case unauthorized = 4001
        /// No frame for too long.
        case idle = 4002
        /// A frame the protocol does not allow.
        case protocolError = 4003
        /// Too many sessions for this user or node.
        case tooMany = 4004
        /// The resume cursor is past the end of the user's inbox: not one this account was given.
        case invalidCursor = 4005
    }

    public enum State: Sendable, Equatable {
        case awaitingAuth
        /// Authenticated; no resume yet.
        case authenticated(user: UInt64)
        /// Reading the inbox after `delivered` page by page (a read is outstanding when `reading`).
        case catchingUp(user: UInt64, reading: Bool)
        case live(user: UInt64)
        case closed
    }

    /// An inbox event as the session sees it: its seq and the encoded event the adapter will send.
    public struct Event: Sendable, Equatable {
        public var seq: StreamSeq
        public var body: [UInt8]
        public init(seq: StreamSeq, body: [UInt8]) {
            self.seq = seq
            self.body = body
        }
    }

    public enum Action: Sendable, Equatable {
        /// Check this token; answer with `authenticated` or `authFailed`.
        case authenticate(token: String)
        /// Start following the user's inbox (live events arrive through `live(_:)`).
        case subscribe(user: UInt64)
        /// Read up to `limit` inbox events from `seq`; answer with `page(_:complete:)`.
        case readInbox(user: UInt64, fromSeq: StreamSeq, limit: Int)
        /// Send these events to the client, in order.
        case push([Event])
        /// Send a protocol answer (ready, pong, error) as JSON the adapter formats.
        case reply(Reply)
        case close(Close, String)
        /// The device acknowledged the user's inbox up to `cursor` (a new high): record it, so offline
        /// push leaves these events alone.
        case acknowledged(user: UInt64, cursor: StreamSeq)
    }

    public enum Reply: Sendable, Equatable {
        /// Resumed: events after `cursor` follow.
        case ready(cursor: StreamSeq)
        case pong
        case error(code: String, message: String)
        /// The events after `after` through `through` no longer exist (retention dropped them): the
        /// session goes on after `through`, which is the client's cursor from now on.
        case gap(after: StreamSeq, through: StreamSeq)
    }

    public private(set) var state: State = .awaitingAuth
    public let limits: Limits
    /// The highest inbox seq pushed to the client.
    public private(set) var delivered: StreamSeq = 0
    /// The highest seq the client acknowledged.
    public private(set) var acked: StreamSeq = 0
    /// Live events that arrived ahead of `delivered + 1` (while catching up), by seq.
    var held: [StreamSeq: Event] = [:]
    /// A head told while catching up (`headReached`): if the catch-up ends below it, one more read.
    var headWhileCatchingUp: StreamSeq = 0
    /// Pushed, not yet written by the socket (the adapter reports writes with `written`).
    public private(set) var unwritten = 0
    var connectedAt: Int64
    var lastHeard: Int64
    /// The last time the socket wrote (or had nothing to write).
    var lastWritten: Int64

    public init(limits: Limits = Limits(), nowMillis: Int64) {
        self.limits = limits
        connectedAt = nowMillis
        lastHeard = nowMillis
        lastWritten = nowMillis
    }

    public var user: UInt64? {
        switch state {
        case .authenticated(let u), .live(let u): u
        case .catchingUp(let u, _): u
        case .awaitingAuth, .closed: nil
        }
    }

    // MARK: Client frames

    public enum ClientFrame: Sendable, Equatable {
        case auth(token: String)
        /// Events after `cursor` (0: from the start).
        case resume(cursor: StreamSeq)
        case ack(cursor: StreamSeq)
        case ping
    }

    public mutating func received(_ frame: ClientFrame, nowMillis: Int64) -> [Action] {
        guard state != .closed else { return [] }
        lastHeard = nowMillis
        switch (state, frame) {
        case (_, .ping):
            return [.reply(.pong)]
        case (.awaitingAuth, .auth(let token)):
            return [.authenticate(token: token)]
        case (.awaitingAuth, _):
            return close(.unauthorized, "authenticate first: {\"type\":\"auth\",\"token\":\"...\"}")
        case (.authenticated(let u), .resume(let cursor)):
            delivered = cursor
            acked = cursor
            state = .catchingUp(user: u, reading: true)
            // Subscribe first, then read: an event committed in between arrives live and is held.
            // (No acknowledgement from the cursor itself: a client may resume from a cursor past the inbox's
            // end — one kept for another account — and must not silence notifications of events it never got.)
            return [.subscribe(user: u), .readInbox(user: u, fromSeq: cursor &+ 1, limit: pageLimit)]
        case (.live(let u), .ack(let c)), (.catchingUp(let u, _), .ack(let c)):
            guard c <= delivered else { return close(.protocolError, "ack of cursor \(c) past the last event sent (\(delivered))") }
            guard c > acked else { return [] }
            acked = c
            return [.acknowledged(user: u, cursor: c)]
        case (_, .auth):
            return close(.protocolError, "already authenticated")
        case (_, .resume):
            return close(.protocolError, "resume once per connection (after auth)")
        case (.authenticated, .ack):
            return close(.protocolError, "ack before resume")
        case (.closed, _):
            return []
        }
    }

    // MARK: Answers to actions

    public mutating func authenticated(user: UInt64) -> [Action] {
        guard state == .awaitingAuth else { return [] }
        state = .authenticated(user: user)
        return []
    }

    public mutating func authFailed(_ why: String) -> [Action] {
        close(.unauthorized, why)
    }

    /// A catch-up page: events from the requested seq, in order; `complete` when the inbox had no more.
    public mutating func page(_ events: [Event], complete: Bool) -> [Action] {
        guard case .catchingUp(let u, true) = state else { return [] }
        var out = deliver(events)
        guard state != .closed else { return out }
        // Held live events that now follow on.
        out += drainHeld()
        guard state != .closed else { return out }
        if complete {
            state = .live(user: u)
            out.append(.reply(.ready(cursor: delivered)))
            let headAhead = headWhileCatchingUp > delivered
            headWhileCatchingUp = 0
            if !held.isEmpty || headAhead {
                // A gap below a held event (it was committed before the subscription saw it), or a head
                // told meanwhile that this read (started earlier) did not reach: read again.
                state = .catchingUp(user: u, reading: true)
                out.append(.readInbox(user: u, fromSeq: delivered &+ 1, limit: pageLimit))
            }
        } else {
            out += nextPage(u)
        }
        return out
    }

    /// The inbox holds nothing at or below `through` any more (retention dropped it; the read that found
    /// this is answered with `page` next). A catch-up behind it tells the client the gap and goes on
    /// after it: waiting for those events would wait for ever (and read the inbox again and again).
    public mutating func dropped(through: StreamSeq) -> [Action] {
        guard case .catchingUp = state, through > delivered else { return [] }
        let after = delivered
        delivered = through
        for seq in held.keys where seq <= through { held[seq] = nil }
        return [.reply(.gap(after: after, through: through))]
    }

    /// The inbox's last seq is `head` (answered by a read from past it). A resume cursor beyond it was
    /// never given to this account (another account's, or the cluster lost its data): waiting would push
    /// nothing until the inbox grew past it, so the session is closed with `invalidCursor`.
    public mutating func inboxEnds(at head: StreamSeq) -> [Action] {
        guard case .catchingUp = state, delivered > head else { return [] }
        return close(.invalidCursor, "cursor \(delivered) is past the end of your inbox (\(head)): resume from a cursor this account was given, or from 0")
    }

    /// The user's inbox reached `seq` (a check of the inbox's head, for a session whose records are
    /// forwarded from other nodes): a live session behind it reads from its cursor, as for a gap.
    public mutating func headReached(_ seq: StreamSeq) -> [Action] {
        switch state {
        case .live(let u) where seq > delivered:
            // As a catch-up page: no more than the queue has room for.
            return nextPage(u)
        case .catchingUp:
            // Checked when the catch-up ends: its read may have started before the head was committed.
            headWhileCatchingUp = max(headWhileCatchingUp, seq)
            return []
        default:
            return []
        }
    }

    /// Events that arrived on the subscription (live), in seq order.
    public mutating func live(_ events: [Event]) -> [Action] {
        switch state {
        case .live(let u):
            var out = deliver(events)
            if state != .closed, !held.isEmpty {
                // A live event skipped ahead (the subscription missed some): read the gap.
                state = .catchingUp(user: u, reading: true)
                out.append(.readInbox(user: u, fromSeq: delivered &+ 1, limit: pageLimit))
            }
            return out
        case .catchingUp:
            for e in events where e.seq > delivered { held[e.seq] = e }
            if held.count > limits.queueCountMax { return close(.resume, "fell behind by more than \(limits.queueCountMax) events: resume from your cursor") }
            return []
        default:
            return []
        }
    }

    /// The socket wrote `n` pushed events. A catch-up waiting for room reads its next page now.
    @discardableResult
    public mutating func written(_ n: Int, nowMillis: Int64) -> [Action] {
        unwritten = max(0, unwritten - n)
        lastWritten = nowMillis
        guard case .catchingUp(let u, false) = state else { return [] }
        return nextPage(u)
    }

    /// The next catch-up page: a full page when it fits in the queue beside what is unwritten and held;
    /// else, with writes outstanding, later (`written` asks again); else a page of the room left (held
    /// live events took the rest), or, with no room at all, a close with resume.
    mutating func nextPage(_ u: UInt64) -> [Action] {
        let room = limits.queueCountMax - unwritten - held.count
        if room >= pageLimit || (room > 0 && unwritten == 0) {
            state = .catchingUp(user: u, reading: true)
            return [.readInbox(user: u, fromSeq: delivered &+ 1, limit: min(pageLimit, room))]
        }
        if unwritten > 0 {
            state = .catchingUp(user: u, reading: false)
            return []
        }
        return close(.resume, "fell behind by more than \(limits.queueCountMax) events: resume from your cursor")
    }

    /// The adapter queued `n` frames that are no events (answers, pongs, typing): they count against the
    /// queue like events (and are reported by `written` like them), so a client that sends frames without
    /// reading the answers is closed too.
    public mutating func queued(_ n: Int) -> [Action] {
        guard state != .closed else { return [] }
        unwritten += n
        if unwritten + held.count > limits.queueCountMax {
            return close(.resume, "fell behind by more than \(limits.queueCountMax) frames: resume from your cursor")
        }
        return []
    }

    /// Events per catch-up page: at most half the queue, so a page always fits.
    var pageLimit: Int { max(1, min(limits.pageCountMax, limits.queueCountMax / 2)) }


    public mutating func tick(nowMillis: Int64) -> [Action] {
        switch state {
        case .closed: return []
        case .awaitingAuth where nowMillis - connectedAt > limits.authMillisMax:
            return close(.unauthorized, "no auth within \(limits.authMillisMax / 1000) s")
        default:
            if nowMillis - lastHeard > limits.idleMillisMax { return close(.idle, "no frame for \(limits.idleMillisMax / 1000) s") }
            if unwritten == 0 {
                lastWritten = nowMillis
            } else if nowMillis - lastWritten > limits.writeStallMillisMax {
                return close(.resume, "the connection took no events for \(limits.writeStallMillisMax / 1000) s: resume from your cursor")
            }
            return []
        }
    }

    public mutating func close(_ code: Close, _ why: String) -> [Action] {
        guard state != .closed else { return [] }
        state = .closed
        held = [:]
        return [.close(code, why)]
    }

    // MARK: Ordering

    /// Pushes the events that continue `delivered` (dropping seen ones, holding ones ahead).
    mutating func deliver(_ events: [Event]) -> [Action] {
        var push: [Event] = []
        for e in events {
            if e.seq <= delivered { continue }
            if e.seq == delivered + 1 {
                push.append(e)
                delivered = e.seq
                held[e.seq] = nil
            } else {
                held[e.seq] = e
            }
        }
        push += takeHeld()
        return pushing(push)
    }

    mutating func drainHeld() -> [Action] { pushing(takeHeld()) }

    mutating func takeHeld() -> [Event] {
        var out: [Event] = []
        while let next = held.removeValue(forKey: delivered + 1) {
            out.append(next)
            delivered = next.seq
        }
        return out
    }

    mutating func pushing(_ events: [Event]) -> [Action] {
        guard !events.isEmpty else { return [] }
        unwritten += events.count
        if unwritten + held.count > limits.queueCountMax {
            // The client reads slower than its events come: it resumes from its cursor instead of the
            // server holding a growing queue.
            return close(.resume, "fell behind by more than \(limits.queueCountMax) events: resume from your cursor")
        }
        return [.push(events)]
    }
}
