import ClusterConfig
import Foundation
import Logging
import Metrics
import Messaging
import NIOConcurrencyHelpers
import NIOCore
import PeerTransport
import Raft
import Replication
import SegmentStore
import ShardState
import WeftCore

public enum WriteError: Error, Equatable, CustomStringConvertible {
    /// No leader could take the write before the deadline (election in progress, no quorum). Nothing
    /// was written: a retry is safe.
    case unavailable(String)
    /// The request is refused (bad input, a reserved record type, a limit): nothing was written.
    case invalid(String)
    /// Another membership change of the shard is still pending.
    case changePending(String)
    /// The write may or may not have committed (it was proposed or sent, and then the deadline passed, the
    /// answer was lost, or the replica stopped or began repairing its log). Not retried here: a retry
    /// could write it twice (unless it carries a request key: then a retry is always safe).
    case outcomeUnknown(String)
    /// A keyed request whose first attempt a leader change cut short: only some of its records were
    /// written (listed in the message); nothing more is written under that key.
    case partiallyWritten(String)
    /// The shard's state refused it on the leader before anything was written (`code` is the domain's).
    case refused(code: String, message: String)

    public var description: String {
        switch self {
        case .unavailable(let s): "unavailable: \(s)"
        case .invalid(let s): "invalid: \(s)"
        case .changePending(let s): "change pending: \(s)"
        case .outcomeUnknown(let s): "outcome unknown: \(s)"
        case .partiallyWritten(let s): "partially written: \(s)"
        case .refused(let code, let s): "refused (\(code)): \(s)"
        }
    }
}

/// One Weft node: a replica of every shard placed on it, each run by a `ShardRunner`, connected to the
/// other nodes by one `PeerTransport`. Writes go to the shard's leader: proposed locally when this node
/// leads, forwarded over the peer connection otherwise.
public final class WeftNode: Sendable {
    public let id: NodeID
    public let config: ClusterConfiguration
    let runnerBox: NIOLockedValueBox<[ShardID: ShardRunner]>
    /// Shards whose replica could not be opened, with the reason: the node serves the others.
    let failedShards = NIOLockedValueBox<[ShardID: String]>([:])
    let transport: PeerTransport
    let forwarder: Forwarder
    /// Requests passed on for a peer that could not reach their target (`passOn`).
    let viaPassed = Counter(label: "weft_forward_via_total", dimensions: [("role", "passed")])
    /// The shards `announceStopped` named last time (its lock also keeps two announcements, from the
    /// repeat and from a replica failing, from crossing).
    let announcedStopped = NIOLockedValueBox<Set<ShardID>>([])
    /// Per shard, the leader the local replica last knew, and since when it has known none (nil while it
    /// knows one): a replica without a leader for long is cut off from it (`throughLeader`'s `askPeer`).
    let localLeader = NIOLockedValueBox<[ShardID: (last: NodeID?, since: ContinuousClock.Instant?)]>([:])
    /// When a pass-on was last logged, per (from, target).
    let viaLogged = NIOLockedValueBox<[[UInt64]: ContinuousClock.Instant]>([:])
    /// Ships sealed files to followers that need them (catch-up), off the shard threads.
    let shipper: CatchUpShipper
    let started = NIOLockedValueBox(false)
    let openLock = NIOLock()
    let logger: Logger
    /// The threads that drive this node's replicas, and how many replicas each was given.
    let lanes: [DriverLane]
    let laneLoad: NIOLockedValueBox<[Int]>
    /// Last leader heard of per shard, with its term (where forwards go first; `LeaderHints`).
    let leaderHints = NIOLockedValueBox(LeaderHints())
    /// The term of this node's replica's view of each shard's leader: what its not-leader answers carry.
    let viewTerms = NIOLockedValueBox<[ShardID: Term]>([:])
    /// The node a forward for each shard last went unanswered by (paused, cut off): a node without a
    /// replica and without a hint asks another replica first.
    let unanswering = NIOLockedValueBox<[ShardID: NodeID]>([:])
    /// The shards this node's replicas lead, with their terms (announced again every 2 s).
    let leading = NIOLockedValueBox<[ShardID: Term]>([:])
    /// Names applied-index waiters so a read that gives up can drop its waiter.
    let waiterTokens = NIOLockedValueBox<UInt64>(0)
    /// The relay of each shard this node leads.
    let relays = NIOLockedValueBox<[ShardID: RelayRunner]>([:])
    /// Shards found holding conversations of the layout before stop 30 (`checkConversationLayout`).
    let misplacedConversationShards = Counter(label: "weft_messaging_misplaced_conversation_shards_total")
    /// This node's part of the delivery tier (Docs/delivery.md): sessions' hub, acks, presence, typing.
    let delivery: DeliveryTier
    var inboxHub: InboxHub { delivery.hub }
    let deliveryTask = NIOLockedValueBox<Task<Void, Never>?>(nil)
    /// Users' rate-limit buckets this node keeps (Docs/messaging.md, "Rate limits").
    let limiter = RateLimiter()
    /// Set by `stop`: no relay starts after it.
    let stopping = NIOLockedValueBox(false)

    public enum StartError: Error, CustomStringConvertible {
        case placementChanged(path: String, recorded: String, now: String)
        public var description: String {
            switch self {
            case .placementChanged(let path, let recorded, let now):
                "\(path) records the placement this node was created with (\(recorded)), but the configuration now gives \(now): "
                    + "shards would move. Keep [cluster] shards and replication, and list the original nodes in [cluster] founders; "
                    + "new nodes join shards through /api/v1/admin/shards/N/membership"
            }
        }
    }

    public init(config: ClusterConfiguration, node id: NodeID, group: any EventLoopGroup, logger: Logger) throws {
        guard let me = config.node(id) else { throw WriteError.invalid("node \(id) is not in \(config.configPath)") }
        self.id = id
        self.config = config
        self.logger = logger
        try Self.checkPlacement(config, node: id)
        var peers: [NodeID: PeerAddress] = [:]
        for n in config.nodes where n.id != id { peers[n.id] = PeerAddress(host: n.peerAddress.host, port: n.peerAddress.port) }
        let box = NIOLockedValueBox<WeftNode?>(nil)
        transport = PeerTransport(
            self: id, clusterName: Self.handshakeName(config), secret: Array(config.secret.utf8),
            listen: PeerAddress(host: me.peerAddress.host, port: me.peerAddress.port), peers: peers, group: group, logger: logger,
            // Requests whose senders retry safely stop waiting for a peer that went quiet (Docs/transport.md, "Link probes").
            onSuspect: { peer in box.withLockedValue { $0 }?.forwarder.peerSuspect(peer) }
        ) { from, shard, payload in
            box.withLockedValue { $0 }?.receive(from: from, shard: ShardID(shard), payload: payload)
        }
        let t = transport
        let others = config.nodes.map(\.id).filter { $0 != id }
        forwarder = Forwarder(
            selfID: id, reachable: { t.reachable($0) }, suspect: { t.suspect($0) },
            // A partition between this node and the target only: any other peer this node reaches, one
            // that answers its link probes first.
            relay: { target in
                let up = others.filter { $0 != target && t.reachable($0) }
                return up.filter { !t.suspect($0) }.randomElement() ?? up.randomElement()
            },
            send: { to, shard, frame in t.send(to: to, shard: shard.rawValue, payload: frame) })
        shipper = CatchUpShipper(
            logger: logger,
            sendChunk: { shard, to, transfer, name, offset, total, bytes in
                t.send(to: to, shard: shard.rawValue, payload: Envelope.file(transfer: transfer, name: name, offset: offset, total: total, bytes: bytes).encode())
            },
            sendMessage: { shard, m in t.send(to: m.to, shard: shard.rawValue, payload: Envelope.raft(m).encode()) },
            report: { shard, to, transfer, event in
                switch event {
                case .progress: box.withLockedValue { $0 }?.runner(shard)?.submit(.catchUpReport(to: to, transfer: transfer, failed: false))
                case .done: break
                case .failed: box.withLockedValue { $0 }?.runner(shard)?.submit(.catchUpReport(to: to, transfer: transfer, failed: true))
                }
            })
        delivery = DeliveryTier(
            config: config, selfID: id, send: { to, shard, env in t.send(to: to, shard: shard.rawValue, payload: env.encode()) },
            reachable: { t.reachable($0) })
        delivery.hub.forward { [weak delivery] byUser, shard in delivery?.forwardInbox(byUser, shard: shard) }
        runnerBox = NIOLockedValueBox([:])
        let laneCount = max(1, min(config.raft.driverThreads, config.shards))
        let tick = Duration.milliseconds(max(1, config.raft.heartbeatIntervalMs))
        lanes = (0..<laneCount).map { DriverLane(name: "lane-\($0)", tick: tick) }
        laneLoad = NIOLockedValueBox(Array(repeating: 0, count: laneCount))
        box.withLockedValue { $0 = self }
        // One shard's trouble (a damaged file, a replica that cannot open) must not stop the others.
        for shard in config.shards(hostedBy: id) {
            openOrRecordFailure(shard, bootstrap: Membership(voters: Set(config.replicas(of: shard))))
        }
        // Replicas this node gained by joining a shard after start-up live on disk too.
        let dataDir = config.dataDirectory(for: id)
        for name in (try? PosixDisk().list(dataDir)) ?? [] where name.hasPrefix("shard-") {
            guard let n = UInt64(name.dropFirst(6)), n < UInt64(config.shards), runner(ShardID(n)) == nil,
                failedShards.withLockedValue({ $0[ShardID(n)] }) == nil
            else { continue }
            openOrRecordFailure(ShardID(n), bootstrap: nil)
        }
    }

