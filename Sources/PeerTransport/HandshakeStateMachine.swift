import WeftCore

/// Why a handshake (or a connection before authentication) failed. Every case closes the connection.
public enum HandshakeFailure: Error, Equatable, Sendable, CustomStringConvertible {
    /// The dialer's Hello names another cluster.
    case wrongCluster(String)
    /// The dialer's Hello names a node this listener is not configured to accept (or itself).
    case unknownNode(NodeID)
    /// The listener answered with a node id other than the one configured at the dialed address.
    case unexpectedNode(expected: NodeID, received: NodeID)
    /// The peer's MAC does not verify: it does not hold the cluster secret (or tampered with the exchange).
    case badMAC
    /// A Data frame before authentication completed.
    case applicationFrameBeforeAuthentication
    /// A frame that is not valid in the current state (e.g. a Proof before a Hello, a second Hello).
    case unexpectedFrame(PeerFrameType, state: String)
    /// Authentication did not complete within the handshake timeout.
    case timeout
    /// The byte stream could not be decoded.
    case framing(PeerFrameError)

    public var description: String {
        switch self {
        case .wrongCluster(let name): "wrong cluster name \"\(name.prefix(64))\""
        case .unknownNode(let node): "unknown node id \(node)"
        case .unexpectedNode(let expected, let received): "expected node \(expected), peer says it is \(received)"
        case .badMAC: "MAC verification failed (wrong cluster secret?)"
        case .applicationFrameBeforeAuthentication: "application frame before authentication"
        case .unexpectedFrame(let type, let state): "unexpected \(type) frame in state \(state)"
        case .timeout: "handshake timed out"
        case .framing(let error): "framing error: \(error)"
        }
    }
}

/// What the connection handler must do after feeding the state machine an event.
public enum HandshakeAction: Equatable, Sendable {
    /// Nothing to do.
    case none
    /// Write (and flush) this frame.
    case send(PeerFrame)
    /// Authentication completed: `peer` is the verified remote node. Write `send` first if present (the
    /// listener's Accept), then let application frames flow.
    case authenticated(peer: NodeID, send: PeerFrame?)
    /// An application frame from the authenticated peer (listener side only): hand it to the application.
    case deliver(shard: UInt64, payload: [UInt8])
    /// Log `reason`, count an authentication failure, close the connection.
    case fail(HandshakeFailure)
}

/// The peer handshake as a pure state machine (no IO, no clock, no randomness: nonces are passed in).
///
/// ```
///  dialer                                               listener
///  ──────                                               ────────
///  start() ── Hello(A, cluster, nonceA) ──────────────▶ awaitingHello
///  awaitingChallenge ◀── Challenge(B, nonceB, macS) ─── awaitingProof     check cluster, A known
///  check B, macS ── Proof(macC) ──────────────────────▶ awaitingProof     check macC
///  awaitingAccept ◀── Accept ────────────────────────── authenticated(A)  (Data frames accepted)
///  authenticated(B)  ── Data… ───────────────────────▶
///
///  macS = HMAC(secret, "weft-peer-v1" | "server" | nonceA | nonceB | u64 A | u64 B | u8 len | cluster)
///  macC = HMAC(secret, "weft-peer-v1" | "client" | nonceA | nonceB | u64 A | u64 B | u8 len | cluster)
/// ```
///
/// Any frame out of order, any failed check, or a timeout yields `.fail` and the machine enters `failed`,
/// after which every event yields `.none` (the handler is closing the connection).
public struct HandshakeStateMachine: Sendable {
    public enum Role: Sendable, Equatable { case dialer, listener }

    enum State: Sendable {
        /// Dialer, before `start()`.
        case dialerIdle(nonceA: [UInt8])
        case awaitingChallenge(nonceA: [UInt8])
        case awaitingAccept(peer: NodeID)
        /// Listener, waiting for the dialer's Hello.
        case awaitingHello(nonceB: [UInt8])
        case awaitingProof(peer: NodeID, expectedMAC: [UInt8])
        case authenticated(peer: NodeID)
        case failed
    }

