import Foundation
import NIOCore
import NIOPosix
import PeerTransport
import Testing
import WeftCore
import WeftTesting

/// Real sockets on 127.0.0.1. Serialized: each test binds several ports and spins up event loops, and the
/// machine has two cores. Every wait is a poll with a 10 s deadline.
@Suite("Peer transport over TCP", .serialized)
struct TransportTests {
    /// Three nodes, ports reserved up front, all started and fully connected.
    private func startCluster(
        _ ids: [UInt64], group: any EventLoopGroup,
        configuration: (NodeID) -> PeerTransportConfiguration = { _ in PeerTransportConfiguration() },
        secret: (NodeID) -> [UInt8] = { _ in testSecret }
    ) async throws -> (nodes: [TestNode], ports: [NodeID: Int]) {
        // A reserved port is free only until it is released: another process on the machine can take it
        // (as the ephemeral port of an outgoing connection) before the transport binds it. Then the
        // cluster starts again on other ports.
        for attempt in 1...5 {
            let reserved = try await reservePorts(ids.count, group: group)
            var ports: [NodeID: Int] = [:]
            for (id, port) in zip(ids, reserved) { ports[NodeID(id)] = port }
            var nodes: [TestNode] = []
            var taken = false
            for id in ids.map({ NodeID($0) }) {
                let node = makeNode(
                    id: id, port: ports[id] ?? 0, peers: ports.filter { $0.key != id }, secret: secret(id), group: group,
                    configuration: configuration(id))
                let bound: Int
                do {
                    bound = try await node.transport.start()
                } catch where attempt < 5 {
                    taken = true
                    break
                }
                #expect(bound == ports[id])
                #expect(node.transport.boundPort == ports[id])
                nodes.append(node)
            }
            if !taken { return (nodes, ports) }
            for node in nodes { await node.transport.stop() }
        }
        preconditionFailure("unreachable: the last attempt throws")
    }

    /// Two nodes probing fast (every 100 ms, suspect after 800 ms), redialing within 200 ms, with a
    /// dead-link timeout long enough not to matter, started and connected.
    private func startProbing(
        group: any EventLoopGroup
    ) async throws -> (nodes: [TestNode], ports: [NodeID: Int], configuration: PeerTransportConfiguration) {
        var configuration = PeerTransportConfiguration()
        configuration.deadLinkTimeout = .seconds(60)
        configuration.probeInterval = .milliseconds(100)
        configuration.suspectAfter = .milliseconds(800)
        configuration.reconnectDelayMax = .milliseconds(200)
        let (nodes, ports) = try await self.startCluster([1, 2], group: group) { _ in configuration }
        #expect(await eventually { self.allReachable(nodes) })
        return (nodes, ports, configuration)
    }

    private func allReachable(_ nodes: [TestNode]) -> Bool {
        nodes.allSatisfy { node in nodes.allSatisfy { $0.id == node.id || node.transport.reachable($0.id) } }
    }

    private func stopAll(_ nodes: [TestNode], _ group: MultiThreadedEventLoopGroup) async throws {
        for node in nodes { await node.transport.stop() }
        try await group.shutdownGracefully()
    }

    @Test func threeNodesExchangeFramesInOrderPerPair() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let (nodes, _) = try await self.startCluster([1, 2, 3], group: group)
        #expect(await eventually { self.allReachable(nodes) })

        let framesPerPair = 500
        let shards: [UInt64] = [1, 2, 3, 4]
        // Each sender interleaves shards; several senders run concurrently.
        await withTaskGroup(of: Void.self) { tasks in
            for sender in nodes {
                tasks.addTask {
                    for seq in 0..<framesPerPair {
                        for receiver in nodes where receiver.id != sender.id {
                            sender.transport.send(
                                to: receiver.id, shard: shards[seq % shards.count], payload: payload(from: sender.id, seq: seq))
                        }
                    }
                }
            }
        }
        let expectedPerNode = framesPerPair * (nodes.count - 1)
        #expect(await eventually { nodes.allSatisfy { $0.inbox.all.count == expectedPerNode } })

