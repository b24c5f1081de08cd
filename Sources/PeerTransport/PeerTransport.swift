/// # Peer transport, wire format version 1
///
/// Node-to-node TCP for Raft traffic. The transport carries opaque payloads tagged with a shard id; it
/// never interprets them, except its own link probes (`PeerWire.probeShard`; Docs/transport.md, "Link
/// probes").
///
/// ## Connections
///
/// Every node dials every peer once and keeps that **outbound** connection up (redialing forever with
/// back-off: 50 ms doubling to a 2 s cap, each delay jittered uniformly down to half). It also accepts
/// **inbound** connections from its peers. Data flows one way only: a node *sends* on its outbound
/// connection and *receives* on inbound ones. So a node pair has exactly two TCP connections, one per
/// direction, and each carries every shard's traffic in its direction. Order is preserved per connection
/// (TCP order); nothing is retransmitted by the transport. When a peer redials, the listener closes that
/// peer's previous inbound connection once the new one authenticates (it may be half-open).
///
/// Frames handed to `send` while the outbound connection is not authenticated are dropped and counted
/// (Raft retransmits). The per-peer queue holds at most `queueFramesMax` frames (default 65536); on
/// overflow the oldest frame is dropped and counted. Frames queued while the channel is not writable,
/// or within one event-loop tick, are written together with a single flush.
///
/// ## Framing
///
/// Every frame, in both directions, before and after authentication:
///
/// | offset | size     | field    | meaning                                                           |
/// |-------:|---------:|----------|-------------------------------------------------------------------|
/// | 0      | 4        | `length` | u32 little-endian: bytes of `body` (the 5 header bytes excluded)  |
/// | 4      | 1        | `type`   | frame type, table below                                           |
/// | 5      | `length` | `body`   |                                                                   |
///
/// | type   | name      | direction                       | body                                                    | `length` |
/// |--------|-----------|---------------------------------|---------------------------------------------------------|----------|
/// | `0x01` | Hello     | dialer → listener               | u64 LE node id · nonceA[32] · cluster name (UTF-8, rest) | 40 … 295 |
/// | `0x02` | Challenge | listener → dialer               | u64 LE node id · nonceB[32] · serverMAC[32]             | 72       |
/// | `0x03` | Proof     | dialer → listener               | clientMAC[32]                                           | 32       |
/// | `0x04` | Accept    | listener → dialer               | (empty)                                                 | 0        |
/// | `0x10` | Data      | dialer → listener, after Accept | u64 LE shard · payload (opaque: an encoded Raft message) | ≥ 8      |
///
/// "rest" means the field runs to the end of the body; there is no inner length.
///
/// The header is checked as soon as its 5 bytes arrive, before any body is buffered. The connection is
/// closed, with an error logged, when: `length > frameBytesMax` (default 16 MiB); the type is not in the
/// table; a handshake frame's `length` is outside its column; a Hello's cluster name is not UTF-8; a Data
/// frame arrives before Accept, or on the dialer's side at all; any frame arrives out of handshake order.
///
/// Worked example: Data for shard 7 with payload `AA BB` is
/// `0A 00 00 00 | 10 | 07 00 00 00 00 00 00 00 | AA BB` (length 10 = 8 + 2).
///
/// ## Handshake
///
/// Mutual authentication with the cluster secret (a shared key, never sent), before any Data:
///
/// ```
///  dialer A                                              listener B
///  Hello(A, cluster, nonceA)  ─────────────────────────▶  cluster name must match; A must be a configured peer
///                             ◀─────────────────────────  Challenge(B, nonceB, serverMAC)
///  B must be the node configured at
///  that address; serverMAC must verify
///  Proof(clientMAC)           ─────────────────────────▶  clientMAC must verify (CRYPTO_memcmp)
///                             ◀─────────────────────────  Accept
///  Data, Data, …              ─────────────────────────▶  delivered to onFrame(A, shard, payload)
/// ```
///
/// `serverMAC` and `clientMAC` are HMAC-SHA256 keyed with the secret over:
///
/// | bytes | field                                        |
/// |------:|----------------------------------------------|
/// | 12    | ASCII `weft-peer-v1`                         |
/// | 6     | ASCII `server` (serverMAC) or `client` (clientMAC) |
/// | 32    | nonceA (dialer's, from Hello)                |
/// | 32    | nonceB (listener's, from Challenge)          |
/// | 8     | u64 LE dialer node id                        |
/// | 8     | u64 LE listener node id                      |
/// | 1     | cluster name length in bytes                 |
/// | n     | cluster name, UTF-8                          |
///
/// Nonces are 32 bytes from OpenSSL's `RAND_bytes`, fresh per connection, so neither MAC can be replayed;
/// the role label stops a listener's serverMAC being reflected back as a clientMAC. A process without the
/// secret can get no Data accepted (no Accept without a valid Proof) and is sent no Data (a node writes
/// Data only after the listener's serverMAC verified and it answered Accept; a dialer never accepts Data). The listener checks cluster name
/// and node id before computing any MAC. The whole handshake must finish within 5 s of TCP connect
/// (`handshakeTimeout`). The logic is `HandshakeStateMachine`; the NIO handler only performs its actions.
///
/// The frame table's numbers are `PeerWire` constants; the tests pin them.
import Logging
import NIOCore
import NIOPosix
import WeftCore