    func openOrRecordFailure(_ shard: ShardID, bootstrap: Membership?) {
        do {
            _ = try openReplica(shard, bootstrap: bootstrap)
        } catch {
            logger.critical("shard \(shard): the replica cannot open, the node serves its other shards: \(error)")
            failedShards.withLockedValue { $0[shard] = "\(error)" }
        }
    }

    /// The peer handshake's cluster name: the configured name and a digest of the placement basis, so that
    /// nodes that would place shards differently refuse each other at the handshake.
    static func handshakeName(_ config: ClusterConfiguration) -> String {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325  // FNV-1a
        for b in config.placementBasis.utf8 {
            h ^= UInt64(b)
            h = h &* 0x0100_0000_01b3
        }
        return String(config.name.prefix(200)) + "#" + String(h, radix: 16)
    }

    /// Records the placement basis at a node's first start (`<data dir>/placement`), and refuses to
    /// start when the configuration would now place shards differently.
    static func checkPlacement(_ config: ClusterConfiguration, node: NodeID) throws {
        let disk = PosixDisk()
        let dir = config.dataDirectory(for: node)
        let path = dir + "/placement"
        let line = config.placementBasis
        if disk.exists(path) {
            let f = try disk.open(path, create: false)
            defer { f.close() }
            let recorded = String(decoding: try f.read(at: 0, count: Int(min(try f.size(), 64 << 10))), as: UTF8.self)
                .trimmingCharacters(in: .whitespacesAndNewlines)
            guard recorded == line else { throw StartError.placementChanged(path: path, recorded: recorded, now: line) }
            return
        }
        try disk.makeDirectory(dir)
        let tmp = path + ".tmp"
        let f = try disk.open(tmp, create: true)
        try f.truncate(to: 0)
        try f.write(Array((line + "\n").utf8), at: 0)
        try f.sync()
        f.close()
        try disk.rename(tmp, to: path)
        try disk.syncDirectory(dir)
    }

    /// Opens this node's replica of `shard` (creating its directory), with `bootstrap` as the initial
    /// group if the shard is new. Starts it if the node is already running.
    func openReplica(_ shard: ShardID, bootstrap: Membership?) throws -> ShardRunner {
        let timing = config.raft
        let tickMs = max(1, timing.heartbeatIntervalMs)
        let durability: Durability =
            switch config.storage.fsync {
            case .everyBatch: .everyBatch
            case .everyBatches(let n): .everyBatches(n)
            case .never: .never
            }
        let dir = config.dataDirectory(for: id) + "/shard-\(shard.rawValue)"
        var shardLogger = logger
        shardLogger[metadataKey: "shard"] = "\(shard)"
        let log = shardLogger
        // The newest snapshot is read and decoded while the log opens (Docs/state.md, "Restart").
        let prefetch = SnapshotPrefetch.start(shardDirectory: dir, machine: MessagingMachine.self)
        let store = try SegmentStore(
            directory: dir,
            options: StoreOptions(shard: shard, segmentBytesMax: config.storage.segmentBytes, durability: durability),
            log: { log.warning("\($0)") })
        let hs = try HardStateFile(path: dir + "/raft.state", disk: PosixDisk())
        var rc = RaftConfig(id: id, seed: UInt64(UInt32.random(in: 0...UInt32.max)))
        rc.heartbeatTicks = 1
        rc.electionTicks = max(2, timing.electionTimeoutMinMs / tickMs)
        let replica = try ShardReplica(
            shard: shard, id: id, store: store, hardState: hs, membershipFile: MembershipFile(directory: dir, disk: PosixDisk()),
            bootstrap: bootstrap, config: rc, machine: MessagingMachine.self, prefetch: prefetch)
        let t = transport
        replica.snapshotEveryRecords = config.storage.snapshotEveryRecords
        let keep = config.storage.retention
        replica.retention = RetentionPolicy(bytesMax: keep.bytesMax, ageMicrosMax: keep.ageSecondsMax.map { Int64($0) * 1_000_000 })
        // Every shard's records feed its relay (on its leader): the raw fan-out to other shards, and
        // messaging's inbox entries to every shard, this one included.
        replica.hasRelays = true
        // A 1:1 message's inbox entries for users homed on its own shard commit with it (Docs/state.md,
        // "Inline relay records").
        replica.inlineRule = WeftRelayRule(shards: config.shards)
        replica.relayFloor = { [weak self] in self?.relays.withLockedValue { $0[shard] }?.lowestMark() }
        // Snapshot files are written on a background queue (PosixDisk keeps no state of its own).
        replica.snapshotsInBackground = true
        replica.log = { log.notice("\($0)") }
        for e in replica.repairEvents { log.warning("\(e)") }
        let ship = shipper
        replica.startCatchUp = { to, transfer, files, snapshot in
            ship.start(shard: shard, to: to, transfer: transfer, files: files, snapshot: snapshot)
        }
        replica.cancelCatchUps = { ship.cancel(shard: shard) }
        let tail = replica.tail
        inboxHub.follow(shard: shard, tail: tail)
        let me = id
        // A replica starts knowing no leader (it reports one when it hears of it): so one opened while
        // cut off from its leader counts as such too.
        localLeader.withLockedValue { $0[shard] = (nil, ContinuousClock.now) }
        replica.onLeaderKnown = { [weak self] leader, term in
            // The local replica's view is the freshest a node has: a hint left pointing at a leader the
            // others replaced (it was paused or cut off) would send writes there until one timed out.
            guard let self else { return }
            self.viewTerms.withLockedValue { $0[shard] = term }
            self.localLeader.withLockedValue { v in
                if let leader {
                    v[shard] = (leader, nil)
                } else if v[shard]?.since == nil {
                    v[shard] = (v[shard]?.last, ContinuousClock.now)
                }
            }
            self.leaderHints.withLockedValue { $0.heard(shard, leader: leader == me ? nil : leader, term: term, local: true) }
            self.leading.withLockedValue { $0[shard] = leader == me ? term : nil }
            if leader == me { self.announceLeadership(shard, term: term) }
        }
        replica.onLeadership = { [weak self, unowned replica] leads in
            // On the shard's thread: the applied retention mark is where the relay's sources start.
            self?.leadershipChanged(shard, leads: leads, tail: tail, startAt: replica.relayStart)
        }
        // The lane with the fewest replicas (placement can give a node shards that share a factor with
        // the lane count, and replicas join later).
        let lane = laneLoad.withLockedValue { load -> DriverLane in
            let k = load.indices.min { load[$0] < load[$1] } ?? 0
            load[k] += 1
            return lanes[k]
        }
        let runner = ShardRunner(
            replica: replica, tick: .milliseconds(tickMs), logger: shardLogger, lane: lane,
            onStorageFailure: { [weak self] why in self?.replicaFailed(shard, why) }
        ) { msgs in
            for m in msgs { t.send(to: m.to, shard: shard.rawValue, payload: Envelope.raft(m).encode()) }
        }
        runnerBox.withLockedValue { $0[shard] = runner }
        if started.withLockedValue({ $0 }) { runner.start() }
        return runner
    }

    func runner(_ shard: ShardID) -> ShardRunner? { runnerBox.withLockedValue { $0[shard] } }

