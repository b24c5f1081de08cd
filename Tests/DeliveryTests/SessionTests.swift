import Delivery
import Testing
import WeftCore

@Suite struct SessionTests {
    static func ev(_ seq: UInt64) -> Session.Event { Session.Event(seq: seq, body: Array("e\(seq)".utf8)) }

    /// What the client was sent, in order.
    static func pushed(_ actions: [Session.Action]) -> [UInt64] {
        actions.flatMap { a -> [UInt64] in if case .push(let es) = a { es.map(\.seq) } else { [] } }
    }

    static func resumed(at cursor: UInt64, limits: Session.Limits = .init()) -> Session {
        var s = Session(limits: limits, nowMillis: 0)
        _ = s.received(.auth(token: "t"), nowMillis: 1)
        _ = s.authenticated(user: 7)
        _ = s.received(.resume(cursor: cursor), nowMillis: 2)
        return s
    }

    @Test func authenticationComesFirst() {
        var s = Session(nowMillis: 0)
        #expect(s.received(.resume(cursor: 0), nowMillis: 1) == [.close(.unauthorized, "authenticate first: {\"type\":\"auth\",\"token\":\"...\"}")])
        #expect(s.state == .closed)
        #expect(s.received(.ping, nowMillis: 2).isEmpty, "a closed session does nothing")

        var t = Session(nowMillis: 0)
        #expect(t.received(.auth(token: "abc"), nowMillis: 1) == [.authenticate(token: "abc")])
        if case .close(.unauthorized, _)? = t.authFailed("bad token").first {} else { Issue.record("a bad token closes") }

        var u = Session(nowMillis: 0)
        if case .close(.unauthorized, _)? = u.tick(nowMillis: 10_001).first {} else { Issue.record("no auth in time closes") }
    }

    @Test func resumeSubscribesBeforeReading() {
        var s = Session(nowMillis: 0)
        _ = s.received(.auth(token: "t"), nowMillis: 1)
        #expect(s.authenticated(user: 9).isEmpty)
        let a = s.received(.resume(cursor: 3), nowMillis: 2)
        #expect(a == [.subscribe(user: 9), .readInbox(user: 9, fromSeq: 4, limit: 100)], "no acknowledgement from a resume cursor")
        #expect(s.delivered == 3)
        if case .close(.protocolError, _)? = s.received(.resume(cursor: 5), nowMillis: 3).first {} else { Issue.record("one resume per connection") }
    }

    @Test func liveEventsDuringCatchUpAreHeldAndNeverDoubled() {
        var s = Self.resumed(at: 3)
        var out: [Session.Action] = []
        out += s.live([Self.ev(7), Self.ev(8)])
        #expect(Self.pushed(out).isEmpty, "held until the seqs before them are pushed")
        out += s.page([Self.ev(4), Self.ev(5)], complete: false)
        #expect(out.last == .readInbox(user: 7, fromSeq: 6, limit: 100))
        out += s.page([Self.ev(6), Self.ev(7)], complete: true)
        #expect(Self.pushed(out) == [4, 5, 6, 7, 8])
        #expect(s.state == .live(user: 7))
        #expect(out.contains(.reply(.ready(cursor: 8))))
        // Live from here; a repeat is dropped.
        let more = s.live([Self.ev(8), Self.ev(9)])
        #expect(Self.pushed(more) == [9])
    }

    @Test func aGapInLiveEventsIsReadFromTheInbox() {
        var s = Self.resumed(at: 0)
        _ = s.page([], complete: true)
        let a = s.live([Self.ev(1), Self.ev(3)])
        #expect(Self.pushed(a) == [1])
        #expect(a.last == .readInbox(user: 7, fromSeq: 2, limit: 100))
        let b = s.page([Self.ev(2), Self.ev(3)], complete: true)
        #expect(Self.pushed(b) == [2, 3])
        #expect(s.state == .live(user: 7))
    }