#if canImport(Glibc)
    import Glibc
#endif

/// Where a node listens for peer connections.
public struct PeerAddress: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    public var description: String { "\(self.host):\(self.port)" }
}

/// Limits and timings. Defaults are the production values.
public struct PeerTransportConfiguration: Sendable {
    /// Largest accepted frame `length` (body bytes). A Data payload may be up to 8 bytes less.
    public var frameBytesMax: Int = PeerWire.frameBytesMaxDefault
    /// Frames waiting to be written per peer; on overflow the oldest is dropped.
    public var queueFramesMax: Int = 65536
    /// Time from TCP connect to authenticated, both sides.
    public var handshakeTimeout: TimeAmount = .seconds(5)
    /// TCP connect timeout for outbound connections.
    public var connectTimeout: TimeAmount = .seconds(5)
    /// First redial delay; doubles per consecutive failure up to `reconnectDelayMax` (both before jitter).
    public var reconnectDelayInitial: TimeAmount = .milliseconds(50)
    public var reconnectDelayMax: TimeAmount = .seconds(2)
    /// One flush writes the queued frames as buffers of about this size.
    public var writeChunkBytes: Int = 256 << 10
    /// A connection whose peer stops acknowledging at the TCP level (a black-holed route, a host gone
    /// without a reset) is closed by the kernel after about this long: `TCP_USER_TIMEOUT` for data in
    /// flight, and keep-alive probes (after 2 s idle, every second) for an idle connection. Without it
    /// such a connection looked connected for as long as TCP retransmits (minutes), and every request
    /// forwarded over it waited out its deadline. 0 turns both off.
    public var deadLinkTimeout: TimeAmount = .seconds(5)
    /// Link probes (Docs/transport.md, "Link probes"): every `probeInterval` a connected link sends its
    /// peer a probe, which the peer answers over its own outbound connection. A link whose peer answers
    /// probes, and from which neither an answer nor any other frame has come for `suspectAfter` since
    /// its last answer on this connection (or since the connection came up), is *suspect* (`suspect(_:)`, `onSuspect`): frames still go out on it, but requests
    /// that need an answer are better sent through another node. It stops being suspect with the next
    /// answer. A peer that never answers (a version without probes) is judged by TCP alone
    /// (`deadLinkTimeout`), and after 50 unanswered probes the link probes it only every 25th interval.
    /// A `probeInterval` of 0 turns probes off.
    public var probeInterval: TimeAmount = .milliseconds(200)
    public var suspectAfter: TimeAmount = .seconds(1)

    public init() {}
}

/// The socket options behind `deadLinkTimeout` (Linux).
enum DeadLink {
    /// Each option with its value, or none when `timeout` is 0.
    static func options(_ timeout: TimeAmount) -> [(ChannelOptions.Types.SocketOption, SocketOptionValue)] {
        let ms = Int(timeout.nanoseconds / 1_000_000)
        guard ms > 0 else { return [] }
        #if os(Linux)
            let idle = max(1, min(2, ms / 2000))
            let count = max(1, (ms / 1000 - idle))
            return [
                (.tcpOption(.init(rawValue: CInt(TCP_USER_TIMEOUT))), SocketOptionValue(ms)),
                (.tcpOption(.init(rawValue: CInt(TCP_KEEPIDLE))), SocketOptionValue(idle)),
                (.tcpOption(.init(rawValue: CInt(TCP_KEEPINTVL))), 1),
                (.tcpOption(.init(rawValue: CInt(TCP_KEEPCNT))), SocketOptionValue(count)),
            ]
        #else
            return []
        #endif
    }
}