    public let role: Role
    let selfID: NodeID
    let clusterName: String
    let secret: [UInt8]
    /// Dialer: the node configured at the dialed address. Listener: unused.
    let expectedPeer: NodeID?
    /// Listener: nodes allowed to connect. Dialer: unused.
    let knownPeers: Set<NodeID>
    private(set) var state: State

    /// A dialer handshake towards `peer`. `nonce` must be 32 fresh random bytes.
    public static func dialer(
        selfID: NodeID, peer: NodeID, clusterName: String, secret: [UInt8], nonce: [UInt8]
    ) -> HandshakeStateMachine {
        precondition(nonce.count == PeerWire.nonceBytes)
        return HandshakeStateMachine(
            role: .dialer, selfID: selfID, clusterName: clusterName, secret: secret,
            expectedPeer: peer, knownPeers: [], state: .dialerIdle(nonceA: nonce))
    }

    /// A listener handshake that accepts any node of `knownPeers` except `selfID`. `nonce` must be 32 fresh
    /// random bytes.
    public static func listener(
        selfID: NodeID, knownPeers: Set<NodeID>, clusterName: String, secret: [UInt8], nonce: [UInt8]
    ) -> HandshakeStateMachine {
        precondition(nonce.count == PeerWire.nonceBytes)
        var peers = knownPeers
        peers.remove(selfID)
        return HandshakeStateMachine(
            role: .listener, selfID: selfID, clusterName: clusterName, secret: secret,
            expectedPeer: nil, knownPeers: peers, state: .awaitingHello(nonceB: nonce))
    }

    private init(
        role: Role, selfID: NodeID, clusterName: String, secret: [UInt8], expectedPeer: NodeID?,
        knownPeers: Set<NodeID>, state: State
    ) {
        precondition(!secret.isEmpty, "cluster secret must not be empty")
        precondition(clusterName.utf8.count <= PeerWire.clusterNameBytesMax, "cluster name too long")
        self.role = role
        self.selfID = selfID
        self.clusterName = clusterName
        self.secret = secret
        self.expectedPeer = expectedPeer
        self.knownPeers = knownPeers
        self.state = state
    }

    /// The verified remote node, once authenticated.
    public var authenticatedPeer: NodeID? {
        if case .authenticated(let peer) = self.state { return peer }
        return nil
    }

    public var isFailed: Bool {
        if case .failed = self.state { return true }
        return false
    }

    /// The connection became active. The dialer sends its Hello; the listener waits.
    public mutating func start() -> HandshakeAction {
        switch self.state {
        case .dialerIdle(let nonceA):
            self.state = .awaitingChallenge(nonceA: nonceA)
            return .send(.hello(node: self.selfID, clusterName: self.clusterName, nonce: nonceA))
        default:
            return .none
        }
    }