    /// This node's replica of `shard` stopped after a storage failure (a full disk, an I/O error): from
    /// now on the node serves the shard as one without a replica, until it restarts or the operator
    /// reopens the replica (`reopenReplica`) — writes and reads
    /// go to the other replicas, sessions of users homed there get their events forwarded or through the
    /// heads check, and the replica's relay and push work stop (another replica leads). Until stop 27
    /// the node kept sending the shard's requests to its stopped replica, which answered 503 to each.
    func replicaFailed(_ shard: ShardID, _ why: String) {
        failedShards.withLockedValue { $0[shard] = why }
        let removed = runnerBox.withLockedValue { rs -> ShardRunner? in
            defer { rs[shard] = nil }
            return rs[shard]
        }
        guard let removed else { return }
        localLeader.withLockedValue { $0[shard] = nil }
        // Its lane has one replica fewer to drive: a replica reopened or joined later goes to the lane
        // with the fewest again.
        laneLoad.withLockedValue { load in
            if let k = lanes.firstIndex(where: { $0 === removed.lane }), load[k] > 0 { load[k] -= 1 }
        }
        relays.withLockedValue { $0.removeValue(forKey: shard) }?.stop()
        // Catch-ups it was shipping as leader (its files stay readable, but the follower is better
        // served by the new leader).
        shipper.cancel(shard: shard)
        leading.withLockedValue { $0[shard] = nil }
        inboxHub.unfollow(shard: shard)
        announceStopped()
        logger.critical("shard \(shard): this node's replica stopped (\(why)); the node forwards the shard's requests to its other replicas until it restarts or the replica is reopened (POST /api/v1/admin/shards/\(shard.rawValue)/reopen)")
    }
    var allRunners: [ShardID: ShardRunner] { runnerBox.withLockedValue { $0 } }
    /// The shards whose local replica leads (a relay runs for each), ascending.
    var ledShards: [ShardID] { relays.withLockedValue { Array($0.keys) }.sorted() }

    enum ReopenError: Error, CustomStringConvertible {
        case running, notStopped, open(String)
        var description: String {
            switch self {
            case .running: "this node's replica of the shard is running"
            case .notStopped: "this node holds no stopped replica of the shard"
            case .open(let why): "the replica still cannot open: \(why)"
            }
        }
    }

    /// Opens again a replica that stopped after a storage failure (or could not open at start), once the
    /// operator has fixed the cause (freed the disk): its files are checked and repaired as after a crash,
    /// and it catches up from the others (`POST /api/v1/admin/shards/{shard}/reopen`). Until stop 27 only
    /// a restart of the node did this.
    func reopenReplica(_ shard: ShardID) throws(ReopenError) {
        let result: Result<Void, ReopenError> = openLock.withLock {
            if runner(shard) != nil { return .failure(.running) }
            guard failedShards.withLockedValue({ $0[shard] }) != nil else { return .failure(.notStopped) }
            let placed = config.replicas(of: shard).contains(id)
            do {
                _ = try openReplica(shard, bootstrap: placed ? Membership(voters: Set(config.replicas(of: shard))) : nil)
            } catch {
                failedShards.withLockedValue { $0[shard] = "\(error)" }
                return .failure(.open("\(error)"))
            }
            failedShards.withLockedValue { $0[shard] = nil }
            return .success(())
        }
        try result.get()
        logger.notice("shard \(shard): the replica was opened again (operator)")
    }

    /// A Raft message for a shard this node has no replica of: a leader is adding this node to the
    /// shard's group. Open an empty replica (no group: it cannot campaign) and let it catch up.
    func joinReplica(_ shard: ShardID) -> ShardRunner? {
        guard shard.rawValue < UInt64(config.shards) else { return nil }
        // One opener at a time, so two messages racing for a new shard open it once.
        return openLock.withLock {
            if let r = runner(shard) { return r }
            do {
                let r = try openReplica(shard, bootstrap: nil)
                logger.notice("shard \(shard): joining (a leader sent entries to this node)")
                return r
            } catch {
                logger.error("shard \(shard): cannot open a replica to join: \(error)")
                return nil
            }
        }
    }

    public var shards: [ShardID] { allRunners.keys.sorted() }

    public func start() async throws {
        try await transport.start()
        let rs = runnerBox.withLockedValue { rs in
            started.withLockedValue { $0 = true }
            return rs
        }
        for r in rs.values { r.start() }
        // A replica counts as knowing no leader from now, not from when it opened (a slow start between
        // the two is not a cut; the first node of a cluster started node by node still announces its
        // shards until a leader is elected, which is harmless: it says `replicaServing` then).
        let now = ContinuousClock.now
        localLeader.withLockedValue { v in
            for (shard, entry) in v where entry.since != nil { v[shard] = (entry.last, now) }
        }
        let tier = delivery
        deliveryTask.withLockedValue { $0 = Task { [weak self] in if let self { await tier.run(node: self) } } }
        reannounce()
        watchUnserved()
        Task { [weak self] in
            try? await Task.sleep(for: Self.layoutCheckAfter)
            await self?.checkConversationLayout()
        }
        logger.info("node \(id) up: \(rs.count) shards, peer \(transport.listenAddress)")
    }

    public func stop() async {
        stopping.withLockedValue { $0 = true }
        inboxHub.stop()
        deliveryTask.withLockedValue { $0?.cancel() }
        for r in relays.withLockedValue({ rs in defer { rs = [:] }; return Array(rs.values) }) { r.stop() }
        shipper.stop()
        // Every replica stops after its current turn; then one shared wait (a lane stuck in a slow
        // fdatasync costs the node `stopWaitMax` once, not once per replica on it).
        let rs = Array(allRunners.values)
        for r in rs { r.requestStop() }
        let end = Date(timeIntervalSinceNow: Double(ShardRunner.stopWaitMax.components.seconds))
        for r in rs where !r.waitStopped(until: end) {
            logger.error("a replica did not finish its turn within \(ShardRunner.stopWaitMax); not waiting longer")
            break
        }
        forwarder.close()
        await transport.stop()
    }

    // MARK: Peer frames