/// Counters since `init`. All are monotonic.
public struct TransportStats: Sendable, Equatable {
    /// Data frames written to outbound connections.
    public var framesSent: UInt64 = 0
    /// Data frames delivered to `onFrame`.
    public var framesReceived: UInt64 = 0
    /// Frames sent while the peer was not reachable, or still queued when its connection closed.
    public var framesDroppedDisconnected: UInt64 = 0
    /// Frames dropped because the peer's queue held `queueFramesMax` frames (the oldest is dropped).
    public var framesDroppedQueueFull: UInt64 = 0
    /// Frames for an unknown node id (or this node), or with a payload over `frameBytesMax - 8`.
    public var framesDroppedInvalid: UInt64 = 0
    /// Connections (either direction) this node closed before authentication completed: bad MAC, unknown
    /// node, wrong cluster, timeout, out-of-order or undecodable frames, Data before authentication.
    public var authFailures: UInt64 = 0
    /// Authenticated connections this node closed because the peer broke the protocol.
    public var protocolErrors: UInt64 = 0
    /// Redials scheduled after a failed dial or a lost outbound connection.
    public var reconnects: UInt64 = 0
    /// Inbound TCP connections accepted (authenticated or not).
    public var connectionsAccepted: UInt64 = 0

    public init() {}

    public var framesDropped: UInt64 {
        self.framesDroppedDisconnected + self.framesDroppedQueueFull + self.framesDroppedInvalid
    }
}

public enum PeerTransportError: Error, Equatable, Sendable, CustomStringConvertible {
    case alreadyStarted
    case stopped
    case invalidConfiguration(String)
    /// The event loop group is not one NIOPosix bootstraps can use (e.g. an embedded loop).
    case unsupportedEventLoopGroup

    public var description: String {
        switch self {
        case .alreadyStarted: "peer transport already started"
        case .stopped: "peer transport stopped"
        case .invalidConfiguration(let why): "invalid peer transport configuration: \(why)"
        case .unsupportedEventLoopGroup: "event loop group is not usable by NIOPosix bootstraps"
        }
    }
}

/// Node-to-node transport: one authenticated outbound TCP connection per peer for sending, inbound
/// connections from peers for receiving. Wire format and handshake: the comment at the top of this file.
///
/// All methods are thread-safe. `onFrame` runs on a NIO event loop thread, in order per sending peer; it
/// must not block.
public final class PeerTransport: Sendable {
    public let selfID: NodeID
    public let listenAddress: PeerAddress
    private let core: TransportCore
    private let group: any EventLoopGroup
    /// One per configured peer (never this node). Immutable after init.
    private let links: [NodeID: PeerLink]
    private let lifecycle: Locked<Lifecycle>

    private enum Lifecycle: Sendable {
        case idle
        case starting
        case running(server: any Channel, port: Int)
        case stopped
    }

    /// - Parameters:
    ///   - id: this node. An entry for it in `peers` is ignored.
    ///   - secret: the cluster secret; must not be empty (checked by `start`).
    ///   - peers: every other node and where it listens.
    ///   - onFrame: called for each Data frame from an authenticated peer, on an event loop thread.
    public init(
        self id: NodeID, clusterName: String, secret: [UInt8], listen: PeerAddress, peers: [NodeID: PeerAddress],
        group: any EventLoopGroup, logger: Logger, configuration: PeerTransportConfiguration = .init(),
        onSuspect: @escaping @Sendable (_ peer: NodeID) -> Void = { _ in },
        onFrame: @escaping @Sendable (_ from: NodeID, _ shard: UInt64, _ payload: [UInt8]) -> Void
    ) {
        var logger = logger
        logger[metadataKey: "node"] = "\(id)"
        let core = TransportCore(
            selfID: id, clusterName: clusterName, secret: secret, knownPeers: Set(peers.keys).subtracting([id]),
            configuration: configuration, logger: logger, onSuspect: onSuspect, onFrame: onFrame)
        var links: [NodeID: PeerLink] = [:]
        for (peer, address) in peers where peer != id {
            links[peer] = PeerLink(peer: peer, address: address, eventLoop: group.next(), core: core)
        }
        core.setLinks(links)
        self.selfID = id
        self.listenAddress = listen
        self.core = core
        self.group = group
        self.links = links
        self.lifecycle = Locked(.idle)
    }