        for receiver in nodes {
            for sender in nodes where sender.id != receiver.id {
                let frames = receiver.inbox.from(sender.id)
                #expect(frames.map { seq(of: $0.payload) } == (0..<framesPerPair).map { Optional($0) }, "\(sender.id) → \(receiver.id)")
                #expect(frames.map(\.shard) == (0..<framesPerPair).map { shards[$0 % shards.count] })
                #expect(frames.allSatisfy { $0.payload.first == UInt8(sender.id.rawValue) })
            }
            let stats = receiver.transport.stats
            #expect(stats.framesReceived == UInt64(expectedPerNode))
            #expect(stats.framesSent == UInt64(expectedPerNode))
            #expect(stats.framesDropped == 0)
            #expect(stats.authFailures == 0)
        }
        try await self.stopAll(nodes, group)
    }

    @Test func wrongSecretNeverJoins() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        // Node 3 is a configured member but holds the wrong secret.
        let (nodes, _) = try await self.startCluster(
            [1, 2, 3], group: group, secret: { $0 == NodeID(3) ? Array("not the secret".utf8) : testSecret })
        let good = Array(nodes[0..<2])
        let intruder = nodes[2]
        #expect(await eventually { self.allReachable(good) })

        // Every direction fails, repeatedly (the redial loop keeps trying), and is counted on both sides.
        #expect(await eventually {
            good.allSatisfy { $0.transport.stats.authFailures >= 2 } && intruder.transport.stats.authFailures >= 4
        })
        for node in good {
            intruder.transport.send(to: node.id, shard: 1, payload: [0xEE])
            #expect(!intruder.transport.reachable(node.id))
            #expect(!node.transport.reachable(intruder.id))
        }
        #expect(intruder.transport.stats.framesDroppedDisconnected == 2)
        #expect(intruder.transport.stats.framesSent == 0)
        #expect(good[0].log.get.contains { $0.contains("MAC verification failed") })

        // The good pair still works; nothing from the intruder ever arrived.
        good[1].transport.send(to: good[0].id, shard: 5, payload: [1])
        #expect(await eventually { good[0].inbox.all.count == 1 })
        for node in good { #expect(node.inbox.from(intruder.id).isEmpty) }
        #expect(intruder.inbox.all.isEmpty)
        try await self.stopAll(nodes, group)
    }

    @Test func hostileRawClientsAreDisconnectedAndTheListenerKeepsServing() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        var configuration = PeerTransportConfiguration()
        configuration.handshakeTimeout = .milliseconds(500)
        let (nodes, ports) = try await self.startCluster([1, 2], group: group, configuration: { _ in configuration })
        let target = nodes[0]
        let port = ports[target.id] ?? 0
        #expect(await eventually { self.allReachable(nodes) })

        let nonce = [UInt8](repeating: 7, count: 32)
        let hello = PeerFrame.hello(node: NodeID(2), clusterName: "test", nonce: nonce)
        var dataFrame = ByteBuffer()
        PeerFrame.data(shard: 1, payload: [0xEE]).encode(into: &dataFrame)
        let attacks: [(name: String, bytes: [UInt8], logged: String)] = [
            ("garbage", Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8), "unknown frame type"),
            ("oversized length", [0xFF, 0xFF, 0xFF, 0x7F, 0x01], "exceeds frameBytesMax"),
            ("data before auth", Array(dataFrame.readableBytesView), "application frame before authentication"),
            ("data after hello", [], "application frame before authentication"),
            ("bad proof", [], "MAC verification failed"),
            ("unknown node", [], "unknown node id 42"),
            ("wrong cluster", [], "wrong cluster name"),
            ("silent", [], "handshake timed out"),
        ]
        var failures = target.transport.stats.authFailures
        for attack in attacks {
            let client = try await RawClient(port: port, group: group)
            switch attack.name {
            case "data after hello":
                try await client.send(hello)
                try await client.send(Array(dataFrame.readableBytesView))
            case "bad proof":
                try await client.send(hello)
                try await client.send(.proof(mac: [UInt8](repeating: 0, count: 32)))
            case "unknown node":
                try await client.send(.hello(node: NodeID(42), clusterName: "test", nonce: nonce))
            case "wrong cluster":
                try await client.send(.hello(node: NodeID(2), clusterName: "other", nonce: nonce))
            case "silent":
                break
            default:
                try await client.send(attack.bytes)
            }
            #expect(await eventually { !client.isOpen }, "\(attack.name): still connected")
            #expect(!client.receivedTypes.contains(PeerFrameType.accept.rawValue), "\(attack.name)")
            #expect(await eventually { target.transport.stats.authFailures == failures + 1 }, "\(attack.name)")
            failures = target.transport.stats.authFailures
            #expect(target.log.get.contains { $0.contains(attack.logged) }, "\(attack.name): reason not logged")
        }
        #expect(target.inbox.all.isEmpty)

        // The real peer's connection was untouched; it still delivers, and so does a fresh handshake.
        #expect(nodes[1].transport.reachable(target.id))
        nodes[1].transport.send(to: target.id, shard: 3, payload: [42])
        #expect(await eventually { target.inbox.all == [ReceivedFrame(from: NodeID(2), shard: 3, payload: [42])] })
        #expect(target.transport.stats.protocolErrors == 0)
        try await self.stopAll(nodes, group)
    }

    @Test func oversizedFrameFromAnAuthenticatedPeerClosesOnlyThatConnection() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        // Node 1 accepts frames up to 1 KiB; node 2 may send up to the default.
        let (nodes, _) = try await self.startCluster([1, 2], group: group) { id in
            var configuration = PeerTransportConfiguration()
            if id == NodeID(1) { configuration.frameBytesMax = 1024 }
            return configuration
        }
        #expect(await eventually { self.allReachable(nodes) })
        nodes[1].transport.send(to: NodeID(1), shard: 1, payload: [UInt8](repeating: 1, count: 2000))
        #expect(await eventually { nodes[0].transport.stats.protocolErrors == 1 })
        #expect(nodes[0].log.get.contains { $0.contains("exceeds frameBytesMax 1024") })
        // Node 2 redials and small frames flow again.
        #expect(await eventually {
            nodes[1].transport.send(to: NodeID(1), shard: 2, payload: [2])
            return !nodes[0].inbox.all.isEmpty
        })
        #expect(nodes[0].inbox.all.allSatisfy { $0.shard == 2 && $0.payload == [2] })
        #expect(nodes[1].transport.stats.reconnects >= 1)
        // Too large for the sender's own limit: dropped before queueing, counted.
        nodes[0].transport.send(to: NodeID(2), shard: 1, payload: [UInt8](repeating: 1, count: 1024 - 7))
        #expect(nodes[0].transport.stats.framesDroppedInvalid == 1)
        try await self.stopAll(nodes, group)
    }

    @Test func restartedNodeIsRedialedAndDeliversAgain() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        var (nodes, ports) = try await self.startCluster([1, 2, 3], group: group)
        #expect(await eventually { self.allReachable(nodes) })

        let old = nodes[1]
        await old.transport.stop()
        #expect(old.transport.boundPort == nil)
        #expect(await eventually { !nodes[0].transport.reachable(old.id) && !nodes[2].transport.reachable(old.id) })
        nodes[0].transport.send(to: old.id, shard: 1, payload: [0])
        #expect(nodes[0].transport.stats.framesDroppedDisconnected >= 1)
        do {
            try await old.transport.start()
            Issue.record("a stopped transport restarted")
        } catch let error as PeerTransportError {
            #expect(error == .stopped)
        }

        let port = ports[old.id] ?? 0
        let fresh = makeNode(id: old.id, port: port, peers: ports.filter { $0.key != old.id }, group: group)
        #expect(try await fresh.transport.start() == port)
        nodes[1] = fresh
        #expect(await eventually { self.allReachable(nodes) })

        for sender in nodes {
            for receiver in nodes where receiver.id != sender.id {
                sender.transport.send(to: receiver.id, shard: 9, payload: payload(from: sender.id, seq: 1))
            }
        }
        #expect(await eventually { fresh.inbox.all.count == 2 })
        #expect(await eventually { nodes[0].inbox.from(fresh.id).count == 1 && nodes[2].inbox.from(fresh.id).count == 1 })
        #expect(Set(fresh.inbox.all.map(\.from)) == [NodeID(1), NodeID(3)])
        #expect(nodes[0].transport.stats.reconnects >= 1)
        ports[old.id] = port
        try await self.stopAll(nodes, group)
    }

    @Test func framesQueuedInOneTickAreCoalescedAndTheQueueDropsTheOldest() async throws {
        // One event loop, so sends made on it all land within one tick, before the flush task runs.
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        var configuration = PeerTransportConfiguration()
        configuration.queueFramesMax = 10
        // A link probe queued in the same tick would take a place in the queue (and be counted).
        configuration.probeInterval = .zero
        let (nodes, _) = try await self.startCluster([1, 2], group: group, configuration: { _ in configuration })
        #expect(await eventually { self.allReachable(nodes) })

        let sender = nodes[0].transport
        try await group.next().submit {
            for seq in 0..<100 { sender.send(to: NodeID(2), shard: 1, payload: payload(from: NodeID(1), seq: seq)) }
        }.get()
        #expect(await eventually { nodes[1].inbox.all.count == 10 })
        #expect(nodes[1].inbox.all.map { seq(of: $0.payload) } == (90..<100).map { Optional($0) })
        #expect(sender.stats.framesDroppedQueueFull == 90)
        #expect(sender.stats.framesSent == 10)

        // Unknown destinations (and this node itself) are dropped and counted.
        sender.send(to: NodeID(77), shard: 1, payload: [1])
        sender.send(to: NodeID(1), shard: 1, payload: [1])
        #expect(sender.stats.framesDroppedInvalid == 2)
        try await self.stopAll(nodes, group)
    }

    @Test func startValidatesConfiguration() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let node = makeNode(id: NodeID(1), port: 0, peers: [NodeID(2): 1], secret: [], group: group)
        await #expect(throws: PeerTransportError.invalidConfiguration("cluster secret is empty")) {
            try await node.transport.start()
        }
        let long = makeNode(
            id: NodeID(1), port: 0, peers: [:], cluster: String(repeating: "x", count: 256), group: group)
        await #expect(throws: PeerTransportError.self) { try await long.transport.start() }

        let ok = makeNode(id: NodeID(1), port: 0, peers: [:], group: group)
        let port = try await ok.transport.start()
        #expect(port > 0 && ok.transport.boundPort == port)
        await #expect(throws: PeerTransportError.alreadyStarted) { try await ok.transport.start() }
        await ok.transport.stop()
        await ok.transport.stop()  // idempotent
        try await group.shutdownGracefully()
    }

    /// A route that black-holes a peer's packets (a partition: no reset, no FIN) closes the connection
    /// within `deadLinkTimeout`, so the peer reads as unreachable and requests stop waiting on it; once
    /// the route is back, the link redials. Without the option the connection still looks up long after.
    /// The cut is an iptables rule on loopback dropping TCP to node 2's port (root only).
    @Test(.enabled(if: Firewall.usable), .timeLimit(.minutes(2)))
    func aBlackHoledLinkIsClosedAndRedialedWhenTheRouteIsBack() async throws {
        for timeout in [TimeAmount.seconds(3), .zero] {
            let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
            var configuration = PeerTransportConfiguration()
            configuration.deadLinkTimeout = timeout
            let (nodes, ports) = try await self.startCluster([1, 2], group: group) { _ in configuration }
            #expect(await eventually { self.allReachable(nodes) })
            let port = ports[NodeID(2)] ?? 0
            let rule = ["INPUT", "-i", "lo", "-p", "tcp", "--dport", "\(port)", "-m", "comment", "--comment", "weft-test-dead-link", "-j", "DROP"]
            try Firewall.run(["-I"] + rule)
            // Never left behind by a failed expectation (a second delete fails harmlessly).
            defer { try? Firewall.run(["-D"] + rule) }
            // A frame in flight: never acknowledged while the rule holds.
            nodes[0].transport.send(to: NodeID(2), shard: 1, payload: [1])
            if timeout > .zero {
                #expect(await eventually(within: 20) { !nodes[0].transport.reachable(NodeID(2)) }, "closed within the dead-link timeout")
                try Firewall.run(["-D"] + rule)
                #expect(await eventually(within: 20) { nodes[0].transport.reachable(NodeID(2)) }, "redialed once the route is back")
                nodes[0].transport.send(to: NodeID(2), shard: 1, payload: [2])
                #expect(await eventually { nodes[1].inbox.all.contains { $0.payload == [2] } })
            } else {
                try await Task.sleep(for: .seconds(8))
                #expect(nodes[0].transport.reachable(NodeID(2)), "without the option the dead connection still looks up")
                try Firewall.run(["-D"] + rule)
            }
            try await self.stopAll(nodes, group)
        }
    }

    /// Link probes: a peer cut off both ways turns suspect within about `suspectAfter`, long before the
    /// dead-link timeout closes the connection (the link still reads as reachable meanwhile), `onSuspect`
    /// names it once, and it stops being suspect once the route is back. A cut of one direction is seen
    /// first by the side that hears nothing; the other still gets frames, so it takes its peer for alive
    /// until three times `suspectAfter` pass without an answer. No probe reaches `onFrame` or the frame
    /// counters.
    @Test(.enabled(if: Firewall.usable), .timeLimit(.minutes(2)))
    func aCutOffPeerTurnsSuspectBeforeTheDeadLinkTimeoutAndClearsWhenTheRouteIsBack() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let (nodes, ports, _) = try await self.startProbing(group: group)
        // Probes answered for a while: neither side suspects the other, and none of them was delivered.
        try await Task.sleep(for: .seconds(1.5))
        #expect(!nodes[0].transport.suspect(NodeID(2)) && !nodes[1].transport.suspect(NodeID(1)))
        #expect(nodes.allSatisfy { $0.inbox.all.isEmpty && $0.suspects.withLock { $0 }.isEmpty })
        #expect(nodes.allSatisfy { $0.transport.stats.framesSent == 0 && $0.transport.stats.framesReceived == 0 })

        func rule(_ node: UInt64) -> [String] {
            ["INPUT", "-i", "lo", "-p", "tcp", "--dport", "\(ports[NodeID(node)] ?? 0)", "-m", "comment", "--comment", "weft-test-probes", "-j", "DROP"]
        }
        // Node 2 hears nothing from node 1 (its listening port drops everything); node 1 still hears
        // node 2's probes.
        try Firewall.run(["-I"] + rule(2))
        defer { try? Firewall.run(["-D"] + rule(2)) }
        let cut = ContinuousClock.now
        #expect(await eventually(within: 10) { nodes[1].transport.suspect(NodeID(1)) })
        let quietSeen = ContinuousClock.now - cut
        #expect(await eventually(within: 10) { nodes[0].transport.suspect(NodeID(2)) })
        let unansweredSeen = ContinuousClock.now - cut
        // Heard all along, node 1 holds out for three times as long (800 ms against 2.4 s): a margin
        // wide enough for any scheduling.
        #expect(unansweredSeen > quietSeen, "node 1 hears node 2: \(unansweredSeen) against \(quietSeen)")
        // Both ways.
        try Firewall.run(["-I"] + rule(1))
        defer { try? Firewall.run(["-D"] + rule(1)) }
        #expect(nodes[0].transport.reachable(NodeID(2)) && nodes[1].transport.reachable(NodeID(1)), "still connected: the kernel has not given up")
        #expect(nodes[0].suspects.withLock { $0 } == [NodeID(2)] && nodes[1].suspects.withLock { $0 } == [NodeID(1)])

        try Firewall.run(["-D"] + rule(1))
        try Firewall.run(["-D"] + rule(2))
        #expect(await eventually(within: 20) { !nodes[0].transport.suspect(NodeID(2)) && !nodes[1].transport.suspect(NodeID(1)) })
        nodes[0].transport.send(to: NodeID(2), shard: 1, payload: [7])
        #expect(await eventually { nodes[1].inbox.all.contains { $0.payload == [7] } })
        #expect(nodes[1].inbox.all.allSatisfy { $0.shard != PeerWire.probeShard })
        try await self.stopAll(nodes, group)
    }

    /// A peer that answered probes before is suspect on a new connection that gets nothing back at all
    /// (here: it restarted, and its own link to this node cannot come up), counted from when the
    /// connection came up: before, only a connection that had an answer could turn suspect.
    @Test func aRestartedPeerWhoseLinkBackNeverComesUpTurnsSuspect() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let (nodes, ports, configuration) = try await self.startProbing(group: group)
        try await Task.sleep(for: .seconds(1))
        #expect(!nodes[0].transport.suspect(NodeID(2)))
        // Node 2 restarts on its port, with node 1's address wrong: it accepts node 1's link, sends
        // nothing back.
        await nodes[1].transport.stop()
        let nowhere = try await reservePorts(1, group: group)[0]
        let restarted = makeNode(id: NodeID(2), port: ports[NodeID(2)] ?? 0, peers: [NodeID(1): nowhere], group: group, configuration: configuration)
        _ = try await restarted.transport.start()
        #expect(await eventually(within: 10) { nodes[0].transport.reachable(NodeID(2)) && nodes[0].transport.suspect(NodeID(2)) })
        #expect(nodes[0].suspects.withLock { $0 }.contains(NodeID(2)))
        await restarted.transport.stop()
        try await self.stopAll([nodes[0]], group)
    }
}