    /// A cursor below what the inbox still holds (retention dropped its start): the session says which
    /// events are gone and goes on after them. Before, it held the events it read (they did not follow
    /// its cursor) and read the same page again, for ever, without pushing anything.
    @Test func aCursorBelowWhatTheInboxHoldsGetsAGapThenGoesOn() {
        var s = Self.resumed(at: 2)
        var out = s.dropped(through: 9)
        #expect(out == [.reply(.gap(after: 2, through: 9))])
        #expect(s.delivered == 9, "the cursor moves past the gap")
        out += s.page([Self.ev(10), Self.ev(11)], complete: true)
        #expect(Self.pushed(out) == [10, 11])
        #expect(s.state == .live(user: 7))
        #expect(!out.contains { if case .readInbox = $0 { true } else { false } }, "no read again")
        // Nothing dropped past the cursor: nothing said.
        #expect(s.dropped(through: 5).isEmpty)
        var t = Self.resumed(at: 4)
        #expect(t.dropped(through: 4).isEmpty && t.delivered == 4)

        // A live session that skipped ahead (its node's files now start later): the gap read finds the
        // floor, held events past it follow on, those below it are dropped.
        var u = Self.resumed(at: 0)
        _ = u.page([Self.ev(1)], complete: true)
        let skip = u.live([Self.ev(8), Self.ev(9)])
        #expect(skip.last == .readInbox(user: 7, fromSeq: 2, limit: 100))
        var after = u.dropped(through: 6)
        after += u.page([Self.ev(7), Self.ev(8)], complete: true)
        #expect(after.first == .reply(.gap(after: 1, through: 6)))
        #expect(Self.pushed(after) == [7, 8, 9])
        #expect(u.state == .live(user: 7))
        // Outside a catch-up it changes nothing.
        #expect(u.dropped(through: 20).isEmpty && u.delivered == 9)
    }

    /// A head past the cursor (the heads check, for records forwarded from afar) makes a live session
    /// read from its own cursor; a head at or below it, or one told while catching up, changes nothing.
    @Test func aHeadPastTheCursorIsReadFromTheInbox() {
        var s = Self.resumed(at: 0)
        #expect(s.headReached(2).isEmpty, "catching up: checked when the catch-up ends")
        let first = s.page([Self.ev(1), Self.ev(2)], complete: true)
        #expect(!first.contains(.readInbox(user: 7, fromSeq: 3, limit: 100)), "the catch-up reached the head told")
        #expect(s.headReached(2).isEmpty)
        #expect(s.headReached(1).isEmpty)
        #expect(s.headReached(4) == [.readInbox(user: 7, fromSeq: 3, limit: 100)])
        #expect(s.state == .catchingUp(user: 7, reading: true))
        let b = s.page([Self.ev(3), Self.ev(4)], complete: true)
        #expect(Self.pushed(b) == [3, 4])
        #expect(s.state == .live(user: 7))
        // A head told during a catch-up whose read ends below it: one more read, then live (not a loop).
        var u = Self.resumed(at: 0)
        _ = u.headReached(3)
        let short = u.page([Self.ev(1)], complete: true)
        #expect(short.last == .readInbox(user: 7, fromSeq: 2, limit: 100))
        let again = u.page([], complete: true)
        #expect(!again.contains { if case .readInbox = $0 { true } else { false } })
        #expect(u.state == .live(user: 7))
        // A client that resumed past the inbox's end is not behind any head below its cursor.
        var t = Self.resumed(at: 1_000)
        _ = t.page([], complete: true)
        #expect(t.headReached(40).isEmpty)
    }