    /// Validates the configuration, binds the listener and starts dialing every peer.
    /// - Returns: the bound port (useful with port 0); also available as `boundPort`.
    @discardableResult
    public func start() async throws -> Int {
        try self.lifecycle.withLock { lifecycle in
            switch lifecycle {
            case .idle: lifecycle = .starting
            case .starting, .running: throw PeerTransportError.alreadyStarted
            case .stopped: throw PeerTransportError.stopped
            }
        }
        let server: any Channel
        do {
            try self.validate()
            guard let bootstrap = ServerBootstrap(validatingGroup: self.group) else {
                throw PeerTransportError.unsupportedEventLoopGroup
            }
            let core = self.core
            server = try await bootstrap
                .serverChannelOption(.backlog, value: 256)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.socketOption(.so_keepalive), value: 1)
                .childChannelOptions(DeadLink.options(core.configuration.deadLinkTimeout))
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        guard core.inboundAccepted(channel: channel) else { throw PeerTransportError.stopped }
                        let decoder = PeerFrameDecoder(frameBytesMax: core.configuration.frameBytesMax)
                        let remote = channel.remoteAddress.map { "\($0)" } ?? "unknown"
                        let handler = try PeerConnectionHandler(
                            core: core, side: .listener, decoder: decoder, remote: remote)
                        try channel.pipeline.syncOperations.addHandlers(ByteToMessageHandler(decoder), handler)
                    }
                }
                .bind(host: self.listenAddress.host, port: self.listenAddress.port)
                .get()
        } catch {
            self.lifecycle.withLock { lifecycle in
                if case .starting = lifecycle { lifecycle = .idle }
            }
            throw error
        }
        let port = server.localAddress?.port ?? self.listenAddress.port
        let running = self.lifecycle.withLock { lifecycle -> Bool in
            guard case .starting = lifecycle else { return false }  // stop() ran meanwhile
            lifecycle = .running(server: server, port: port)
            return true
        }
        guard running else {
            try? await server.close()
            throw PeerTransportError.stopped
        }
        self.core.logger.info("peer transport listening", metadata: ["listen": "\(self.listenAddress.host):\(port)"])
        for link in self.links.values { link.start() }
        return port
    }

    private func validate() throws(PeerTransportError) {
        let configuration = self.core.configuration
        func check(_ ok: Bool, _ why: String) throws(PeerTransportError) {
            if !ok { throw .invalidConfiguration(why) }
        }
        try check(!self.core.secret.isEmpty, "cluster secret is empty")
        try check(
            self.core.clusterName.utf8.count <= PeerWire.clusterNameBytesMax,
            "cluster name longer than \(PeerWire.clusterNameBytesMax) bytes")
        try check(
            configuration.frameBytesMax >= 1024 && configuration.frameBytesMax <= Int(UInt32.max),
            "frameBytesMax must be in 1024...\(UInt32.max)")
        try check(configuration.queueFramesMax >= 1, "queueFramesMax must be at least 1")
        try check(configuration.writeChunkBytes >= 1, "writeChunkBytes must be at least 1")
        try check(configuration.handshakeTimeout.nanoseconds > 0, "handshakeTimeout must be positive")
        try check(configuration.connectTimeout.nanoseconds > 0, "connectTimeout must be positive")
        try check(
            configuration.probeInterval.nanoseconds >= 0
                && (configuration.probeInterval.nanoseconds == 0 || configuration.suspectAfter > configuration.probeInterval),
            "probeInterval must be 0 (off) or positive and below suspectAfter")
        try check(
            configuration.reconnectDelayInitial.nanoseconds > 0
                && configuration.reconnectDelayInitial <= configuration.reconnectDelayMax,
            "reconnect delays must be positive and initial <= max")
        try check((0...65535).contains(self.listenAddress.port), "listen port out of range")
        for link in self.links.values {
            try check((1...65535).contains(link.address.port), "port of node \(link.peer) out of range")
        }
    }

    /// The port the listener is bound to, once started.
    public var boundPort: Int? {
        self.lifecycle.withLock { lifecycle in
            if case .running(_, let port) = lifecycle { return port }
            return nil
        }
    }

    /// Queues a Data frame for `peer`. Thread-safe and non-blocking. The frame is dropped (and counted)
    /// when `peer` is not reachable, is unknown, or the payload exceeds `frameBytesMax - 8` bytes.
    public func send(to peer: NodeID, shard: UInt64, payload: [UInt8]) {
        guard let link = self.links[peer] else {
            self.core.countDroppedInvalid()
            return
        }
        guard payload.count <= self.core.configuration.frameBytesMax - PeerWire.dataFixedBytes else {
            self.core.countDroppedInvalid()
            self.core.logger.error(
                "payload too large for a peer frame, dropped",
                metadata: ["peer-node": "\(peer)", "bytes": "\(payload.count)"])
            return
        }
        link.send(shard: shard, payload: payload)
    }

    /// True while an authenticated outbound connection to `peer` is up (frames sent now will be written).
    public func reachable(_ peer: NodeID) -> Bool {
        self.links[peer]?.isConnected ?? false
    }

    /// True while the link to `peer` is up but `peer` has stopped answering its probes (a cut the kernel
    /// has not noticed yet, a paused process, a one-way loss of its frames to this node): see
    /// `PeerTransportConfiguration.suspectAfter`.
    public func suspect(_ peer: NodeID) -> Bool {
        self.links[peer]?.isSuspect ?? false
    }

    /// Closes the listener and every connection, and stops redialing. Idempotent. After it returns no
    /// more `onFrame` calls start.
    public func stop() async {
        let server: (any Channel)? = self.lifecycle.withLock { lifecycle in
            defer { lifecycle = .stopped }
            if case .running(let server, _) = lifecycle { return server }
            return nil
        }
        var closing: [EventLoopFuture<Void>] = []
        if let server {
            server.close(promise: nil)
            closing.append(server.closeFuture)
        }
        for link in self.links.values {
            if let future = link.stop() { closing.append(future) }
        }
        closing += self.core.closeAllInbound()
        for future in closing { try? await future.get() }
    }

    public var stats: TransportStats {
        var stats = self.core.stats
        for link in self.links.values {
            let counters = link.counters
            stats.framesSent += counters.framesSent
            stats.framesDroppedDisconnected += counters.framesDroppedDisconnected
            stats.framesDroppedQueueFull += counters.framesDroppedQueueFull
            stats.reconnects += counters.reconnects
        }
        return stats
    }
}