    func receive(from: NodeID, shard: ShardID, payload: [UInt8]) {
        let env: Envelope
        do {
            env = try Envelope.decode(payload)
        } catch {
            logger.warning("dropping frame from node \(from) for shard \(shard): \(error)")
            return
        }
        switch env {
        case .raft(let m):
            guard m.to == id, m.from == from else {
                logger.warning("dropping raft message from node \(from) addressed \(m.from)->\(m.to)")
                return
            }
            if let r = runner(shard) {
                r.submit(.message(m))
            } else if m.kind == .append || m.kind == .heartbeat, failedShards.withLockedValue({ $0[shard] }) == nil, let r = joinReplica(shard) {
                r.submit(.message(m))
            }
        case .file(let transfer, let name, let offset, _, let bytes):
            let t = transport
            runner(shard)?.submit(
                .stageFile(transfer: transfer, name: name, offset: offset, bytes: bytes) { received, ok in
                    guard let received else { return }
                    t.send(to: from, shard: shard.rawValue, payload: Envelope.fileAck(transfer: transfer, name: name, received: received, ok: ok).encode())
                })
        case .fileAck(let transfer, let name, let received, let ok):
            shipper.acknowledge(shard: shard, from: from, transfer: transfer, name: name, received: received, ok: ok)
        case .forwardKeyed(let request, let key, let proposals):
            guard let (runner, ps, reply) = takeForwarded(proposals, request: request, from: from, shard: shard) else { return }
            let me = id
            // The forwarding node waits at most its own deadline (5 s by default) for the answer.
            runner.submit(.proposeKeyed(key, ps, deadline: ContinuousClock.now + .seconds(5)) { reply(Self.keyedAnswer($0, me: me)) })
        case .relayBatch(let request, let header, let proposals):
            guard let (runner, ps, reply) = takeForwarded(proposals, request: request, from: from, shard: shard, allowed: { $0.isRelayWritable }) else { return }
            let me = id
            runner.submit(.proposeRelayBatch(header, ps, deadline: ContinuousClock.now + .seconds(5)) { reply(Self.relayAnswer($0, me: me)) })
        case .forwardMessaging(let request, let key, let proposals):
            guard let (runner, ps, reply) = takeForwarded(proposals, request: request, from: from, shard: shard, allowed: { $0 == .messaging }) else { return }
            let me = id
            if key.isEmpty {
                runner.submit(.propose(ps) { reply(Self.answer($0, me: me, Self.refs)) })
            } else {
                runner.submit(.proposeKeyed(key, ps, deadline: ContinuousClock.now + .seconds(5)) { reply(Self.keyedAnswer($0, me: me)) })
            }
        case .stateQuery(let request, let c, let q):
            answerStateQuery(request, from: from, shard: shard, consistency: c, query: q)
        case .readForward(let request, let c, let q):
            answerRead(request, from: from, shard: shard, consistency: c, query: q)
        case .rateTake(let request, let user, let kind, let perMinute):
            let reply = replier(to: from, shard: shard, request: request)
            guard let k = RateLimiter.Kind(rawValue: kind) else { return reply(.invalid("rate kind \(kind)")) }
            let wait = limiter.takeLocal(k, user: user, perMinute: Int(perMinute))
            reply(wait.map { .refused(code: "rate_limited", message: "\($0)") } ?? .ok([]))
        case .readIndex(let request):
            guard let runner = runnerOrRefuse(shard, request: request, from: from) else { return }
            let reply = replier(to: from, shard: shard, request: request)
            let me = id
            runner.submit(.readIndex { reply(Self.answer($0, me: me) { [RecordRef(index: $0, term: 0, stream: .none, seq: 0)] }) })
        case .configChange(let request, let change):
            guard let runner = runnerOrRefuse(shard, request: request, from: from) else { return }
            let reply = replier(to: from, shard: shard, request: request)
            let me = id
            runner.submit(.configChange(change) { reply(Self.answer($0, me: me) { [RecordRef(index: $0, term: 0, stream: .none, seq: 0)] }) })
        case .forward(let request, let proposals):
            guard let (runner, ps, reply) = takeForwarded(proposals, request: request, from: from, shard: shard) else { return }
            let me = id
            runner.submit(.propose(ps) { reply(Self.answer($0, me: me, Self.refs)) })
        case .answer(let request, let answer):
            forwarder.receive(request, answer, from: from)
        case .via(let request, let target, let withinMillis, let inner):
            passOn(request, to: target, within: .milliseconds(Int64(withinMillis)), inner: inner, from: from, shard: shard)
        case .presence(let on, let users):
            // Only users whose directory is this node (a peer's mistake or malice goes no further).
            let mine = users.filter { Ids.isUserID($0) && delivery.directoryNodes(of: $0).contains(id) }
            delivery.directory.note(mine, node: from, on: on)
        case .typing(let sender, let to, let route):
            delivery.typing(from: sender, to: to, route: route)
        case .inbox(let records):
            // A replica cut off from its leader applies nothing: records forwarded by the others serve
            // this node's sessions meanwhile (`announceStopped`).
            delivery.hub.remote(delivery.acceptForwarded(records, from: from, shard: shard, holdsReplica: servesSessions(shard)))
        case .leader(let term):
            noteLeader(shard, from: from, term: term)
        case .replicaStopped:
            if shard.rawValue < UInt64(config.shards) { delivery.noteStopped(shard, node: from) }
        case .replicaServing:
            if shard.rawValue < UInt64(config.shards) { delivery.noteServing(shard, node: from) }
        }
    }

    // MARK: Writes

    /// Appends records to a shard through its leader; returns where each landed once committed.
    /// Retries through elections until `timeout` passes (only while nothing can have been written).
    public func append(shard: ShardID, _ proposals: [Proposal], timeout: Duration = .seconds(5)) async throws -> [RecordRef] {
        try await withCheckedThrowingContinuation { c in
            append(shard: shard, proposals, timeout: timeout) { c.resume(with: $0) }
        }
    }

    /// Callback form of `append` (no task per request: the append stream runs thousands at once).
    /// `done` runs exactly once: on this thread for a refused request, else on whichever thread the
    /// answer arrives on (a shard's driver lane, a network loop, the deadline timer); it must not block.
    public func append(
        shard: ShardID, _ proposals: [Proposal], timeout: Duration = .seconds(5),
        done: @escaping @Sendable (Result<[RecordRef], WriteError>) -> Void
    ) {
        guard !proposals.isEmpty else { return done(.success([])) }
        if let refusal = Self.refusal(proposals) ?? fanoutRefusal(proposals) { return done(.failure(refusal)) }
        let me = id
        throughLeader(
            shard, deadline: ContinuousClock.now + timeout,
            envelope: {
                Envelope.forward(
                    request: Envelope.RequestID(incarnation: 0, sequence: 0),
                    proposals: Envelope.forwarded(proposals))
            },
            local: { runner, deadline, finish in
                Self.untilDeadline(deadline, late: .outcomeUnknown("proposed on node \(me), not committed before the deadline"), finish) { finish in
                    runner.submit(.propose(proposals) { finish(Self.answer($0, me: me, Self.refs)) })
                }
            }, done: done)
    }

    /// Appends records under a client's request key (1...64 bytes): written once however often it is
    /// sent, on whichever node, across leader changes; a retry gets the first attempt's places
    /// (`replayed`). An unknown outcome is retried here until `timeout` (safe with a key).
    public func appendKeyed(
        shard: ShardID, key: [UInt8], _ proposals: [Proposal], timeout: Duration = .seconds(5),
        done: @escaping @Sendable (Result<Written, WriteError>) -> Void
    ) {
        guard !key.isEmpty, key.count <= RequestWindow.keyBytesMax else {
            return done(.failure(.invalid("a request key has 1...\(RequestWindow.keyBytesMax) bytes")))
        }
        guard !proposals.isEmpty else { return done(.success(Written(refs: [], replayed: false))) }
        guard proposals.count <= RequestWindow.keyedRecordsMax else {
            return done(.failure(.invalid("a request with an Idempotency-Key has at most \(RequestWindow.keyedRecordsMax) records")))
        }
        if let refusal = Self.refusal(proposals) ?? fanoutRefusal(proposals) { return done(.failure(refusal)) }
        let me = id
        throughLeader(
            shard, deadline: ContinuousClock.now + timeout, retryUnknown: true,
            envelope: {
                Envelope.forwardKeyed(
                    request: Envelope.RequestID(incarnation: 0, sequence: 0), key: key,
                    proposals: Envelope.forwarded(proposals))
            },
            local: { runner, deadline, finish in
                Self.untilDeadline(deadline, late: .outcomeUnknown("proposed on node \(me), not committed before the deadline"), finish) { finish in
                    runner.submit(.proposeKeyed(key, proposals, deadline: deadline) { finish(Self.keyedAnswer($0, me: me)) })
                }
            }, done: done)
    }

    public func appendKeyed(shard: ShardID, key: [UInt8], _ proposals: [Proposal], timeout: Duration = .seconds(5)) async throws -> Written {
        try await withCheckedThrowingContinuation { c in
            appendKeyed(shard: shard, key: key, proposals, timeout: timeout) { c.resume(with: $0) }
        }
    }

    static func relayAnswer(_ r: Result<RelayResult, ReplicationError>, me: NodeID) -> Envelope.ForwardAnswer {
        switch r {
        case .success(.written(let m)): .relay(kind: 0, mark: m)
        case .success(.alreadyApplied(let m)): .relay(kind: 1, mark: m)
        case .success(.stale(let m)): .relay(kind: 2, mark: m)
        case .failure(let e): answer(.failure(e), me: me) { (_: [RecordRef]) in [] }
        }
    }

    /// Sends a relay batch to `destination`'s leader (Docs/state.md, "Relays"); any failure is reported
    /// as `unavailable` (the relay resends, and the destination's mark decides what is written).
    func relayBatch(
        to destination: ShardID, _ header: RelayMarks.Header, _ proposals: [Proposal],
        done: @escaping @Sendable (Result<RelayResult, ReplicationError>) -> Void
    ) {
        let me = id
        throughLeader(
            destination, deadline: ContinuousClock.now + .seconds(5), retryUnknown: false, resent: true,
            envelope: {
                .relayBatch(
                    request: Envelope.RequestID(incarnation: 0, sequence: 0), header: header,
                    proposals: Envelope.forwarded(proposals))
            },
            local: { runner, deadline, finish in
                Self.untilDeadline(deadline, late: .outcomeUnknown("relay batch on node \(me), not committed before the deadline"), finish) { finish in
                    runner.submit(.proposeRelayBatch(header, proposals, deadline: deadline) { finish(Self.relayAnswer($0, me: me)) })
                }
            },
            done: { r in
                switch r {
                case .success(let w):
                    if let relay = w.relay { done(.success(relay)) } else { done(.failure(.unavailable("shard \(destination) gave no relay answer"))) }
                case .failure(let e):
                    done(.failure(.unavailable("\(e)")))
                }
            })
    }

