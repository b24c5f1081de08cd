import Logging
import NIOCore
import NIOPosix
import WeftCore

/// This node's outbound connection to one peer: dialing, reconnect back-off, the bounded send queue and
/// coalesced flushes.
///
/// Thread-safety: `send` may be called from any thread; every mutable field lives in `state` behind a
/// lock. Channel IO happens on the link's event loop (the dialed channel is bound to it).
final class PeerLink: Sendable {
    let peer: NodeID
    let address: PeerAddress
    let eventLoop: any EventLoop
    private let core: TransportCore
    private let state: Locked<State>

    struct QueuedFrame: Sendable {
        var shard: UInt64
        var payload: [UInt8]
    }

    struct State: Sendable {
        enum Phase: Sendable {
            /// Before `start()`.
            case idle
            /// A connect is in flight.
            case connecting
            /// TCP is up, the handshake is running.
            case handshaking(any Channel)
            /// Authenticated: Data frames may be written.
            case connected(any Channel)
            /// Waiting to redial.
            case backingOff(Scheduled<Void>)
            /// After `stop()`; terminal.
            case stopped
        }

        var phase: Phase = .idle
        /// Frames accepted by `send` and not yet written. Only non-empty while `.connected`.
        /// Invariant: count <= queueFramesMax.
        var queue = CircularBuffer<QueuedFrame>(initialCapacity: 16)
        /// A flush task is queued on the event loop; later sends ride along with it.
        var flushScheduled = false
        /// Mirrors the connected channel's writability; while false, frames wait in `queue`.
        var writable = true
        /// Consecutive failed dials (or lost connections) since the last successful authentication.
        var failedAttempts = 0
        var framesSent: UInt64 = 0
        /// Link probes (`PeerTransportConfiguration.probeInterval`): the repeating send while connected,
        /// the last token sent, when the peer last answered one on this connection (nil: not yet), when
        /// a frame of any kind last came from it (on its own connection), and whether it is suspect now.
        var probeTask: RepeatedTask?
        var probeToken: UInt64 = 0
        var answeredAt: NIODeadline?
        var heardAt: NIODeadline?
        var suspect = false
        /// The peer has answered a probe on some connection of this link (it runs a version with probes):
        /// from then on a connection that gets no answer at all turns suspect as well, counted from when
        /// it came up (a peer whose own link to this node never came up since a restart is as cut off).
        var answersProbes = false
        var connectedAt = NIODeadline.distantPast
        var framesDroppedDisconnected: UInt64 = 0
        var framesDroppedQueueFull: UInt64 = 0
        var reconnects: UInt64 = 0
    }

    init(peer: NodeID, address: PeerAddress, eventLoop: any EventLoop, core: TransportCore) {
        self.peer = peer
        self.address = address
        self.eventLoop = eventLoop
        self.core = core
        self.state = Locked(State())
    }

    // MARK: Sending

    /// Queues a Data frame, or drops it (counted) when not connected or when the queue is full (dropping
    /// the oldest). Never blocks beyond the lock.
    func send(shard: UInt64, payload: [UInt8]) {
        let flushChannel: (any Channel)? = self.state.withLock { state in
            // Link probes are left out of every frame counter.
            guard case .connected(let channel) = state.phase else {
                if shard != PeerWire.probeShard { state.framesDroppedDisconnected += 1 }
                return nil
            }
            if state.queue.count >= self.core.configuration.queueFramesMax {
                // A full queue drops a probe rather than the oldest data frame for it.
                if shard == PeerWire.probeShard { return nil }
                if state.queue.removeFirst().shard != PeerWire.probeShard { state.framesDroppedQueueFull += 1 }
            }
            state.queue.append(QueuedFrame(shard: shard, payload: payload))
            guard !state.flushScheduled, state.writable else { return nil }
            state.flushScheduled = true
            return channel
        }
        if let flushChannel {
            flushChannel.eventLoop.execute { self.flush(channel: flushChannel) }
        }
    }