/// State shared by the transport, its links and its connection handlers.
final class TransportCore: Sendable {
    let selfID: NodeID
    let clusterName: String
    let secret: [UInt8]
    /// Nodes allowed to connect inbound. Never contains `selfID`.
    let knownPeers: Set<NodeID>
    let configuration: PeerTransportConfiguration
    let logger: Logger
    let onFrame: @Sendable (NodeID, UInt64, [UInt8]) -> Void
    let onSuspect: @Sendable (NodeID) -> Void
    private let counters = Locked(TransportStats())
    /// The transport's links, for answering probes (weak: the links hold this core).
    private let links = Locked<[NodeID: WeakLink]>([:])

    private struct WeakLink: Sendable {
        weak var link: PeerLink?
    }
    private let inbound = Locked(Inbound())

    private struct Inbound: Sendable {
        /// Every open accepted channel, so `stop` can close them.
        var channels: [ObjectIdentifier: any Channel] = [:]
        /// The newest authenticated inbound channel per peer; an older one is closed when a newer one
        /// authenticates (the peer redialed, the old TCP connection may be half-open).
        var byPeer: [NodeID: ObjectIdentifier] = [:]
        var closed = false
    }

    init(
        selfID: NodeID, clusterName: String, secret: [UInt8], knownPeers: Set<NodeID>,
        configuration: PeerTransportConfiguration, logger: Logger,
        onSuspect: @escaping @Sendable (NodeID) -> Void = { _ in },
        onFrame: @escaping @Sendable (NodeID, UInt64, [UInt8]) -> Void
    ) {
        self.onSuspect = onSuspect
        self.selfID = selfID
        self.clusterName = clusterName
        self.secret = secret
        self.knownPeers = knownPeers
        self.configuration = configuration
        self.logger = logger
        self.onFrame = onFrame
    }