    /// A frame arrived from the peer.
    public mutating func receive(_ frame: PeerFrame) -> HandshakeAction {
        switch (self.state, frame) {
        case (.failed, _):
            return .none

        // Listener.
        case (.awaitingHello(let nonceB), .hello(let node, let name, let nonceA)):
            guard name == self.clusterName else { return self.fail(.wrongCluster(name)) }
            guard self.knownPeers.contains(node) else { return self.fail(.unknownNode(node)) }
            let serverMAC = Self.mac(
                secret: self.secret, role: .listener, nonceA: nonceA, nonceB: nonceB,
                dialer: node, listener: self.selfID, clusterName: self.clusterName)
            let clientMAC = Self.mac(
                secret: self.secret, role: .dialer, nonceA: nonceA, nonceB: nonceB,
                dialer: node, listener: self.selfID, clusterName: self.clusterName)
            self.state = .awaitingProof(peer: node, expectedMAC: clientMAC)
            return .send(.challenge(node: self.selfID, nonce: nonceB, mac: serverMAC))
        case (.awaitingProof(let peer, let expectedMAC), .proof(let mac)):
            guard PeerCrypto.constantTimeEqual(mac, expectedMAC) else { return self.fail(.badMAC) }
            self.state = .authenticated(peer: peer)
            return .authenticated(peer: peer, send: .accept)
        case (.authenticated, .data(let shard, let payload)) where self.role == .listener:
            return .deliver(shard: shard, payload: payload)

        // Dialer.
        case (.awaitingChallenge(let nonceA), .challenge(let node, let nonceB, let mac)):
            let expected = self.expectedPeer ?? node
            guard node == expected else { return self.fail(.unexpectedNode(expected: expected, received: node)) }
            let serverMAC = Self.mac(
                secret: self.secret, role: .listener, nonceA: nonceA, nonceB: nonceB,
                dialer: self.selfID, listener: node, clusterName: self.clusterName)
            guard PeerCrypto.constantTimeEqual(mac, serverMAC) else { return self.fail(.badMAC) }
            let clientMAC = Self.mac(
                secret: self.secret, role: .dialer, nonceA: nonceA, nonceB: nonceB,
                dialer: self.selfID, listener: node, clusterName: self.clusterName)
            self.state = .awaitingAccept(peer: node)
            return .send(.proof(mac: clientMAC))
        case (.awaitingAccept(let peer), .accept):
            self.state = .authenticated(peer: peer)
            return .authenticated(peer: peer, send: nil)

        // Everything else is out of order.
        case (.authenticated, _):
            return self.fail(.unexpectedFrame(frame.type, state: self.stateName))
        case (_, .data):
            return self.fail(.applicationFrameBeforeAuthentication)
        default:
            return self.fail(.unexpectedFrame(frame.type, state: self.stateName))
        }
    }

    /// The handshake timer fired. Fails unless already authenticated (or already failed).
    public mutating func timedOut() -> HandshakeAction {
        switch self.state {
        case .authenticated, .failed: return .none
        default: return self.fail(.timeout)
        }
    }

    /// The decoder rejected the byte stream.
    public mutating func framingFailed(_ error: PeerFrameError) -> HandshakeAction {
        if case .failed = self.state { return .none }
        if error == .dataNotAllowed, self.authenticatedPeer == nil {
            return self.fail(.applicationFrameBeforeAuthentication)
        }
        return self.fail(.framing(error))
    }

    private mutating func fail(_ reason: HandshakeFailure) -> HandshakeAction {
        self.state = .failed
        return .fail(reason)
    }

    var stateName: String {
        switch self.state {
        case .dialerIdle: "dialerIdle"
        case .awaitingChallenge: "awaitingChallenge"
        case .awaitingAccept: "awaitingAccept"
        case .awaitingHello: "awaitingHello"
        case .awaitingProof: "awaitingProof"
        case .authenticated: "authenticated"
        case .failed: "failed"
        }
    }

    /// The MAC a `role` side sends: HMAC-SHA256(secret, "weft-peer-v1" | "server" or "client" | nonceA |
    /// nonceB | u64 LE dialer | u64 LE listener | u8 cluster-name length | cluster name). The role label
    /// keeps a listener's answer from ever being usable as a dialer's proof (no reflection).
    public static func mac(
        secret: [UInt8], role: Role, nonceA: [UInt8], nonceB: [UInt8], dialer: NodeID, listener: NodeID,
        clusterName: String
    ) -> [UInt8] {
        let name = Array(clusterName.utf8)
        precondition(name.count <= PeerWire.clusterNameBytesMax)
        var input: [UInt8] = []
        input.reserveCapacity(PeerWire.macLabel.count + 6 + nonceA.count + nonceB.count + 17 + name.count)
        input += PeerWire.macLabel
        input += role == .listener ? PeerWire.serverLabel : PeerWire.clientLabel
        input += nonceA
        input += nonceB
        Self.appendLittleEndian(dialer.rawValue, to: &input)
        Self.appendLittleEndian(listener.rawValue, to: &input)
        input.append(UInt8(name.count))
        input += name
        return PeerCrypto.hmacSHA256(key: secret, message: input)
    }

    private static func appendLittleEndian(_ value: UInt64, to bytes: inout [UInt8]) {
        for shift in stride(from: 0, to: 64, by: 8) { bytes.append(UInt8(truncatingIfNeeded: value >> UInt64(shift))) }
    }
}
