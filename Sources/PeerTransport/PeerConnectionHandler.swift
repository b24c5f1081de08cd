import Logging
import NIOCore
import WeftCore

/// Runs one connection's handshake and, on the listener side, delivers Data frames.
///
/// Sits after `ByteToMessageHandler(PeerFrameDecoder)`. It performs the `HandshakeAction`s returned by
/// `HandshakeStateMachine` and holds no protocol logic of its own. Confined to the channel's event loop.
final class PeerConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = PeerFrame
    typealias OutboundOut = ByteBuffer

    enum Side {
        /// Our outbound connection to a peer: only sends Data, reports its state to `link`.
        case dialer(PeerLink)
        /// A connection a peer dialed to us: only receives Data.
        case listener
    }

    private let core: TransportCore
    private let side: Side
    /// Shared with the `ByteToMessageHandler` in front of this handler (same event loop).
    private let decoder: PeerFrameDecoder
    private var machine: HandshakeStateMachine
    private var timeout: Scheduled<Void>?
    /// Set once the machine reports `.authenticated`; distinguishes auth failures from later protocol errors.
    private var peer: NodeID?
    /// Frames delivered since the last `channelReadComplete`, added to the shared counters in one batch.
    private var receivedPending = 0
    /// A Data frame (a probe included) came since the last `channelReadComplete`: the peer is heard.
    /// Told to the link at most every `heardEvery` (the link's lock is the one every send takes).
    private var heardPending = false
    private var heardPublished = NIODeadline.distantPast
    private static let heardEvery = TimeAmount.milliseconds(100)
    private var logger: Logger

    /// Throws if OpenSSL cannot produce a nonce; the channel initializer then fails and NIO closes the channel.
    init(core: TransportCore, side: Side, decoder: PeerFrameDecoder, remote: String) throws {
        self.core = core
        self.side = side
        self.decoder = decoder
        let nonce = try PeerCrypto.randomBytes(PeerWire.nonceBytes)
        var logger = core.logger
        logger[metadataKey: "peer-remote"] = "\(remote)"
        switch side {
        case .dialer(let link):
            logger[metadataKey: "peer-direction"] = "outbound"
            logger[metadataKey: "peer-node"] = "\(link.peer)"
            self.machine = .dialer(
                selfID: core.selfID, peer: link.peer, clusterName: core.clusterName, secret: core.secret,
                nonce: nonce)
        case .listener:
            logger[metadataKey: "peer-direction"] = "inbound"
            self.machine = .listener(
                selfID: core.selfID, knownPeers: core.knownPeers, clusterName: core.clusterName,
                secret: core.secret, nonce: nonce)
        }
        self.logger = logger
    }

    func channelActive(context: ChannelHandlerContext) {
        let loop = context.eventLoop.assumeIsolated()
        self.timeout = loop.scheduleTask(in: self.core.configuration.handshakeTimeout) {
            self.perform(self.machine.timedOut(), context: context)
        }
        self.perform(self.machine.start(), context: context)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.timeout?.cancel()
        self.timeout = nil
        self.publishReceived()
        if self.peer == nil, !self.machine.isFailed {
            self.logger.debug("peer connection closed before authentication", metadata: ["state": "\(self.machine.stateName)"])
        } else if let peer = self.peer {
            self.logger.info("peer connection closed", metadata: ["peer-node": "\(peer)"])
        }
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = self.unwrapInboundIn(data)
        self.perform(self.machine.receive(frame), context: context)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.publishReceived()
        context.fireChannelReadComplete()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if case .dialer(let link) = self.side {
            link.writabilityChanged(channel: context.channel, writable: context.channel.isWritable)
        }
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let frameError = error as? PeerFrameError {
            self.perform(self.machine.framingFailed(frameError), context: context)
        } else if context.channel.isActive {
            // IO errors (reset by peer, ...) and ByteToMessageHandler's own errors.
            self.logger.warning("peer connection error, closing", metadata: ["error": "\(error)"])
            context.close(promise: nil)
        }
        // Errors after the channel went inactive (e.g. a partial frame left at EOF) need no action.
    }

    private func perform(_ action: HandshakeAction, context: ChannelHandlerContext) {
        switch action {
        case .none:
            break
        case .send(let frame):
            self.write(frame, context: context)
        case .authenticated(let peer, let reply):
            self.timeout?.cancel()
            self.timeout = nil
            self.peer = peer
            self.logger[metadataKey: "peer-node"] = "\(peer)"
            if let reply { self.write(reply, context: context) }
            switch self.side {
            case .dialer(let link):
                self.logger.info("outbound peer connection authenticated")
                link.authenticated(channel: context.channel)
            case .listener:
                self.decoder.dataFramesAllowed = true
                self.logger.info("inbound peer connection authenticated")
                self.core.inboundAuthenticated(peer: peer, channel: context.channel)
            }
        case .deliver(let shard, let payload):
            // `.deliver` only comes from an authenticated listener machine, so `peer` is set.
            guard let peer = self.peer else { preconditionFailure("deliver before authentication") }
            if self.core.deliver(from: peer, shard: shard, payload: payload) { self.receivedPending += 1 }
            self.heardPending = true
        case .fail(let reason):
            self.timeout?.cancel()
            self.timeout = nil
            if self.peer == nil {
                self.core.countAuthFailure()
                self.logger.error("peer authentication failed, closing connection", metadata: ["reason": "\(reason)"])
            } else {
                self.core.countProtocolError()
                self.logger.error("peer protocol violation, closing connection", metadata: ["reason": "\(reason)"])
            }
            context.close(promise: nil)
        }
    }

    private func write(_ frame: PeerFrame, context: ChannelHandlerContext) {
        var buffer = context.channel.allocator.buffer(capacity: PeerWire.headerBytes + frame.bodyBytes)
        frame.encode(into: &buffer)
        context.writeAndFlush(self.wrapOutboundOut(buffer), promise: nil)
    }

    private func publishReceived() {
        if self.heardPending, let peer = self.peer {
            let now = NIODeadline.now()
            if now - self.heardPublished >= Self.heardEvery {
                self.heardPending = false
                self.heardPublished = now
                self.core.heard(from: peer)
            }
        }
        guard self.receivedPending > 0 else { return }
        self.core.countReceived(self.receivedPending)
        self.receivedPending = 0
    }
}
