import PeerTransport
import Testing
import WeftCore

@Suite("Handshake state machine")
struct HandshakeStateMachineTests {
    let secret = Array("correct horse battery staple".utf8)
    let nonceA = [UInt8](repeating: 0xA1, count: 32)
    let nonceB = [UInt8](repeating: 0xB2, count: 32)
    let dialerID = NodeID(1)
    let listenerID = NodeID(2)

    func dialer(secret: [UInt8]? = nil, peer: NodeID? = nil, cluster: String = "test") -> HandshakeStateMachine {
        .dialer(
            selfID: self.dialerID, peer: peer ?? self.listenerID, clusterName: cluster, secret: secret ?? self.secret,
            nonce: self.nonceA)
    }

    func listener(
        selfID: NodeID? = nil, secret: [UInt8]? = nil, known: Set<NodeID> = [NodeID(1), NodeID(3)], cluster: String = "test"
    ) -> HandshakeStateMachine {
        .listener(
            selfID: selfID ?? self.listenerID, knownPeers: known, clusterName: cluster, secret: secret ?? self.secret,
            nonce: self.nonceB)
    }

    /// Unwraps `.send(frame)`.
    func sent(_ action: HandshakeAction, sourceLocation: SourceLocation = #_sourceLocation) -> PeerFrame? {
        guard case .send(let frame) = action else {
            Issue.record("expected .send, got \(action)", sourceLocation: sourceLocation)
            return nil
        }
        return frame
    }

    @Test func successPath() throws {
        var d = self.dialer()
        var l = self.listener()
        #expect(l.start() == .none)

        let hello = try #require(self.sent(d.start()))
        #expect(hello == .hello(node: self.dialerID, clusterName: "test", nonce: self.nonceA))

        let challenge = try #require(self.sent(l.receive(hello)))
        let serverMAC = HandshakeStateMachine.mac(
            secret: self.secret, role: .listener, nonceA: self.nonceA, nonceB: self.nonceB, dialer: self.dialerID,
            listener: self.listenerID, clusterName: "test")
        #expect(challenge == .challenge(node: self.listenerID, nonce: self.nonceB, mac: serverMAC))

        let proof = try #require(self.sent(d.receive(challenge)))
        let clientMAC = HandshakeStateMachine.mac(
            secret: self.secret, role: .dialer, nonceA: self.nonceA, nonceB: self.nonceB, dialer: self.dialerID,
            listener: self.listenerID, clusterName: "test")
        #expect(proof == .proof(mac: clientMAC))
        #expect(clientMAC != serverMAC)
        #expect(d.authenticatedPeer == nil)

        #expect(l.receive(proof) == .authenticated(peer: self.dialerID, send: .accept))
        #expect(l.authenticatedPeer == self.dialerID)
        #expect(d.receive(.accept) == .authenticated(peer: self.listenerID, send: nil))
        #expect(d.authenticatedPeer == self.listenerID)

        // Data flows dialer → listener only.
        #expect(l.receive(.data(shard: 9, payload: [1, 2])) == .deliver(shard: 9, payload: [1, 2]))
        #expect(l.timedOut() == .none)
        #expect(d.timedOut() == .none)
        #expect(d.receive(.data(shard: 9, payload: [1])) == .fail(.unexpectedFrame(.data, state: "authenticated")))
    }

    @Test func dialerRejectsAListenerWithTheWrongSecret() throws {
        var d = self.dialer()
        var l = self.listener(secret: Array("another secret".utf8))
        let hellod = try #require(self.sent(d.start()))
        let challenge = try #require(self.sent(l.receive(hellod)))
        #expect(d.receive(challenge) == .fail(.badMAC))
        #expect(d.isFailed)
        #expect(d.receive(.accept) == .none)  // failed is terminal
    }

    @Test func listenerRejectsABadProof() throws {
        var d = self.dialer()
        var l = self.listener()
        let hellod = try #require(self.sent(d.start()))
        let challenge = try #require(self.sent(l.receive(hellod)))
        #expect(l.receive(.proof(mac: [UInt8](repeating: 0, count: 32))) == .fail(.badMAC))
        #expect(l.receive(.data(shard: 1, payload: [])) == .none)
        #expect(l.authenticatedPeer == nil)

        // Reflection: the listener's own server MAC is not a valid proof.
        guard case .challenge(_, _, let serverMAC) = challenge else {
            Issue.record("not a challenge")
            return
        }
        var l2 = self.listener()
        _ = l2.receive(.hello(node: self.dialerID, clusterName: "test", nonce: self.nonceA))
        #expect(l2.receive(.proof(mac: serverMAC)) == .fail(.badMAC))

        // A proof made with the wrong secret.
        var l3 = self.listener()
        _ = l3.receive(.hello(node: self.dialerID, clusterName: "test", nonce: self.nonceA))
        let forged = HandshakeStateMachine.mac(
            secret: Array("guess".utf8), role: .dialer, nonceA: self.nonceA, nonceB: self.nonceB, dialer: self.dialerID,
            listener: self.listenerID, clusterName: "test")
        #expect(l3.receive(.proof(mac: forged)) == .fail(.badMAC))
        // A proof of the wrong length never verifies either.
        var l4 = self.listener()
        _ = l4.receive(.hello(node: self.dialerID, clusterName: "test", nonce: self.nonceA))
        #expect(l4.receive(.proof(mac: [1, 2, 3])) == .fail(.badMAC))
    }