    /// This node's replica of `shard` started or stopped leading: the shard's relay runs on its leader.
    func leadershipChanged(_ shard: ShardID, leads: Bool, tail: ShardTail, startAt: LogIndex) {
        let old = relays.withLockedValue { $0.removeValue(forKey: shard) }
        old?.stop()
        guard leads, !stopping.withLockedValue({ $0 }) else { return }
        let destinations = config.shardIDs
        let runner = RelayRunner(source: shard, tail: tail, destinations: destinations, rule: WeftRelayRule(shards: config.shards), startAt: startAt) {
            [weak self] d, h, ps, done in
            guard let self else { return done(.failure(.stopped)) }
            self.relayBatch(to: d, h, ps, done: done)
        }
        let logger = self.logger
        runner.log = { logger.warning("\($0)") }
        relays.withLockedValue { $0[shard] = runner }
        runner.start()
    }

    /// Tells the other nodes that this node now leads `shard` in `term`: those without a replica learn of
    /// leaders from nothing else but answers and timeouts (Docs/replication.md, "Forwarding"); those
    /// with one ignore it (placement can change, so it goes to every peer). Not answered; a frame lost,
    /// or dropped because the peer was not connected, is made up by the repeat every
    /// `announceInterval` (`reannounce`).
    func announceLeadership(_ shard: ShardID, term: Term) {
        let frame = Envelope.leader(term: term).encode()
        for n in config.nodes.map(\.id) where n != id {
            transport.send(to: n, shard: shard.rawValue, payload: frame)
        }
    }

    static let announceInterval = Duration.seconds(2)

    /// Tells every peer which shards this node is placed on but holds no replica of that serves its
    /// sessions: one stopped after a storage failure or that could not open, or one that has known no
    /// leader for a long while (`leaderlessLong`: cut off from the leader by a partition the others do not
    /// share, so it applies nothing). Their replicas then forward the inbox records of this node's
    /// sessions' users here (`DeliveryTier.forwardInbox`). Repeated with the leader announcements; a
    /// receiver forgets it after `DeliveryTier.stoppedValidFor` without a repeat.
    ///
    /// A shard announced before and not now (the replica heard its leader again, or was reopened) is
    /// announced as served once (`replicaServing`), so the others stop forwarding at once instead of
    /// `DeliveryTier.stoppedValidFor` later. Both go to the shard's other replicas only (other nodes
    /// ignore them).
    func announceStopped(onlyChanged: Bool = false) {
        // Worked out and sent under one lock: a repeat that looked before a replica failed must not
        // follow that failure's announcement with a `replicaServing`.
        announcedStopped.withLockedValue { before in
            let now = unservedShards()
            if onlyChanged && now == before { return }
            // A shard newly unserved: its other replicas forward to this node from now on, by their
            // presence directories. One that restarted lately lists none of this node's sessions until
            // the 30 s refresh, so they hear them again first (the same connection, ahead of the
            // announcement, so the backlog it draws finds them).
            let newly = now.subtracting(before)
            // Rare, and what a slow push during a partition is traced by: one line each way.
            for shard in newly.sorted() {
                logger.notice("shard \(shard): this node's replica does not serve its sessions (stopped, or cut off from the leader); the other replicas forward its users' inbox records here")
            }
            for shard in before.subtracting(now).sorted() {
                logger.notice("shard \(shard): this node's replica serves its sessions again")
            }
            if !newly.isEmpty {
                let users = delivery.hub.users.filter { newly.contains(Ids.homeShard($0, shards: config.shards)) }
                if !users.isEmpty { delivery.announce(users, on: true) }
            }
            for (shard, frame) in now.map({ ($0, Envelope.replicaStopped) }) + before.subtracting(now).map({ ($0, Envelope.replicaServing) }) {
                let bytes = frame.encode()
                for n in config.replicas(of: shard) where n != id { transport.send(to: n, shard: shard.rawValue, payload: bytes) }
            }
            before = now
        }
    }

    /// The shards this node is placed on whose replica does not serve its sessions: stopped, or cut off
    /// from the leader (`leaderlessLong`).
    func unservedShards() -> Set<ShardID> {
        let placed = Set(config.shardIDs.filter { config.replicas(of: $0).contains(id) })
        let stopped = failedShards.withLockedValue { Array($0.keys) }.filter { placed.contains($0) && runner($0) == nil }
        let cutOff = allRunners.keys.filter { placed.contains($0) && leaderlessLong($0) }
        return Set(stopped + cutOff)
    }

    static let unservedCheckInterval = Duration.milliseconds(250)

    /// How long after start the conversation layout is checked (the replicas have replayed their logs
    /// and mostly caught up by then).
    static let layoutCheckAfter = Duration.seconds(10)

    /// Looks once, in each local replica's state, for a conversation placed by a version before stop 30
    /// (by a hash of the pair, where this version never looks: Docs/messaging.md, upgrade note). Each
    /// shard holding one is logged as critical, naming the pair, and counted
    /// (`weft_messaging_misplaced_conversation_shards_total`). Nothing is moved or refused: the data stays
    /// as it was for an operator to decide. Returns the shards found.
    @discardableResult
    func checkConversationLayout() async -> [ShardID] {
        var found: [ShardID] = []
        let shards = config.shards
        for shard in allRunners.keys.sorted() {
            let result = await query(shard: shard, consistency: .local, timeout: .seconds(5)) { m, _ in m.misplacedPair(shard: shard, shards: shards) }
            guard case .success(let pair?) = result else { continue }
            found.append(shard)
            misplacedConversationShards.increment()
            logger.critical(
                "shard \(shard) holds the conversation of users \(pair.0) and \(pair.1), which this version looks for on shard \(Ids.pairShard(pair.0, pair.1, shards: shards)): data written before stop 30 (conversations placed by a hash of the pair). Its messages and contacts are not found by this version; there is no migration (Docs/messaging.md, upgrade note)"
            )
        }
        return found
    }

    /// Announces a replica that turned cut off (or heard its leader again) within
    /// `unservedCheckInterval` of it, not at the next 2 s repeat: the others start forwarding this
    /// node's sessions' inbox records (and the backlog since the cut, `DeliveryTier.noteStopped`) up to
    /// 2 s sooner. Sends nothing while nothing changed.
    func watchUnserved() {
        guard !stopping.withLockedValue({ $0 }) else { return }
        announceStopped(onlyChanged: true)
        _ = Deadlines.shared.schedule(ContinuousClock.now + Self.unservedCheckInterval) { [weak self] in self?.watchUnserved() }
    }

    /// Repeats the announcements of the shards this node leads, every `announceInterval` while it runs.
    func reannounce() {
        guard !stopping.withLockedValue({ $0 }) else { return }
        for (shard, term) in leading.withLockedValue({ $0 }) { announceLeadership(shard, term: term) }
        announceStopped()
        _ = Deadlines.shared.schedule(ContinuousClock.now + Self.announceInterval) { [weak self] in self?.reannounce() }
    }

    /// A peer says it leads `shard` in `term`. Taken only by a node without a replica of the shard (one
    /// with a replica follows its own replica's view), and only when the term is not older than the
    /// newest announced so far (announcements from different nodes can arrive out of order; the check
    /// and the hint change under one lock, so two racing announcements cannot leave the older one).
    func noteLeader(_ shard: ShardID, from: NodeID, term: Term) {
        guard shard.rawValue < UInt64(config.shards), runner(shard) == nil else { return }
        leaderHints.withLockedValue { $0.heard(shard, leader: from, term: term) }
    }

    /// The relays this node runs (one per shard it leads), with their lag per destination.
    public var relayStatus: [(source: ShardID, lanes: [RelayRunner.LaneStatus])] {
        relays.withLockedValue { rs in rs.keys.sorted { $0.rawValue < $1.rawValue }.compactMap { s in rs[s].map { (s, $0.status()) } } }
    }

    static func keyedAnswer(_ r: Result<KeyedResult, ReplicationError>, me: NodeID) -> Envelope.ForwardAnswer {
        switch r {
        case .success(let k):
            let refs = k.landed.map { RecordRef(index: $0.index, term: $0.term, stream: $0.stream, seq: $0.seq, outcome: $0.outcome) }
            if !k.complete { return .partial(refs, count: k.count) }
            return k.replayed ? .replayed(refs) : .ok(refs)
        case .failure(let e):
            return answer(.failure(e), me: me) { (_: [RecordRef]) in [] }
        }
    }