    /// Writes every queued frame with one flush. Runs on the channel's event loop.
    private func flush(channel: any Channel) {
        let frames: CircularBuffer<QueuedFrame>? = self.state.withLock { state in
            state.flushScheduled = false
            guard case .connected(let current) = state.phase, current === channel, state.writable,
                !state.queue.isEmpty
            else { return nil }
            let frames = state.queue
            state.queue = CircularBuffer(initialCapacity: 16)
            state.framesSent += Self.dataFrames(frames)
            return frames
        }
        guard let frames else { return }
        let chunkBytes = self.core.configuration.writeChunkBytes
        var buffer = channel.allocator.buffer(capacity: 0)
        for frame in frames {
            if buffer.writerIndex == 0 {
                // Size the chunk once; `encodeData` grows it if a single frame is larger.
                buffer.reserveCapacity(min(chunkBytes, Self.encodedBytes(frames)))
            }
            PeerFrame.encodeData(shard: frame.shard, payload: frame.payload, into: &buffer)
            if buffer.readableBytes >= chunkBytes {
                channel.write(buffer, promise: nil)
                buffer = channel.allocator.buffer(capacity: 0)
            }
        }
        if buffer.readableBytes > 0 { channel.write(buffer, promise: nil) }
        channel.flush()
    }

    /// The frames of `frames` that are not link probes.
    private static func dataFrames(_ frames: CircularBuffer<QueuedFrame>) -> UInt64 {
        var count: UInt64 = 0
        for frame in frames where frame.shard != PeerWire.probeShard { count += 1 }
        return count
    }

    private static func encodedBytes(_ frames: CircularBuffer<QueuedFrame>) -> Int {
        var total = 0
        for frame in frames { total += PeerWire.headerBytes + PeerWire.dataFixedBytes + frame.payload.count }
        return total
    }

    /// Called by the connection handler on the event loop.
    func writabilityChanged(channel: any Channel, writable: Bool) {
        let flushNow = self.state.withLock { state -> Bool in
            guard case .connected(let current) = state.phase, current === channel else { return false }
            state.writable = writable
            guard writable, !state.queue.isEmpty, !state.flushScheduled else { return false }
            state.flushScheduled = true
            return true
        }
        if flushNow { self.flush(channel: channel) }
    }

    var isConnected: Bool {
        self.state.withLock { state in
            if case .connected = state.phase { return true }
            return false
        }
    }

    var isSuspect: Bool {
        self.state.withLock { state in
            if case .connected = state.phase { return state.suspect }
            return false
        }
    }

    // MARK: Link probes

    /// Probes sent on a connection without any answer before the link probes it only every
    /// `unansweredEvery`-th tick (a peer of a version without probes logs each one it drops; one whose own
    /// link to this node came up late still gets probed, and answers).
    static let unansweredProbesMax: UInt64 = 50
    static let unansweredEvery: UInt64 = 25

    /// Sends the next probe and decides whether the peer has gone quiet: it answers probes (it has on
    /// some connection of this link), and since its last answer on this connection (or since the
    /// connection came up) either nothing at all has come from it for `suspectAfter`, or
    /// frames but no answer for three times that (frames still coming show it alive and its node busy: a
    /// slow answer behind a long queue is not a cut, up to a point; past it, this node's frames to it are
    /// likely lost one way). Runs every `probeInterval` on the event loop while `channel` is the
    /// connected one.
    private func probe(channel: any Channel) {
        let suspectAfter = self.core.configuration.suspectAfter
        let (token, turned) = self.state.withLock { state -> (UInt64?, Bool) in
            guard case .connected(let current) = state.phase, current === channel else { return (nil, false) }
            state.probeToken &+= 1
            guard state.answersProbes else {
                let rare = state.probeToken > Self.unansweredProbesMax && state.probeToken % Self.unansweredEvery != 0
                return (rare ? nil : state.probeToken, false)
            }
            let answered = state.answeredAt ?? state.connectedAt
            let now = NIODeadline.now()
            let silent = now - max(answered, state.heardAt ?? answered) >= suspectAfter
            let unanswered = now - answered >= .nanoseconds(3 * suspectAfter.nanoseconds)
            guard !state.suspect, silent || unanswered else { return (state.probeToken, false) }
            state.suspect = true
            return (state.probeToken, true)
        }
        guard let token else { return }
        var payload = [PeerWire.probePing]
        withUnsafeBytes(of: token.littleEndian) { payload.append(contentsOf: $0) }
        self.send(shard: PeerWire.probeShard, payload: payload)
        if turned {
            self.core.logger.warning(
                "peer stopped answering link probes; requests go through another node while it stays quiet",
                metadata: ["peer-node": "\(self.peer)", "quiet-ms": "\(suspectAfter.nanoseconds / 1_000_000)"])
            self.core.onSuspect(self.peer)
        }
    }

