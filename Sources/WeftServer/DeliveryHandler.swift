import Delivery
import Foundation
import Messaging
import NIOConcurrencyHelpers
import NIOCore
import NIOWebSocket
import WeftCore

/// One device's session on its connection's event loop (Docs/delivery.md, "Sessions without tasks"):
/// WebSocket frames, hub events, ticks and the answers of asynchronous work all arrive here, on the loop,
/// and go into `Delivery.Session`; its actions come out as frames.
///
/// An idle session owns no Swift task: only this handler, its `Session` and the channel. Work that
/// must wait (checking the token, reading an inbox page, rendering events whose bodies are reads, a send's
/// commit, the pair check of typing) runs in a short-lived task whose answer comes back with
/// `eventLoop.execute`. One such piece of work at a time per session (`busy`): inputs that arrive
/// meanwhile wait in `pending`, in order, so the session sees its inputs in the order they came. Sends are
/// the exception (a commit takes milliseconds; pushes go on meanwhile): each answer comes back as an
/// input of its own.
final class DeliveryHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = WebSocketFrame
    typealias OutboundOut = WebSocketFrame
    typealias Input = DeliverySocket.Input

    /// What asynchronous work answers.
    enum Done: Sendable {
        case auth(token: String, user: UInt64?, failure: String?, unavailable: Bool)
        /// `floor`: the inbox's lowest seq still held (retention dropped the ones below).
        /// `head`: the inbox's last seq, when the read asked past it.
        case page([Session.Event]?, complete: Bool, floor: StreamSeq, head: StreamSeq?)
        case rendered([Session.Event])
        case typingChecked(to: UInt64, ok: Bool, at: Int64)
    }

    let api: MessagingAPI
    let tier: DeliveryTier
    let loop: any EventLoop
    var context: ChannelHandlerContext?
    var session: Session
    var registration: (user: UInt64, id: UInt64)?
    var tickID: UInt64?
    var bearer: String?
    var typingSent: Int64 = 0
    var sendsInFlight = 0
    var typingAllowed: [UInt64: (ok: Bool, at: Int64)] = [:]
    /// Asynchronous work is under way; `rest` are the session's actions after it.
    var busy = false
    var rest: [Session.Action] = []
    var pending: [Input] = []
    /// The close frame is written (or the connection is gone): nothing else is.
    var closing = false
    var gone = false
    /// Closes the connection at the end of the close grace.
    var closer: Scheduled<Void>?

    init(api: MessagingAPI, tier: DeliveryTier, loop: any EventLoop) {
        self.api = api
        self.tier = tier
        self.loop = loop
        session = Session(limits: tier.limits, nowMillis: Self.now())
    }

    static func now() -> Int64 { Int64(Date().timeIntervalSince1970 * 1000) }

    var bound: NIOLoopBound<DeliveryHandler> { NIOLoopBound(self, eventLoop: loop) }

    // MARK: Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        let me = bound
        tickID = tier.ticker.register(on: loop) { me.value.input(.tick) }
    }

    /// Frames (all but a close) the session may still send now: a token bucket refilled at
    /// `framesPerSecond` up to `frameBurst`, plus one token per event pushed (a client may ack every event
    /// it gets, however fast a catch-up goes; at most `pendingMax` of those kept), and when it was last
    /// refilled (monotonic).
    var frameTokens = Double(DeliverySocket.frameBurst)
    var frameTokensAt = NIODeadline.now()

    /// Takes one frame's token; false when the session is over its rate.
    func takeFrameToken() -> Bool {
        let now = NIODeadline.now()
        let refill = Double((now - frameTokensAt).nanoseconds) * Double(DeliverySocket.framesPerSecond) / 1e9
        if frameTokens < Double(DeliverySocket.frameBurst) { frameTokens = min(Double(DeliverySocket.frameBurst), frameTokens + max(0, refill)) }
        frameTokensAt = now
        guard frameTokens >= 1 else { return false }
        frameTokens -= 1
        return true
    }

    /// `n` events pushed: as many more frames allowed (their acks).
    func earnFrameTokens(_ n: Int) {
        frameTokens = min(Double(DeliverySocket.frameBurst + DeliverySocket.pendingMax), frameTokens + Double(n))
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        // Every frame but a close takes a token: data frames, and protocol pings and pongs (a ping costs
        // the server a pong; before stop 23 pings were limited only by the queue of pongs owed).
        if frame.opcode != .connectionClose, !closing, !takeFrameToken() {
            return closeSession(1008, "more than \(DeliverySocket.framesPerSecond) frames a second (\(DeliverySocket.frameBurst) at once)")
        }
        switch frame.opcode {
        case .text:
            // One unfragmented frame bypasses the aggregator's size limit.
            guard frame.length <= DeliverySocket.frameBytesMax else {
                return closeSession(1009, "a frame is at most \(DeliverySocket.frameBytesMax) bytes")
            }
            let text = String(buffer: frame.unmaskedData)
            input(DeliverySocket.parse(text))
        case .binary:
            input(.malformed("frames are JSON text"))
        case .ping:
            // A protocol ping keeps the session alive like a `ping` frame; its pong counts against the
            // queue like any answer (a client that pings without reading is closed, not buffered for).
            _ = session.received(.ping, nowMillis: Self.now())
            write(WebSocketFrame(fin: true, opcode: .pong, data: frame.unmaskedData))
        case .connectionClose:
            // The client closes: answer its close at once, then the connection goes.
            if !closing {
                closing = true
                var data = context.channel.allocator.buffer(capacity: 2)
                data.write(webSocketErrorCode: .normalClosure)
                context.writeAndFlush(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .connectionClose, data: data)), promise: nil)
            }
            context.close(promise: nil)
        default:
            break
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if case .accumulatedFrameSizeIsTooLarge? = error as? NIOWebSocketFrameAggregator.Error {
            closeSession(1009, "a frame is at most \(DeliverySocket.frameBytesMax) bytes")
        } else if error is NIOWebSocketFrameAggregator.Error {
            closeSession(Session.Close.protocolError.rawValue, "fragments out of order")
        } else {
            context.close(promise: nil)
        }
    }

    /// The HTTP server is shutting down (SIGTERM): every session, whatever its state, is told to resume
    /// elsewhere, and the server waits for its connection to close (at most the close grace).
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is ChannelShouldQuiesceEvent {
            perform(session.close(.resume, "the node is shutting down: resume from your cursor on another node"))
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        gone = true
        closing = true
        closer?.cancel()
        closer = nil
        if let tickID { tier.ticker.unregister(tickID, on: loop) }
        tickID = nil
        if let (u, id) = registration, tier.hub.unregister(user: u, id: id) { tier.announce([u], on: false) }
        registration = nil
        pending = []
        self.context = nil
        context.fireChannelInactive()
    }

    // MARK: Inputs

    /// Everything that happens to the session comes through here, on the loop.
    func input(_ i: Input) {
        guard !gone, !closing else { return }
        if case .written(let n) = i {
            // Writes are counted at once, whatever the session is waiting for; what that asks for (the
            // next page of a catch-up) waits until the work under way is done.
            let next = session.written(n, nowMillis: Self.now())
            if busy { rest += next } else { perform(next) }
            return
        }
        if busy {
            pending.append(i)
            if pending.count > DeliverySocket.pendingMax {
                pending = []
                closeSession(Session.Close.resume.rawValue, "the session fell behind: resume from your cursor")
            }
            return
        }
        handle(i)
    }

    func handle(_ i: Input) {
        guard !closing else { return }
        let now = Self.now()
        switch i {
        case .frame(let f): perform(session.received(f, nowMillis: now))
        case .malformed(let why): perform(session.close(.protocolError, why))
        case .hub(.records(let records)):
            guard let u = session.user else { return }
            // Only what the session has not pushed is worth rendering (message bodies are reads).
            let fresh = records.filter { $0.seq > session.delivered }
            guard !fresh.isEmpty else { return }
            // Rendered here when nothing needs a read (a group message whose body this node has);
            // else in a task.
            if let ready = api.cachedEvents(fresh, me: u) { return perform(session.live(DeliverySocket.frames(ready))) }
            let api = self.api
            suspend { .rendered(await DeliverySocket.events(fresh, api: api, me: u)) }
        case .hub(.typing(let from)):
            guard let u = session.user, case .live = session.state else { return }
            write(#"{"type":"typing","from":\#(from),"conversation_id":"\#(Ids.conversationID(u, from))"}"#)
        case .hub(.head(let seq)):
            perform(session.headReached(seq))
        case .hub(.shutdown):
            perform(session.close(.resume, "the node is shutting down: resume from your cursor on another node"))
        case .written: break
        case .tick: perform(session.tick(nowMillis: now))
        case .write(let text):
            sendsInFlight -= 1
            write(text)
        case .typing(let to):
            guard let u = session.user, case .live = session.state else {
                return perform(session.close(.protocolError, "typing after auth and resume"))
            }
            _ = session.received(.ping, nowMillis: now)
            guard now - typingSent >= DeliverySocket.typingEveryMillis, to != u, Ids.isUserID(to) else { return }
            typingSent = now
            // Only to a contact who has not blocked either way (checked once a minute per peer).
            if let known = typingAllowed[to], now - known.at < DeliverySocket.typingCheckMillis {
                if known.ok { tier.sendTyping(from: u, to: to) }
                return
            }
            let node = api.node
            suspend {
                if case .success(let a?) = await node.ask(Ids.pairShard(u, to, shards: node.config.shards), .pair(u, to), at: .local),
                    let p = a.pair, p.relation == .contacts, !p.isBlocked()
                {
                    return .typingChecked(to: to, ok: true, at: now)
                }
                return .typingChecked(to: to, ok: false, at: now)
            }
        case .send(let requestID, let frame, let refused):
            guard session.user != nil, let token = bearer else {
                return perform(session.close(.protocolError, "send after auth and resume"))
            }
            guard sendsInFlight < DeliverySocket.sendsInFlightMax else {
                return write(
                    #"{"type":"error","request_id":\#(DeliverySocket.jsonString(requestID)),"code":"too_many_requests","message":"at most \#(DeliverySocket.sendsInFlightMax) sends in flight per session"}"#
                )
            }
            // Its own task: a send waits for a commit, pushes go on meanwhile; the answer comes back as an input.
            sendsInFlight += 1
            let (api, me) = (self.api, bound)
            Task {
                let answer = await DeliverySocket.sendAnswer(requestID: requestID, frame: frame, refused: refused, token: token, api: api)
                me.eventLoop.execute { me.value.input(.write(answer)) }
            }
        }
    }

    /// Runs `work` in a task; the session waits (inputs queue up) until its answer is back on the loop.
    func suspend(_ work: @escaping @Sendable () async -> Done) {
        busy = true
        let me = bound
        Task {
            let done = await work()
            me.eventLoop.execute { me.value.resume(done) }
        }
    }

    func resume(_ done: Done) {
        guard !gone, !closing else { return }
        busy = false
        var actions: [Session.Action]
        switch done {
        case .auth(let token, let user, let failure, let unavailable):
            if let user {
                bearer = token
                actions = session.authenticated(user: user)
            } else if unavailable {
                // The token could not be checked now (its user's shard is unreachable): not a reason to
                // log the user out; the client tries again.
                actions = session.close(.resume, "the token cannot be checked now: reconnect and resume")
            } else {
                actions = session.authFailed(failure ?? "unauthorized")
            }
        case .page(let events, let complete, let floor, let head):
            if let events {
                // Below the floor there is nothing to wait for: say so, then go on from there. Past the
                // head, nothing to wait for either: the cursor was never this inbox's.
                actions = floor > 1 ? session.dropped(through: floor - 1) : []
                if let head { actions += session.inboxEnds(at: head) }
                actions += session.page(events, complete: complete)
            } else {
                actions = session.close(.resume, "the inbox cannot be read now: resume from your cursor")
            }
        case .rendered(let events):
            actions = session.live(events)
        case .typingChecked(let to, let ok, let at):
            if typingAllowed.count > 1024 { typingAllowed = [:] }
            typingAllowed[to] = (ok, at)
            if ok, let u = session.user { tier.sendTyping(from: u, to: to) }
            actions = []
        }
        let after = rest
        rest = []
        perform(actions + after)
        // What waited, in order, until the next piece of asynchronous work.
        while !busy, !pending.isEmpty, !gone {
            let next = pending.removeFirst()
            handle(next)
        }
    }

    // MARK: Actions

    func perform(_ actions: [Session.Action]) {
        var k = 0
        while k < actions.count {
            let a = actions[k]
            k += 1
            switch a {
            case .authenticate(let token):
                rest = Array(actions[k...])
                let api = self.api
                return suspend {
                    do {
                        let account = try await api.account(bearer: token)
                        return .auth(token: token, user: account.id, failure: nil, unavailable: false)
                    } catch let e as APIError where e.status == .unauthorized {
                        return .auth(token: token, user: nil, failure: e.message, unavailable: false)
                    } catch {
                        return .auth(token: token, user: nil, failure: nil, unavailable: true)
                    }
                }
            case .subscribe(let u):
                let me = bound
                // Hand-offs to this loop are counted: a loop too busy to run them for long closes the
                // session (resume) instead of queueing without bound in NIO's task queue.
                let owed = HandoffBudget(max: DeliverySocket.pendingMax)
                let deliver: @Sendable (HubEvent) -> Void = { event in
                    switch owed.take() {
                    case .ok: me.eventLoop.execute {
                        owed.give()
                        me.value.input(.hub(event))
                    }
                    case .overdrawn: me.eventLoop.execute {
                        me.value.perform(me.value.session.close(.resume, "the node fell behind pushing to this session: resume from your cursor"))
                    }
                    case .closed: break
                    }
                }
                guard let (id, first) = tier.hub.register(user: u, deliver) else {
                    perform(session.close(.tooMany, "too many sessions for this user (\(InboxHub.sessionsPerUserMax)) or this node"))
                    return
                }
                registration = (u, id)
                if first { tier.announce([u], on: true) }
                // No replica of the home shard here: the shard's nodes forward the user's inbox records
                // (the directory lists this node once the announce above arrives; DeliveryTier).
            case .readInbox(let u, let from, let limit):
                rest = Array(actions[k...])
                let api = self.api
                return suspend {
                    let node = api.node
                    let r = await node.readAnywhere(
                        shard: Ids.homeShard(u, shards: node.config.shards), .stream(Ids.inbox(u), fromSeq: from, limit: limit), consistency: .linearizable)
                    guard case .success(let rr) = r else { return .page(nil, complete: false, floor: 0, head: nil) }
                    // A page of fewer records than asked is the inbox's end.
                    return .page(await DeliverySocket.events(rr.records, api: api, me: u), complete: rr.records.count < limit, floor: rr.floor, head: rr.head)
                }
            case .push(let events):
                // Every event counts (the session counts them all); records that are no event go empty.
                let bodies = events.filter { !$0.body.isEmpty }
                writeEvents(bodies)
                let skipped = events.count - bodies.count
                if skipped > 0 { perform(session.written(skipped, nowMillis: Self.now())) }
            case .reply(let reply):
                write(DeliverySocket.text(reply))
            case .acknowledged(let u, let cursor):
                tier.acks.note(user: u, cursor: cursor)
            case .close(let code, let why):
                closeSession(code.rawValue, why)
                return
            }
        }
    }

    // MARK: Writing

    /// Writes frames; `written` reports them once the socket took the last.
    func writeEvents(_ events: [Session.Event]) {
        guard let context, !closing, !events.isEmpty else { return }
        earnFrameTokens(events.count)
        for (k, e) in events.enumerated() {
            var buffer = context.channel.allocator.buffer(capacity: e.body.count)
            buffer.writeBytes(e.body)
            let frame = WebSocketFrame(fin: true, opcode: .text, data: buffer)
            if k == events.count - 1 {
                let promise = loop.makePromise(of: Void.self)
                let (me, n) = (bound, events.count)
                promise.futureResult.whenSuccess { me.value.input(.written(n)) }
                context.write(wrapOutboundOut(frame), promise: promise)
            } else {
                context.write(wrapOutboundOut(frame), promise: nil)
            }
        }
        context.flush()
    }

    /// Writes a frame that is no event; it counts against the session's queue like one. Counted before
    /// the write: a write the socket takes at once reports `written` from inside `writeAndFlush`.
    func write(_ text: String) {
        guard let context, !closing else { return }
        var buffer = context.channel.allocator.buffer(capacity: text.utf8.count)
        buffer.writeString(text)
        write(WebSocketFrame(fin: true, opcode: .text, data: buffer))
    }

    func write(_ frame: WebSocketFrame) {
        guard let context, !closing else { return }
        let counted = session.queued(1)
        guard !counted.contains(where: { if case .close = $0 { true } else { false } }) else { return perform(counted) }
        let promise = loop.makePromise(of: Void.self)
        let me = bound
        promise.futureResult.whenSuccess { me.value.input(.written(1)) }
        context.writeAndFlush(wrapOutboundOut(frame), promise: promise)
    }

    /// Writes the close frame; the connection goes when the client answers it, or after the grace.
    func closeSession(_ code: UInt16, _ why: String) {
        guard let context, !closing else { return }
        // The session is over whichever way it ended: work still under way changes nothing.
        _ = session.close(.resume, why)
        closing = true
        pending = []
        var data = context.channel.allocator.buffer(capacity: 2 + why.utf8.count)
        data.write(webSocketErrorCode: .init(codeNumber: Int(code)))
        // A close frame's payload is at most 125 bytes.
        data.writeBytes(Array(why.utf8.prefix(123)))
        context.writeAndFlush(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .connectionClose, data: data)), promise: nil)
        let channel = context.channel
        closer = channel.eventLoop.scheduleTask(in: DeliverySocket.closeGrace) { channel.close(promise: nil) }
    }
}

/// Hub events handed to a session's event loop and not yet run there. `take` before the hand-off,
/// `give` when it runs; past `max` the first overdraft says so (the session closes with "resume"), and
/// later ones are dropped (the session is closing; its client resumes from its cursor).
final class HandoffBudget: Sendable {
    enum Take: Equatable { case ok, overdrawn, closed }
    let max: Int
    let state = NIOLockedValueBox((owed: 0, overdrawn: false))

    init(max: Int) { self.max = max }

    func take() -> Take {
        state.withLockedValue { s in
            if s.overdrawn { return .closed }
            guard s.owed < max else {
                s.overdrawn = true
                return .overdrawn
            }
            s.owed += 1
            return .ok
        }
    }

    func give() { state.withLockedValue { $0.owed -= 1 } }

    var owed: Int { state.withLockedValue { $0.owed } }
}