    /// A fan-out record must name 1...1024 (shard, stream) destinations of this cluster, streams > 0.
    func fanoutRefusal(_ proposals: [Proposal]) -> WriteError? {
        for (k, p) in proposals.enumerated() where p.type == .fanout {
            guard let (destinations, _) = FanoutRule.parse(p.payload) else {
                return .invalid("record \(k): a fanout payload is u16 n (1...\(FanoutRule.destinationsMax)) | n × (u64 shard | u64 stream > 0) | body")
            }
            if let bad = destinations.first(where: { $0.shard.rawValue >= UInt64(config.shards) }) {
                return .invalid("record \(k): fanout to shard \(bad.shard), shards are 0..<\(config.shards)")
            }
        }
        return nil
    }

    /// Why an append is refused before anything is sent (nil: it may go).
    static func refusal(_ proposals: [Proposal]) -> WriteError? {
        guard proposals.count <= Limits.appendBatchCountMax else { return .invalid("at most \(Limits.appendBatchCountMax) records per append") }
        for p in proposals {
            guard p.payload.count <= Limits.recordPayloadBytesMax else {
                return .invalid("payload of \(p.payload.count) bytes, limit \(Limits.recordPayloadBytesMax)")
            }
            guard p.type.isClientWritable else { return .invalid("record type \(p.type.rawValue) is reserved for the system") }
        }
        return nil
    }

    /// Runs a request on the shard's leader: locally when this node leads (or may: no hint yet), else
    /// forwarded to the leader it knows; follows `not leader` answers and retries through elections
    /// until `deadline`, as long as nothing can have been written. An answer that says the request may
    /// have been written (`outcomeUnknown`) ends it at once, as does a refusal. `envelope` builds the
    /// frame a forward sends (only when one is needed); `done` runs exactly once.
    func throughLeader(
        _ shard: ShardID, deadline: ContinuousClock.Instant, lastError: String = "no leader", envelope: @escaping @Sendable () -> Envelope,
        local run: @escaping @Sendable (ShardRunner, ContinuousClock.Instant, @escaping @Sendable (Envelope.ForwardAnswer) -> Void) -> Void,
        done: @escaping @Sendable (Result<[RecordRef], WriteError>) -> Void
    ) {
        throughLeader(shard, deadline: deadline, lastError: lastError, retryUnknown: false, envelope: envelope, local: run) { done($0.map(\.refs)) }
    }

    /// What a write through the leader gave: where its records are, and whether they were written by an
    /// earlier attempt with the same request key (nothing was written now).
    public struct Written: Sendable, Equatable {
        public var refs: [RecordRef]
        public var replayed: Bool
        /// A relay batch's answer (nil for other writes).
        public var relay: RelayResult? = nil
    }

    /// `throughLeader` with the whole answer. `retryUnknown`: an answer that the outcome is unknown is
    /// retried too (safe only for a keyed request: the retry cannot write it twice).
    /// `lastUnknown`: the last attempt's outcome was unknown (then so is the request's, at the deadline).
    /// `askPeer`: this attempt goes to another replica even with no leader known here (the local
    /// replica said it knows none: one cut off from the leader alone learns it from a peer this way).
    /// `resent`: the caller sends the request again after an unknown outcome (a relay batch). A forward
    /// that `retryUnknown` or `resent` makes safe to repeat stops waiting once its node goes quiet
    /// (`Forwarder.peerSuspect`).
    func throughLeader(
        _ shard: ShardID, deadline: ContinuousClock.Instant, lastError: String = "no leader", lastUnknown: Bool = false, retryUnknown: Bool,
        resent: Bool = false, askPeer: Bool = false,
        envelope: @escaping @Sendable () -> Envelope,
        local run: @escaping @Sendable (ShardRunner, ContinuousClock.Instant, @escaping @Sendable (Envelope.ForwardAnswer) -> Void) -> Void,
        done: @escaping @Sendable (Result<Written, WriteError>) -> Void
    ) {
        guard ContinuousClock.now < deadline else {
            return done(.failure(lastUnknown ? .outcomeUnknown("shard \(shard): \(lastError)") : .unavailable("shard \(shard): \(lastError)")))
        }
        let again: @Sendable (String, Bool, Duration?, Bool) -> Void = { [self] why, unknown, pause, askPeer in
            guard let pause else {
                return throughLeader(
                    shard, deadline: deadline, lastError: why, lastUnknown: unknown, retryUnknown: retryUnknown, resent: resent, askPeer: askPeer,
                    envelope: envelope, local: run, done: done)
            }
            // Not before the pause, nor past the deadline (then the last error is the answer).
            let at = min(ContinuousClock.now + pause, deadline)
            _ = Deadlines.shared.schedule(at) { [self] in
                throughLeader(
                    shard, deadline: deadline, lastError: why, lastUnknown: unknown, retryUnknown: retryUnknown, resent: resent, askPeer: askPeer,
                    envelope: envelope, local: run, done: done)
            }
        }
        // Where this attempt goes: the local replica when it leads or no leader is known, else the hinted
        // leader, else (no replica here) a replica of the shard, passing over one that just left a
        // forward unanswered.
        let hint = leaderHints.withLockedValue { $0.leader(of: shard) }
        let local = runner(shard)
        // A peer is asked only when this node's replica has known no leader for long (`askPeer`): a
        // reachable one, the leader the replica last knew last (it may be paused, its link still open).
        // The last leader goes last (it may know a newer one, and a stale answer naming itself is not
        // taken below while it is reachable).
        var askable: [NodeID] = []
        if askPeer && hint == nil {
            let lastLeader = localLeader.withLockedValue { $0[shard]?.last }
            askable = config.replicas(of: shard).filter { $0 != id && transport.reachable($0) }
            askable.sort { ($0 == lastLeader ? 1 : 0) < ($1 == lastLeader ? 1 : 0) }
        }
        let peerToAsk = !askable.isEmpty
        let runsLocally = (hint == nil || hint == id) && local != nil && !peerToAsk
        let target: NodeID? =
            runsLocally
            ? nil
            : hint.flatMap { $0 == id ? nil : $0 }
                ?? {
                    let suspect = unanswering.withLockedValue { $0[shard] }
                    if peerToAsk { return askable.first(where: { $0 != suspect }) ?? askable.first }
                    let others = config.replicas(of: shard).filter { $0 != id }
                    let reachable = others.filter { transport.reachable($0) }
                    return reachable.first(where: { $0 != suspect }) ?? reachable.first ?? others.first
                }()
        // Forgets the hint after a failed attempt, unless it was replaced meanwhile (by the replica's
        // view or an announcement): that newer one stays.
        let forgetHint: @Sendable () -> Void = { [self] in
            leaderHints.withLockedValue { $0.forget(shard, target) }
        }
        let handle: @Sendable (Envelope.ForwardAnswer) -> Void = { [self] answer in
            if let target {
                switch answer {
                case .outcomeUnknown: unanswering.withLockedValue { $0[shard] = target }
                // Not necessarily from the target (it may not have been sent): no news of it.
                case .failed: break
                default: unanswering.withLockedValue { if $0[shard] == target { $0[shard] = nil } }
                }
            }
            switch answer {
            case .ok(let refs):
                done(.success(Written(refs: refs, replayed: false)))
            case .replayed(let refs):
                done(.success(Written(refs: refs, replayed: true)))
            case .relay(let kind, let mark):
                let r: RelayResult = kind == 0 ? .written(mark: mark) : kind == 1 ? .alreadyApplied(mark: mark) : .stale(mark: mark)
                done(.success(Written(refs: [], replayed: false, relay: r)))
            case .partial(let refs, let count):
                let at = refs.map { "\($0.index)" }.joined(separator: ",")
                done(.failure(.partiallyWritten("shard \(shard): a leader change cut the first attempt short: \(refs.count) of \(count) records were written (indexes \(at)); nothing more is written under this key")))
            case .notLeader(let l, let term):
                // A view older than the one held is not taken (an answer computed before a leader change
                // this node already knows of); a local answer is of this node's replica's view.
                let seen = term > 0 ? term : viewTerms.withLockedValue { $0[shard] ?? 0 }
                let named = l == id ? nil : l
                // The answer of a peer asked because the local replica has known no leader for long: a
                // leader it names is taken only when this node cannot reach it (the cut this is for). One
                // this node reaches would have been heard by the local replica: a stale view (a leader
                // paused, or going), not a place to send the write. One whose link is up but suspect is
                // as cut off (the kernel has not closed the link yet): taken, and the write goes through
                // a third node, which refuses it at once if the leader is quiet there too (a pause).
                if peerToAsk, let named, transport.reachable(named), !transport.suspect(named) {
                    return again("leader is node \(named), which this node's replica does not hear from", false, .milliseconds(200), false)
                }
                let taken = leaderHints.withLockedValue { h -> Bool in
                    h.heard(shard, leader: named, term: seen, local: target == nil)
                    return h.leader(of: shard) == named
                }
                // No leader named, or one this node knows to be stale: the views are still settling, so
                // wait a little rather than ask the same place again at once.
                // The local replica knows no leader: the next attempt asks a peer, which may (this node
                // can be cut off from the leader alone; the peer's answer names it, and the write goes
                // there through a node that reaches it). Then the local replica again, and so on.
                again(l.map { "leader is node \($0)" } ?? "no leader", false, l == nil || !taken ? .milliseconds(20) : nil, target == nil && l == nil && leaderlessLong(shard))
            case .failed(let why):
                forgetHint()
                again(why, false, .milliseconds(20), false)
            case .invalid(let why):
                done(.failure(.invalid(why)))
            case .refused(let code, let message):
                done(.failure(.refused(code: code, message: message)))
            case .bytes:
                // Only state queries and forwarded reads are answered with bytes: a peer that answers a
                // write so is broken; nothing can be said about the write.
                done(.failure(.outcomeUnknown("shard \(shard): a malformed answer")))
            case .changePending(let why):
                done(.failure(.changePending("shard \(shard): \(why)")))
            case .outcomeUnknown(let why):
                // The hinted node did not answer in time (stopped, paused, cut off): forget it, or every
                // later write would be sent there too and time out, even after the others elected a new
                // leader (stop 24: a SIGSTOPped leader stopped all writes through the other nodes until
                // something else refreshed the hint).
                forgetHint()
                if retryUnknown {
                    // Keyed: asking again cannot write it twice, and learns what happened.
                    again(why, true, .milliseconds(20), false)
                } else {
                    done(.failure(.outcomeUnknown("shard \(shard): \(why)")))
                }
            }
        }
        if runsLocally, let local {
            run(local, deadline, handle)
        } else if let target {
            forwarder.send(to: target, shard: shard, envelope(), deadline: deadline, failFast: retryUnknown || resent, done: handle)
        } else {
            done(.failure(.invalid("shard \(shard) has no replica this node knows")))
        }
    }