    @Test func listenerRejectsUnknownNodes() {
        var l = self.listener()
        #expect(l.receive(.hello(node: NodeID(99), clusterName: "test", nonce: self.nonceA)) == .fail(.unknownNode(NodeID(99))))
        // Its own id is not a peer, even if listed.
        var l2 = self.listener(known: [NodeID(1), NodeID(2)])
        #expect(l2.receive(.hello(node: self.listenerID, clusterName: "test", nonce: self.nonceA)) == .fail(.unknownNode(self.listenerID)))
    }

    @Test func listenerRejectsTheWrongCluster() {
        var l = self.listener()
        #expect(l.receive(.hello(node: self.dialerID, clusterName: "staging", nonce: self.nonceA)) == .fail(.wrongCluster("staging")))
    }

    @Test func dialerRejectsAnUnexpectedListenerNode() throws {
        var d = self.dialer(peer: NodeID(2))
        var l = self.listener(selfID: NodeID(3), known: [NodeID(1)])
        let hellod = try #require(self.sent(d.start()))
        let challenge = try #require(self.sent(l.receive(hellod)))
        #expect(d.receive(challenge) == .fail(.unexpectedNode(expected: NodeID(2), received: NodeID(3))))
    }

    @Test func outOfOrderFramesFail() throws {
        var l = self.listener()
        #expect(l.receive(.proof(mac: [UInt8](repeating: 0, count: 32))) == .fail(.unexpectedFrame(.proof, state: "awaitingHello")))

        var l2 = self.listener()
        let hello = PeerFrame.hello(node: self.dialerID, clusterName: "test", nonce: self.nonceA)
        _ = l2.receive(hello)
        #expect(l2.receive(hello) == .fail(.unexpectedFrame(.hello, state: "awaitingProof")))

        var l3 = self.listener()
        #expect(l3.receive(.accept) == .fail(.unexpectedFrame(.accept, state: "awaitingHello")))

        var d = self.dialer()
        _ = d.start()
        #expect(d.receive(.accept) == .fail(.unexpectedFrame(.accept, state: "awaitingChallenge")))

        var d2 = self.dialer()
        _ = d2.start()
        #expect(d2.receive(hello) == .fail(.unexpectedFrame(.hello, state: "awaitingChallenge")))

        // After authentication, handshake frames are protocol violations too.
        var d3 = self.dialer()
        var l4 = self.listener()
        let hellod3 = try #require(self.sent(d3.start()))
        let challenge = try #require(self.sent(l4.receive(hellod3)))
        let proof = try #require(self.sent(d3.receive(challenge)))
        _ = l4.receive(proof)
        #expect(l4.receive(hello) == .fail(.unexpectedFrame(.hello, state: "authenticated")))
    }

    @Test func applicationFrameBeforeAuthenticationFails() throws {
        var l = self.listener()
        #expect(l.receive(.data(shard: 1, payload: [1])) == .fail(.applicationFrameBeforeAuthentication))

        var l2 = self.listener()
        _ = l2.receive(.hello(node: self.dialerID, clusterName: "test", nonce: self.nonceA))
        #expect(l2.receive(.data(shard: 1, payload: [1])) == .fail(.applicationFrameBeforeAuthentication))

        var l3 = self.listener()
        #expect(l3.framingFailed(.dataNotAllowed) == .fail(.applicationFrameBeforeAuthentication))
        var l4 = self.listener()
        #expect(l4.framingFailed(.unknownType(9)) == .fail(.framing(.unknownType(9))))
    }

    @Test func timeoutBeforeAuthenticationFails() {
        var d = self.dialer()
        _ = d.start()
        #expect(d.timedOut() == .fail(.timeout))
        var l = self.listener()
        #expect(l.timedOut() == .fail(.timeout))
        #expect(l.timedOut() == .none)
    }

    @Test func macBindsEveryInput() {
        func mac(
            secret: [UInt8]? = nil, role: HandshakeStateMachine.Role = .dialer, a: [UInt8]? = nil, b: [UInt8]? = nil,
            dialer: NodeID = NodeID(1), listener: NodeID = NodeID(2), cluster: String = "c"
        ) -> [UInt8] {
            HandshakeStateMachine.mac(
                secret: secret ?? self.secret, role: role, nonceA: a ?? self.nonceA, nonceB: b ?? self.nonceB,
                dialer: dialer, listener: listener, clusterName: cluster)
        }
        let base = mac()
        #expect(base.count == 32)
        #expect(base == mac())
        let variants = [
            mac(secret: [1]), mac(role: .listener), mac(a: self.nonceB), mac(b: self.nonceA),
            mac(dialer: NodeID(2), listener: NodeID(1)), mac(cluster: "d"),
        ]
        for variant in variants { #expect(variant != base) }
    }
}