    var stats: TransportStats { self.counters.withLock { $0 } }

    func setLinks(_ links: [NodeID: PeerLink]) {
        self.links.withLock { $0 = links.mapValues { WeakLink(link: $0) } }
    }

    /// Frames came from `peer` on its connection to this node (`PeerLink.heard`).
    func heard(from peer: NodeID) {
        self.links.withLock { $0[peer]?.link }?.heard()
    }

    /// A Data frame from an authenticated peer: a probe is answered (over this node's own link to the
    /// peer) or taken as an answer; anything else goes to `onFrame`. Returns whether it went to `onFrame`.
    func deliver(from peer: NodeID, shard: UInt64, payload: [UInt8]) -> Bool {
        guard shard == PeerWire.probeShard else {
            self.onFrame(peer, shard, payload)
            return true
        }
        guard payload.count == PeerWire.probeBytes, let link = self.links.withLock({ $0[peer]?.link }) else { return false }
        switch payload[0] {
        case PeerWire.probePing:
            var pong = payload
            pong[0] = PeerWire.probePong
            link.send(shard: PeerWire.probeShard, payload: pong)
        case PeerWire.probePong:
            link.probeAnswered()
        default:
            break
        }
        return false
    }

    func countReceived(_ count: Int) { self.counters.withLock { $0.framesReceived += UInt64(count) } }
    func countAuthFailure() { self.counters.withLock { $0.authFailures += 1 } }
    func countProtocolError() { self.counters.withLock { $0.protocolErrors += 1 } }
    func countDroppedInvalid() { self.counters.withLock { $0.framesDroppedInvalid += 1 } }

    /// Registers an accepted channel; false once the transport is stopping (the channel is then refused).
    func inboundAccepted(channel: any Channel) -> Bool {
        let id = ObjectIdentifier(channel)
        let accepted = self.inbound.withLock { inbound -> Bool in
            guard !inbound.closed else { return false }
            inbound.channels[id] = channel
            return true
        }
        guard accepted else { return false }
        self.counters.withLock { $0.connectionsAccepted += 1 }
        channel.closeFuture.whenComplete { _ in
            self.inbound.withLock { inbound in
                inbound.channels[id] = nil
                for (peer, current) in inbound.byPeer where current == id { inbound.byPeer[peer] = nil }
            }
        }
        return true
    }

    func inboundAuthenticated(peer: NodeID, channel: any Channel) {
        let id = ObjectIdentifier(channel)
        let previous: (any Channel)? = self.inbound.withLock { inbound in
            let old = inbound.byPeer[peer].flatMap { $0 == id ? nil : inbound.channels[$0] }
            inbound.byPeer[peer] = id
            return old
        }
        if let previous {
            self.logger.info("peer redialed; closing its previous inbound connection", metadata: ["peer-node": "\(peer)"])
            previous.close(promise: nil)
        }
    }

    /// Closes every accepted channel and refuses new ones. Returns their close futures.
    func closeAllInbound() -> [EventLoopFuture<Void>] {
        let channels = self.inbound.withLock { inbound -> [any Channel] in
            inbound.closed = true
            return Array(inbound.channels.values)
        }
        for channel in channels { channel.close(promise: nil) }
        return channels.map { $0.closeFuture }
    }
}

extension ServerBootstrap {
    func childChannelOptions(_ options: [(ChannelOptions.Types.SocketOption, SocketOptionValue)]) -> ServerBootstrap {
        options.reduce(self) { $0.childChannelOption($1.0, value: $1.1) }
    }
}

extension ClientBootstrap {
    func channelOptions(_ options: [(ChannelOptions.Types.SocketOption, SocketOptionValue)]) -> ClientBootstrap {
        options.reduce(self) { $0.channelOption($1.0, value: $1.1) }
    }
}