    /// Starts an operation that answers through `finish`, and waits for the first of its answer and
    /// `deadline` (then `late`). A late answer is dropped.
    static func untilDeadline<T: Sendable>(
        _ deadline: ContinuousClock.Instant, late: T, _ start: (@escaping @Sendable (T) -> Void) -> Void
    ) async -> T {
        await withCheckedContinuation { (c: CheckedContinuation<T, Never>) in
            untilDeadline(deadline, late: late, { c.resume(returning: $0) }, start)
        }
    }

    /// Callback form of `untilDeadline`: `done` gets the first of the operation's answer and `late` at
    /// `deadline`, exactly once.
    static func untilDeadline<T: Sendable>(
        _ deadline: ContinuousClock.Instant, late: T, _ done: @escaping @Sendable (T) -> Void, _ start: (@escaping @Sendable (T) -> Void) -> Void
    ) {
        let once = NIOLockedValueBox<(done: Bool, timer: UInt64?)>((false, nil))
        let finish: @Sendable (T) -> Void = { v in
            let timer = once.withLockedValue { s -> UInt64?? in
                guard !s.done else { return nil }
                s.done = true
                return .some(s.timer)
            }
            guard let timer else { return }
            if let t = timer { Deadlines.shared.cancel(t) }
            done(v)
        }
        let t = Deadlines.shared.schedule(deadline) { finish(late) }
        let alreadyDone = once.withLockedValue { s -> Bool in
            s.timer = t
            return s.done
        }
        if alreadyDone { Deadlines.shared.cancel(t) }
        start(finish)
    }

    /// The answer a replica's result becomes, on the wire and locally alike.
    static func answer<T>(_ result: Result<T, ReplicationError>, me: NodeID, _ ok: (T) -> [RecordRef]) -> Envelope.ForwardAnswer {
        switch result {
        case .success(let v): .ok(ok(v))
        case .failure(.notLeader(let l)): .notLeader(l == me ? nil : l)
        case .failure(.transferring): .notLeader(nil)
        case .failure(.configChangePending): .changePending("another membership change is pending")
        case .failure(.superseded): .failed("replaced by another leader's entry before it committed")
        case .failure(.invalid(let why)): .invalid(why)
        case .failure(.unavailable(let why)): .failed(why)
        case .failure(.storage(let why)): .outcomeUnknown("storage failed on node \(me): \(why)")
        case .failure(.stopped): .outcomeUnknown("the replica on node \(me) stopped")
        case .failure(.outcomeUnknown(let why)): .outcomeUnknown(why)
        case .failure(.refused(let code, let message)): .refused(code: code, message: message)
        }
    }

    /// Where each record landed. (The raw log's state machine accepts every record; outcomes of domain
    /// state machines reach their callers with the messaging layer.)
    static func refs(_ applied: [Applied]) -> [RecordRef] {
        applied.map { RecordRef(index: $0.record.index, term: $0.record.term, stream: $0.record.stream, seq: $0.record.seq, outcome: $0.outcome) }
    }

    /// A forwarded write's records, the local replica that takes them and the way to answer; nil after
    /// answering the peer itself. Forwarded records are client writes: the same record types as at the
    /// API (a peer that passed a reserved type on would be a bug or an attack: refused here too).
    func takeForwarded(
        _ proposals: [Envelope.ForwardedProposal], request: Envelope.RequestID, from: NodeID, shard: ShardID,
        allowed: (RecordType) -> Bool = { $0.isClientWritable }
    ) -> (ShardRunner, [Proposal], @Sendable (Envelope.ForwardAnswer) -> Void)? {
        if let bad = proposals.first(where: { !allowed($0.type) }) {
            transport.send(
                to: from, shard: shard.rawValue,
                payload: Envelope.answer(request: request, .invalid("record type \(bad.type.rawValue) is reserved for the system")).encode())
            return nil
        }
        guard let runner = runnerOrRefuse(shard, request: request, from: from) else { return nil }
        let ps = proposals.map { Proposal(stream: $0.stream, type: $0.type, timestampMicros: $0.timestampMicros, payload: $0.payload) }
        return (runner, ps, replier(to: from, shard: shard, request: request))
    }

    /// The longest a passed-on request is waited for here.
    static let viaWithinMax: Duration = .seconds(30)

    /// This node's replica of `shard` runs and brings its sessions their inbox records (it is not cut off
    /// from its leader).
    func servesSessions(_ shard: ShardID) -> Bool {
        runner(shard) != nil && !leaderlessLong(shard)
    }

    /// Whether the local replica of `shard` has known no leader for twice the longest election timeout:
    /// past an ordinary election, so it is cut off from the leader (or the shard has none).
    func leaderlessLong(_ shard: ShardID) -> Bool {
        guard let since = localLeader.withLockedValue({ $0[shard]?.since }) else { return false }
        // Raft draws its timeout from the configured range (or from [min, 2 min)): past two of the longest.
        let longest = max(config.raft.electionTimeoutMaxMs, 2 * config.raft.electionTimeoutMinMs)
        return ContinuousClock.now - since >= .milliseconds(2 * longest)
    }

    /// A peer that cannot reach `target` asks it through this node (Docs/replication.md, "Forwarding
    /// through another node"): the request is passed on once, never through a third node, and the
    /// target's answer (or this node's failure to reach it: nothing sent) goes back under the peer's
    /// request id. Only requests that answer (forwards, reads, queries) are passed on.
    func passOn(_ request: Envelope.RequestID, to target: NodeID, within: Duration, inner: [UInt8], from: NodeID, shard: ShardID) {
        let reply = replier(to: from, shard: shard, request: request)
        // Refusals are `failed` (nothing was sent on): the asking node retries as for an unreachable
        // target, and its client is not told its request was bad.
        guard target != id, target != from, config.node(target) != nil else {
            return reply(.failed("via: node \(target) is not a third node of the cluster"))
        }
        guard let env = try? Envelope.decode(inner), env.isRequest else { return reply(.failed("via: not a request")) }
        // Quiet from here too (paused, or cut off from both): nothing is sent, and the asking node tries
        // again as for an unreachable target, instead of waiting out its deadline on a link that is
        // only not closed yet.
        if transport.suspect(target) { return reply(.failed("via: node \(target) does not answer node \(id) either")) }
        viaPassed.increment()
        // A partial partition is worth a line in the log, not one per request: once per pair per 10 s.
        let now = ContinuousClock.now
        let log = viaLogged.withLockedValue { last -> Bool in
            let key = [from.rawValue, target.rawValue]
            guard last[key].map({ now - $0 >= .seconds(10) }) ?? true else { return false }
            last[key] = now
            return true
        }
        if log { logger.notice("passing requests from node \(from) on to node \(target): node \(from) cannot reach it (a partition between them only)") }
        // The asking node's own deadline (it waits no longer), at most `viaWithinMax`. A request its sender
        // sends again safely stops waiting here too once the target goes quiet (`Forwarder.peerSuspect`).
        let resendable: Bool
        switch env {
        case .relayBatch, .forwardKeyed, .stateQuery, .readForward: resendable = true
        case .forwardMessaging(_, let key, _): resendable = !key.isEmpty
        default: resendable = false
        }
        forwarder.send(
            to: target, shard: shard, env, deadline: ContinuousClock.now + min(within, Self.viaWithinMax), direct: true, failFast: resendable
        ) { reply($0) }
    }