    /// Frames came from the peer (on its own connection to this node): it is alive, if perhaps slow to
    /// answer a probe.
    func heard() {
        self.state.withLock { state in
            if case .connected = state.phase { state.heardAt = .now() }
        }
    }

    /// The peer answered a probe (on its own connection to this node).
    func probeAnswered() {
        let cleared = self.state.withLock { state -> Bool in
            guard case .connected = state.phase else { return false }
            state.answeredAt = .now()
            state.answersProbes = true
            defer { state.suspect = false }
            return state.suspect
        }
        if cleared { self.core.logger.info("peer answers link probes again", metadata: ["peer-node": "\(self.peer)"]) }
    }

    struct Counters {
        var framesSent: UInt64
        var framesDroppedDisconnected: UInt64
        var framesDroppedQueueFull: UInt64
        var reconnects: UInt64
    }

    var counters: Counters {
        self.state.withLock { state in
            Counters(
                framesSent: state.framesSent, framesDroppedDisconnected: state.framesDroppedDisconnected,
                framesDroppedQueueFull: state.framesDroppedQueueFull, reconnects: state.reconnects)
        }
    }

    // MARK: Connection lifecycle

    /// Starts dialing. Idempotent.
    func start() { self.dial() }

    private func dial() {
        let proceed = self.state.withLock { state -> Bool in
            switch state.phase {
            case .idle, .backingOff:
                state.phase = .connecting
                return true
            case .connecting, .handshaking, .connected, .stopped:
                return false
            }
        }
        guard proceed else { return }
        guard let bootstrap = ClientBootstrap(validatingGroup: self.eventLoop) else {
            // start() already validated the group with ServerBootstrap; this is unreachable in practice.
            self.core.logger.error("event loop group is not usable by NIOPosix; not dialing", metadata: ["peer-node": "\(self.peer)"])
            return
        }
        let core = self.core
        let address = self.address
        bootstrap
            .connectTimeout(core.configuration.connectTimeout)
            .channelOption(.socketOption(.so_keepalive), value: 1)
            .channelOptions(DeadLink.options(core.configuration.deadLinkTimeout))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let decoder = PeerFrameDecoder(frameBytesMax: core.configuration.frameBytesMax)
                    let handler = try PeerConnectionHandler(
                        core: core, side: .dialer(self), decoder: decoder, remote: "\(address)")
                    try channel.pipeline.syncOperations.addHandlers(ByteToMessageHandler(decoder), handler)
                }
            }
            .connect(host: address.host, port: address.port)
            .whenComplete { result in
                switch result {
                case .success(let channel):
                    self.connected(channel: channel)
                case .failure(let error):
                    self.core.logger.debug(
                        "dial failed", metadata: ["peer-node": "\(self.peer)", "peer-remote": "\(address)", "error": "\(error)"])
                    self.lost(channel: nil)
                }
            }
    }

    /// TCP connect succeeded; the handshake may already be under way (or even done).
    private func connected(channel: any Channel) {
        let keep = self.state.withLock { state -> Bool in
            switch state.phase {
            case .connecting:
                state.phase = .handshaking(channel)
                return true
            case .handshaking(let current), .connected(let current):
                return current === channel
            case .idle, .backingOff, .stopped:
                return false
            }
        }
        guard keep else {
            channel.close(promise: nil)
            return
        }
        channel.closeFuture.whenComplete { _ in self.lost(channel: channel) }
    }

    /// The handshake completed on `channel`. Called on the channel's event loop.
    func authenticated(channel: any Channel) {
        let keep = self.state.withLock { state -> Bool in
            switch state.phase {
            case .connecting:
                break
            case .handshaking(let current) where current === channel:
                break
            default:
                return false
            }
            state.phase = .connected(channel)
            state.writable = channel.isWritable
            state.failedAttempts = 0
            state.answeredAt = nil
            state.heardAt = nil
            state.connectedAt = .now()
            state.probeToken = 0
            state.suspect = false
            state.probeTask?.cancel()
            state.probeTask = nil
            let interval = self.core.configuration.probeInterval
            if interval.nanoseconds > 0 {
                state.probeTask = channel.eventLoop.scheduleRepeatedTask(initialDelay: .zero, delay: interval) { _ in
                    self.probe(channel: channel)
                }
            }
            return true
        }
        if !keep { channel.close(promise: nil) }
    }

    /// A dial failed (`channel` nil) or the channel closed: drop what is queued and schedule a redial. A
    /// connection lost while up is told to `onSuspect` as a link turning suspect is: what was sent on it
    /// may never be answered.
    private func lost(channel: (any Channel)?) {
        let wasUp = self.state.withLock { state -> Bool in
            var wasUp = false
            switch state.phase {
            case .connecting:
                break
            case .handshaking(let current) where channel.map({ $0 === current }) ?? false:
                break
            case .connected(let current) where channel.map({ $0 === current }) ?? false:
                wasUp = true
            default:
                return false
            }
            state.framesDroppedDisconnected += Self.dataFrames(state.queue)
            state.queue.removeAll(keepingCapacity: false)
            state.flushScheduled = false
            state.probeTask?.cancel()
            state.probeTask = nil
            state.suspect = false
            let delay = self.backoffDelay(failedAttempts: state.failedAttempts)
            state.failedAttempts += 1
            state.reconnects += 1
            let task = self.eventLoop.scheduleTask(in: delay) { self.dial() }
            state.phase = .backingOff(task)
            return wasUp
        }
        if wasUp { self.core.onSuspect(self.peer) }
    }

    /// 50 ms doubling to the 2 s cap (configurable), then a uniform jitter down to half, so peers that
    /// lost each other at the same moment do not redial in lockstep.
    private func backoffDelay(failedAttempts: Int) -> TimeAmount {
        let initial = self.core.configuration.reconnectDelayInitial.nanoseconds
        let cap = self.core.configuration.reconnectDelayMax.nanoseconds
        let exponent = min(failedAttempts, 30)
        let (scaled, overflow) = initial.multipliedReportingOverflow(by: Int64(1) << Int64(exponent))
        let base = max(1, overflow ? cap : min(scaled, cap))
        return .nanoseconds(Int64.random(in: (base / 2)...base))
    }

    /// Stops for good: cancels a pending redial, closes the connection, drops the queue (counted).
    /// Returns the channel's close future, if there was a channel.
    func stop() -> EventLoopFuture<Void>? {
        let (task, channel) = self.state.withLock { state -> (Scheduled<Void>?, (any Channel)?) in
            let previous = state.phase
            state.phase = .stopped
            state.probeTask?.cancel()
            state.probeTask = nil
            state.framesDroppedDisconnected += Self.dataFrames(state.queue)
            state.queue.removeAll(keepingCapacity: false)
            switch previous {
            case .backingOff(let task): return (task, nil)
            case .handshaking(let channel), .connected(let channel): return (nil, channel)
            case .idle, .connecting, .stopped: return (nil, nil)
            }
        }
        task?.cancel()
        guard let channel else { return nil }
        channel.close(promise: nil)
        return channel.closeFuture
    }
}