    /// A resume cursor past the inbox's end (another account's, or from before the cluster lost its
    /// data) is refused with 4005, not left waiting with nothing pushed until the inbox grows past it.
    @Test func aCursorPastTheInboxsEndIsRefused() {
        var s = Self.resumed(at: 1_000)
        let a = s.inboxEnds(at: 40)
        if case .close(.invalidCursor, let why)? = a.first { #expect(why.contains("1000") && why.contains("40")) } else { Issue.record("\(a)") }
        #expect(s.state == .closed)
        #expect(s.page([], complete: true).isEmpty, "nothing after the close")
        // At the end exactly, or below it: fine.
        var t = Self.resumed(at: 40)
        #expect(t.inboxEnds(at: 40).isEmpty)
        _ = t.page([], complete: true)
        #expect(t.state == .live(user: 7))
        #expect(t.inboxEnds(at: 10).isEmpty, "only while catching up")
    }

    @Test func aSlowClientIsClosedToResumeNotBuffered() {
        var s = Self.resumed(at: 0, limits: Session.Limits(queueCountMax: 3))
        _ = s.page([], complete: true)
        #expect(Self.pushed(s.live([Self.ev(1), Self.ev(2)])) == [1, 2])
        s.written(1, nowMillis: 3)
        #expect(Self.pushed(s.live([Self.ev(3)])) == [3])
        let a = s.live([Self.ev(4), Self.ev(5)])
        if case .close(.resume, _)? = a.first {} else { Issue.record("past the queue limit: close with resume, got \(a)") }
        #expect(s.state == .closed)
    }

    /// A client that stops reading: its socket stops taking pushed events; after the stall limit the
    /// session closes with resume, while a session with nothing to write is never closed for it.
    @Test func aStalledSocketClosesWithResume() {
        var s = Self.resumed(at: 0, limits: Session.Limits(writeStallMillisMax: 5_000))
        _ = s.page([], complete: true)
        #expect(s.tick(nowMillis: 60_000).isEmpty, "nothing to write: no stall however long")
        #expect(Self.pushed(s.live([Self.ev(1), Self.ev(2)])) == [1, 2])
        _ = s.received(.ping, nowMillis: 61_000)
        #expect(s.tick(nowMillis: 64_000).isEmpty, "unwritten for 4 s")
        s.written(1, nowMillis: 64_500)
        #expect(s.tick(nowMillis: 69_000).isEmpty, "progress 4.5 s ago")
        _ = s.received(.ping, nowMillis: 69_000)
        let a = s.tick(nowMillis: 69_600)
        if case .close(.resume, _)? = a.first {} else { Issue.record("no write for 5.1 s with events queued: close with resume, got \(a)") }
    }

    /// A long catch-up goes at the socket's pace: a page is read only when it fits in the queue beside
    /// what is not written yet, so a client that reads keeps up however far behind it starts.
    @Test func catchUpWaitsForTheSocketInsteadOfOverflowing() {
        var s = Self.resumed(at: 0, limits: Session.Limits(queueCountMax: 16, pageCountMax: 100))
        var next: UInt64 = 1
        func page(_ n: Int) -> [Session.Event] {
            defer { next += UInt64(n) }
            return (0..<UInt64(n)).map { Self.ev(next + $0) }
        }
        // Pages are at most half the queue (8 events).
        var a = s.page(page(8), complete: false)
        #expect(Self.pushed(a) == Array(1...8))
        #expect(a.contains(.readInbox(user: 7, fromSeq: 9, limit: 8)), "8 unwritten + 8: the next page fits")
        a = s.page(page(8), complete: false)
        #expect(Self.pushed(a) == Array(9...16))
        #expect(!a.contains { if case .readInbox = $0 { true } else { false } }, "16 unwritten: wait for the socket")
        #expect(s.state == .catchingUp(user: 7, reading: false))
        #expect(s.written(4, nowMillis: 10).isEmpty, "12 unwritten: a page does not fit yet")
        #expect(s.written(4, nowMillis: 11) == [.readInbox(user: 7, fromSeq: 17, limit: 8)])
        a = s.page(page(3), complete: true)
        #expect(Self.pushed(a) == [17, 18, 19])
        #expect(a.contains(.reply(.ready(cursor: 19))))
        #expect(s.state == .live(user: 7))
    }

    /// Live events held during a catch-up can leave less room than a page: with nothing unwritten the
    /// session reads what fits (never waits for writes that will not come), and closes when nothing fits.
    @Test func heldEventsShrinkThePageInsteadOfStallingTheCatchUp() {
        var s = Self.resumed(at: 0, limits: Session.Limits(queueCountMax: 16, pageCountMax: 100))
        // 10 live events far ahead (seq 100...109) arrive during the first read.
        _ = s.live((100..<110).map { Self.ev($0) })
        let a = s.page([Self.ev(1)], complete: false)
        #expect(Self.pushed(a) == [1])
        #expect(!a.contains { if case .readInbox = $0 { true } else { false } }, "1 unwritten: wait for it")
        #expect(s.written(1, nowMillis: 5) == [.readInbox(user: 7, fromSeq: 2, limit: 6)], "16 - 10 held = 6")
        var t = Self.resumed(at: 0, limits: Session.Limits(queueCountMax: 16, pageCountMax: 100))
        _ = t.live((100..<116).map { Self.ev($0) })
        let b = t.page([], complete: false)
        if case .close(.resume, _)? = b.last {} else { Issue.record("no room at all: close with resume, got \(b)") }
    }

    /// Answers count like events: a client that pings without reading is closed at the queue limit.
    @Test func answersCountAgainstTheQueue() {
        var s = Self.resumed(at: 0, limits: Session.Limits(queueCountMax: 16))
        _ = s.page([], complete: true)
        for _ in 0..<15 { #expect(s.queued(1).isEmpty) }
        s.written(2, nowMillis: 1)
        #expect(s.queued(2).isEmpty)
        #expect(s.queued(1).isEmpty, "16: at the limit")
        if case .close(.resume, _)? = s.queued(1).first {} else { Issue.record("past the limit: close") }
    }

    @Test func acksAndIdleness() {
        var s = Self.resumed(at: 2)
        _ = s.page([Self.ev(3)], complete: true)
        #expect(s.received(.ack(cursor: 3), nowMillis: 10) == [.acknowledged(user: 7, cursor: 3)])
        #expect(s.acked == 3)
        #expect(s.received(.ack(cursor: 3), nowMillis: 10).isEmpty, "the same cursor again: nothing new to record")
        #expect(s.received(.ack(cursor: 1), nowMillis: 10).isEmpty, "a lower cursor: nothing new")
        if case .close(.protocolError, _)? = s.received(.ack(cursor: 4), nowMillis: 11).first {} else { Issue.record("ack past what was sent") }
        var t = Self.resumed(at: 0)
        #expect(t.received(.ping, nowMillis: 50_000) == [.reply(.pong)])
        #expect(t.tick(nowMillis: 100_000).isEmpty, "heard 50 s ago")
        if case .close(.idle, _)? = t.tick(nowMillis: 140_001).first {} else { Issue.record("idle past 90 s closes") }
    }

    /// Any interleaving of pages and live deliveries, with repeats and overlaps, pushes 1...n exactly once,
    /// in order (the resume guarantee: no gap, no duplicate).
    @Test(arguments: 0..<300) func everyInterleavingDeliversEachEventOnceInOrder(seed: UInt64) {
        var rng = SplitMix(seed: seed)
        let n = 1 + Int(rng.next() % 60)
        let cursor = rng.next() % 5
        var s = Self.resumed(at: cursor, limits: Session.Limits(queueCountMax: 10_000, pageCountMax: 1 + Int(rng.next() % 8)))
        // The subscription starts somewhere: events from `liveFrom` on arrive live (in order, maybe
        // repeated); the ones before only through pages.
        let liveFrom = cursor + 1 + rng.next() % UInt64(n + 1)
        var nextLive = liveFrom
        var readFrom: UInt64? = cursor + 1
        var pageLimit = s.limits.pageCountMax
        var out: [UInt64] = []
        var steps = 0
        while steps < 10_000, s.state != .closed, !(s.state == .live(user: 7) && s.delivered == cursor + UInt64(n) && readFrom == nil) {
            steps += 1
            if rng.next() % 2 == 0, nextLive <= cursor + UInt64(n) {
                let k = 1 + rng.next() % 3
                let batch = (nextLive..<min(nextLive + k, cursor + UInt64(n) + 1)).map { Self.ev($0) }
                // Sometimes a repeat of the previous live event.
                let repeated = rng.next() % 5 == 0 && nextLive > liveFrom ? [Self.ev(nextLive - 1)] : []
                nextLive += UInt64(batch.count)
                let a = s.live(repeated + batch)
                out += Self.pushed(a)
                for case .readInbox(_, let from, let limit) in a { readFrom = from; pageLimit = limit }
            } else if let from = readFrom {
                // A page holds what is committed by now: everything below the live point, plus live
                // events already arrived.
                let top = max(liveFrom - 1, nextLive - 1)
                let events = from > top ? [] : (from...min(top, from + UInt64(pageLimit) - 1)).map { Self.ev($0) }
                let complete = events.isEmpty || events.last!.seq == top
                readFrom = nil
                let a = s.page(events, complete: complete)
                out += Self.pushed(a)
                for case .readInbox(_, let f, let limit) in a { readFrom = f; pageLimit = limit }
            }
        }
        #expect(out == Array((cursor + 1)...(cursor + UInt64(n))), "seed \(seed): pushed \(out)")
    }
}

/// A small deterministic generator for the property test.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed &+ 0x9E37_79B9_7F4A_7C15 }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