    /// The local replica of `shard`, or nil after telling the asking peer this node has none.
    func runnerOrRefuse(_ shard: ShardID, request: Envelope.RequestID, from: NodeID) -> ShardRunner? {
        if let r = runner(shard) { return r }
        transport.send(to: from, shard: shard.rawValue, payload: Envelope.answer(request: request, .failed("shard \(shard) is not on node \(id)")).encode())
        return nil
    }

    /// Sends the answer to a forwarded request back to the peer that asked.
    func replier(to peer: NodeID, shard: ShardID, request: Envelope.RequestID) -> @Sendable (Envelope.ForwardAnswer) -> Void {
        let t = transport
        let terms = viewTerms
        return { answer in
            var a = answer
            // A not-leader answer says which view of the leader it comes from.
            if case .notLeader(let l, 0) = answer { a = .notLeader(l, term: terms.withLockedValue { $0[shard] ?? 0 }) }
            t.send(to: peer, shard: shard.rawValue, payload: Envelope.answer(request: request, a).encode())
        }
    }

    // MARK: Membership

    /// Proposes a one-server membership change of `shard` through its leader; returns the index of the
    /// configuration entry once it is committed.
    public func changeMembership(shard: ShardID, _ change: ConfigChange, timeout: Duration = .seconds(10)) async throws -> LogIndex {
        let me = id
        let envelope = Envelope.configChange(request: Envelope.RequestID(incarnation: 0, sequence: 0), change: change)
        let deadline = ContinuousClock.now + timeout
        let refs = try await withCheckedThrowingContinuation { c in
            throughLeader(
                shard, deadline: deadline, envelope: { envelope },
                local: { local, deadline, finish in
                    Self.untilDeadline(deadline, late: .outcomeUnknown("proposed on node \(me), not committed before the deadline"), finish) { finish in
                        local.submit(.configChange(change) { finish(Self.answer($0, me: me) { [RecordRef(index: $0, term: 0, stream: .none, seq: 0)] }) })
                    }
                }, done: { c.resume(with: $0) })
        }
        return refs.first?.index ?? 0
    }

    // MARK: Status

    public struct NodeReach: Sendable, Codable {
        public var id: UInt64
        public var reachable: Bool
    }

    public func status() async -> (nodes: [NodeReach], shards: [ShardStatus]) {
        var nodes: [NodeReach] = []
        for n in config.nodes { nodes.append(NodeReach(id: n.id.rawValue, reachable: n.id == id || transport.reachable(n.id))) }
        var shards: [ShardStatus] = []
        let rs = allRunners
        // Asked all at once, one shared deadline (replicas on a busy lane answer together).
        let deadline = ContinuousClock.now + .seconds(2)
        let answers = await withTaskGroup(of: (ShardID, ShardStatus?).self) { group in
            for (shard, r) in rs {
                group.addTask {
                    (shard, await Self.untilDeadline(deadline, late: nil) { finish in r.submit(.status { finish($0) }) })
                }
            }
            var out: [(ShardID, ShardStatus?)] = []
            for await a in group { out.append(a) }
            return out
        }
        for (shard, s) in answers {
            if let s {
                shards.append(s)
            } else {
                shards.append(ShardStatus.unavailable(shard, node: id, "the replica did not answer within 2 s (stopped or busy)"))
            }
        }
        for (shard, why) in failedShards.withLockedValue({ $0 }) where rs[shard] == nil {
            shards.append(ShardStatus.unavailable(shard, node: id, why))
        }
        shards.sort { $0.shard < $1.shard }
        return (nodes, shards)
    }

    public var transportStats: TransportStats { transport.stats }

    // MARK: Reads

    /// How current a read must be (Docs/state.md, "Reads").
    public enum ReadConsistency: Sendable, Equatable {
        /// Sees every write acknowledged before the read began: a read index from the shard's leader
        /// (ReadIndex: the leader confirms it still leads with a quorum round), then this replica serves
        /// once it has applied up to it. Works on a follower: only the index comes from the leader.
        case linearizable
        /// Sees at least everything up to `index` (a cursor or a write's index), from this replica once
        /// it has applied that far.
        case atLeast(LogIndex)
        /// Whatever this replica has applied (may lag the leader; never uncommitted).
        case local
    }

    public enum ReadFailure: Error, Equatable, Sendable {
        /// This node holds no replica of the shard.
        case noReplica
        /// The read asked for an index this replica cannot reach (far past its log).
        case invalid(String)
        case read(ReadError)
        /// No read index, or this replica did not apply far enough, before the deadline.
        case unavailable(String)
    }

    /// Reads this node's replica of `shard`, as current as `consistency` asks.
    public func read(
        shard: ShardID, _ q: ReadQuery, consistency: ReadConsistency = .local, timeout: Duration = .seconds(5)
    ) async -> Result<ReadResult, ReadFailure> {
        guard let r = runner(shard) else { return .failure(.noReplica) }
        let need: LogIndex
        switch await waitApplied(shard: shard, runner: r, consistency: consistency, deadline: ContinuousClock.now + timeout) {
        case .failure(let f): return .failure(f)
        case .success(let n): need = n
        }
        // Checked again where the read runs: a repair between the wait and the read restarts the replica
        // from an earlier state (applied back to 0), and what it holds then is older than asked.
        let result = await withCheckedContinuation { c in r.submit(.read(q, atLeast: need) { c.resume(returning: $0) }) }
        return result.mapError { .read($0) }
    }

    /// Waits until this node's replica (`r`) has applied what `consistency` asks.
    func waitApplied(
        shard: ShardID, runner r: ShardRunner, consistency: ReadConsistency, deadline: ContinuousClock.Instant
    ) async -> Result<LogIndex, ReadFailure> {
        var need: LogIndex = 0
        switch consistency {
        case .local: break
        case .atLeast(let index): need = index
        case .linearizable:
            do {
                need = try await readIndex(shard, deadline: deadline)
            } catch {
                return .failure(.unavailable("no read index from shard \(shard)'s leader: \(error)"))
            }
        }
        if need > 0 {
            let token = waiterTokens.withLockedValue { t -> UInt64 in
                t &+= 1
                return t == 0 ? 1 : t
            }
            let late = Result<LogIndex, ReplicationError>.failure(.unavailable("replica of shard \(shard) on node \(id) had not applied index \(need) by the deadline"))
            let applied: Result<LogIndex, ReplicationError> = await Self.untilDeadline(deadline, late: late) { finish in
                r.submit(.whenApplied(need, token: token) { finish($0) })
            }
            if case .failure(let e) = applied {
                // The replica must not keep the waiter of a caller that stopped waiting.
                r.submit(.cancelWaiter(token))
                if case .invalid(let why) = e { return .failure(.invalid(why)) }
                return .failure(.unavailable("\(e)"))
            }
        }
        return .success(need)
    }

    /// A linearizable read point for `shard`: the leader's read index, asked locally when this node
    /// leads, else of the leader over the peer connection.
    func readIndex(_ shard: ShardID, deadline: ContinuousClock.Instant) async throws -> LogIndex {
        let me = id
        let refs = try await withCheckedThrowingContinuation { c in
            throughLeader(
                shard, deadline: deadline, envelope: { .readIndex(request: Envelope.RequestID(incarnation: 0, sequence: 0)) },
                local: { local, deadline, finish in
                    Self.untilDeadline(deadline, late: .failed("no read index on node \(me) before the deadline"), finish) { finish in
                        local.submit(.readIndex { finish(Self.answer($0, me: me) { [RecordRef(index: $0, term: 0, stream: .none, seq: 0)] }) })
                    }
                }, done: { c.resume(with: $0) })
        }
        return refs.first?.index ?? 0
    }
}
