import ClusterConfig
import Logging
import NIOConcurrencyHelpers
import NIOCore
import PeerTransport
import Raft
import Replication
import SegmentStore
import WeftCore

public enum WriteError: Error, Equatable, CustomStringConvertible {
    /// No leader could take the write before the deadline (election in progress, no quorum).
    case unavailable(String)
    case invalid(String)
    case failed(String)
    /// The write may or may not have committed (the replica handling it stopped or began repairing its
    /// log after proposing it). Not retried here: a retry could write it twice.
    case outcomeUnknown(String)

    public var description: String {
        switch self {
        case .unavailable(let s): "unavailable: \(s)"
        case .invalid(let s): "invalid: \(s)"
        case .failed(let s): "failed: \(s)"
        case .outcomeUnknown(let s): "outcome unknown: \(s)"
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
    let transport: PeerTransport
    let started = NIOLockedValueBox(false)
    let openLock = NIOLock()
    let logger: Logger
    let pending = NIOLockedValueBox<(next: UInt64, waiting: [UInt64: CheckedContinuation<Envelope.ForwardAnswer, Never>])>((1, [:]))
    /// Last leader seen per shard (a hint for forwarding; refreshed from each runner's answers).
    let leaderHints = NIOLockedValueBox<[ShardID: NodeID]>([:])

    public init(config: ClusterConfiguration, node id: NodeID, group: any EventLoopGroup, logger: Logger) throws {
        guard let me = config.node(id) else { throw WriteError.invalid("node \(id) is not in \(config.configPath)") }
        self.id = id
        self.config = config
        self.logger = logger
        var peers: [NodeID: PeerAddress] = [:]
        for n in config.nodes where n.id != id { peers[n.id] = PeerAddress(host: n.peerAddress.host, port: n.peerAddress.port) }
        let box = NIOLockedValueBox<WeftNode?>(nil)
        transport = PeerTransport(
            self: id, clusterName: config.name, secret: Array(config.secret.utf8),
            listen: PeerAddress(host: me.peerAddress.host, port: me.peerAddress.port), peers: peers, group: group, logger: logger
        ) { from, shard, payload in
            box.withLockedValue { $0 }?.receive(from: from, shard: ShardID(shard), payload: payload)
        }
        runnerBox = NIOLockedValueBox([:])
        box.withLockedValue { $0 = self }
        for shard in config.shards(hostedBy: id) {
            _ = try openReplica(shard, bootstrap: Membership(voters: Set(config.replicas(of: shard))))
        }
        // Replicas this node gained by joining a shard after start-up live on disk too.
        let dataDir = config.dataDirectory(for: id)
        for name in (try? PosixDisk().list(dataDir)) ?? [] where name.hasPrefix("shard-") {
            guard let n = UInt64(name.dropFirst(6)), n < UInt64(config.shards), runner(ShardID(n)) == nil else { continue }
            _ = try openReplica(ShardID(n), bootstrap: nil)
        }
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
            bootstrap: bootstrap, config: rc)
        let t = transport
        replica.log = { log.notice("\($0)") }
        for e in replica.repairEvents { log.warning("\(e)") }
        replica.shipFile = { to, name, offset, total, bytes in
            t.send(to: to, shard: shard.rawValue, payload: Envelope.file(name: name, offset: offset, total: total, bytes: bytes).encode())
        }
        let runner = ShardRunner(replica: replica, tick: .milliseconds(tickMs), logger: shardLogger) { msgs in
            for m in msgs { t.send(to: m.to, shard: shard.rawValue, payload: Envelope.raft(m).encode()) }
        }
        runnerBox.withLockedValue { $0[shard] = runner }
        if started.withLockedValue({ $0 }) { runner.start() }
        return runner
    }

    func runner(_ shard: ShardID) -> ShardRunner? { runnerBox.withLockedValue { $0[shard] } }
    var allRunners: [ShardID: ShardRunner] { runnerBox.withLockedValue { $0 } }

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
        logger.info("node \(id) up: \(rs.count) shards, peer \(transport.listenAddress)")
    }

    public func stop() async {
        for r in allRunners.values { r.stop() }
        await transport.stop()
        pending.withLockedValue { p in
            for (_, c) in p.waiting { c.resume(returning: .failed("node stopping")) }
            p.waiting = [:]
        }
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
            } else if m.kind == .append || m.kind == .heartbeat, let r = joinReplica(shard) {
                r.submit(.message(m))
            }
        case .file(let name, let offset, _, let bytes):
            runner(shard)?.submit(.stageFile(name: name, offset: offset, bytes: bytes))
        case .configChange(let request, let change):
            guard let runner = runnerOrRefuse(shard, request: request, from: from) else { return }
            let reply = replier(to: from, shard: shard, request: request)
            let me = id
            runner.submit(.configChange(change) { reply(Self.answer($0, me: me) { [RecordRef(index: $0, term: 0, stream: .none, seq: 0)] }) })
        case .forward(let request, let proposals):
            guard let runner = runnerOrRefuse(shard, request: request, from: from) else { return }
            let ps = proposals.map { Proposal(stream: $0.stream, type: $0.type, timestampMicros: $0.timestampMicros, payload: $0.payload) }
            let reply = replier(to: from, shard: shard, request: request)
            let me = id
            runner.submit(.propose(ps) { reply(Self.answer($0, me: me, Self.refs)) })
        case .answer(let request, let answer):
            let c = pending.withLockedValue { $0.waiting.removeValue(forKey: request) }
            c?.resume(returning: answer)
        }
    }

    // MARK: Writes

    /// Appends records to a shard through its leader; returns where each landed once committed.
    /// Retries through elections until `timeout` passes.
    public func append(shard: ShardID, _ proposals: [Proposal], timeout: Duration = .seconds(5)) async throws -> [RecordRef] {
        guard !proposals.isEmpty else { return [] }
        guard proposals.count <= Limits.appendBatchCountMax else { throw WriteError.invalid("at most \(Limits.appendBatchCountMax) records per append") }
        for p in proposals where p.payload.count > Limits.recordPayloadBytesMax {
            throw WriteError.invalid("payload of \(p.payload.count) bytes, limit \(Limits.recordPayloadBytesMax)")
        }
        let forwarded = Envelope.forward(
            request: 0,
            proposals: proposals.map {
                Envelope.ForwardedProposal(stream: $0.stream, type: $0.type, timestampMicros: $0.timestampMicros, payload: $0.payload)
            })
        return try await throughLeader(shard, timeout: timeout, envelope: forwarded) { local in
            await self.proposeLocally(local, proposals)
        }
    }

    /// Runs a request on the shard's leader: locally when this node leads (or may: no hint yet), else
    /// forwarded to the leader it knows; follows `not leader` answers and retries through elections
    /// until `timeout`. A change refused because another is pending fails at once.
    func throughLeader(
        _ shard: ShardID, timeout: Duration, envelope: Envelope, local run: (ShardRunner) async -> Envelope.ForwardAnswer
    ) async throws -> [RecordRef] {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        var lastError = "no leader"
        while clock.now < deadline {
            let hint = leaderHints.withLockedValue { $0[shard] }
            let local = runner(shard)
            let answer: Envelope.ForwardAnswer
            if hint == nil || hint == id, let local {
                answer = await run(local)
            } else if let target = hint ?? config.replicas(of: shard).first(where: { $0 != id }) {
                answer = await forward(to: target, shard: shard, envelope, deadline: deadline)
            } else {
                throw WriteError.invalid("shard \(shard) has no replica this node knows")
            }
            switch answer {
            case .ok(let refs):
                return refs
            case .notLeader(let l):
                leaderHints.withLockedValue { $0[shard] = l == id ? nil : l }
                lastError = l.map { "leader is node \($0)" } ?? "no leader"
                if l == nil { try await Task.sleep(for: .milliseconds(20)) }
            case .failed(let why):
                if why.contains("configChangePending") { throw WriteError.invalid("another membership change of shard \(shard) is still pending") }
                if why.hasPrefix("outcomeUnknown") || why.hasPrefix("stopped") || why.hasPrefix("storage") {
                    throw WriteError.outcomeUnknown("shard \(shard): \(why)")
                }
                leaderHints.withLockedValue { $0[shard] = nil }
                lastError = why
                try await Task.sleep(for: .milliseconds(20))
            }
        }
        throw WriteError.unavailable("shard \(shard): \(lastError)")
    }

    func proposeLocally(_ runner: ShardRunner, _ ps: [Proposal]) async -> Envelope.ForwardAnswer {
        let me = id
        return await withCheckedContinuation { (c: CheckedContinuation<Envelope.ForwardAnswer, Never>) in
            runner.submit(.propose(ps) { c.resume(returning: Self.answer($0, me: me, Self.refs)) })
        }
    }

    /// The answer a replica's result becomes, on the wire and locally alike.
    static func answer<T>(_ result: Result<T, ReplicationError>, me: NodeID, _ ok: (T) -> [RecordRef]) -> Envelope.ForwardAnswer {
        switch result {
        case .success(let v): .ok(ok(v))
        case .failure(.notLeader(let l)): .notLeader(l == me ? nil : l)
        case .failure(.transferring): .notLeader(nil)
        case .failure(let e): .failed("\(e)")
        }
    }

    static func refs(_ records: [Record]) -> [RecordRef] {
        records.map { RecordRef(index: $0.index, term: $0.term, stream: $0.stream, seq: $0.seq) }
    }

    /// The local replica of `shard`, or nil after telling the asking peer this node has none.
    func runnerOrRefuse(_ shard: ShardID, request: UInt64, from: NodeID) -> ShardRunner? {
        if let r = runner(shard) { return r }
        transport.send(to: from, shard: shard.rawValue, payload: Envelope.answer(request: request, .failed("shard \(shard) is not on node \(id)")).encode())
        return nil
    }

    /// Sends the answer to a forwarded request back to the peer that asked.
    func replier(to peer: NodeID, shard: ShardID, request: UInt64) -> @Sendable (Envelope.ForwardAnswer) -> Void {
        let t = transport
        return { t.send(to: peer, shard: shard.rawValue, payload: Envelope.answer(request: request, $0).encode()) }
    }

    /// Sends a forward or config-change envelope (its request id is filled in here) and waits for the answer.
    func forward(to target: NodeID, shard: ShardID, _ envelope: Envelope, deadline: ContinuousClock.Instant) async -> Envelope.ForwardAnswer {
        guard transport.reachable(target) else { return .failed("node \(target) unreachable") }
        let request = pending.withLockedValue { p -> UInt64 in
            defer { p.next += 1 }
            return p.next
        }
        let timer = Task { [pending] in
            try? await Task.sleep(until: deadline, clock: .continuous)
            pending.withLockedValue { $0.waiting.removeValue(forKey: request) }?.resume(returning: .failed("forward to node \(target) timed out"))
        }
        defer { timer.cancel() }
        return await withCheckedContinuation { c in
            pending.withLockedValue { $0.waiting[request] = c }
            let numbered: Envelope =
                switch envelope {
                case .forward(_, let ps): .forward(request: request, proposals: ps)
                case .configChange(_, let c): .configChange(request: request, change: c)
                default: envelope
                }
            transport.send(to: target, shard: shard.rawValue, payload: numbered.encode())
        }
    }

    // MARK: Membership

    /// Proposes a one-server membership change of `shard` through its leader; returns the index of the
    /// configuration entry once it is committed.
    public func changeMembership(shard: ShardID, _ change: ConfigChange, timeout: Duration = .seconds(10)) async throws -> LogIndex {
        let me = id
        let refs = try await throughLeader(shard, timeout: timeout, envelope: .configChange(request: 0, change: change)) { local in
            await withCheckedContinuation { c in
                local.submit(.configChange(change) { c.resume(returning: Self.answer($0, me: me) { [RecordRef(index: $0, term: 0, stream: .none, seq: 0)] }) })
            }
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
        for shard in rs.keys.sorted() {
            guard let r = rs[shard] else { continue }
            let s = await withCheckedContinuation { (c: CheckedContinuation<ShardStatus?, Never>) in
                let once = NIOLockedValueBox(false)
                let finish: @Sendable (ShardStatus?) -> Void = { v in
                    if once.withLockedValue({ done in defer { done = true }; return !done }) { c.resume(returning: v) }
                }
                r.submit(.status { finish($0) })
                Task {
                    try? await Task.sleep(for: .seconds(2))
                    finish(nil)
                }
            }
            if let s {
                shards.append(s)
                if let l = s.leader { leaderHints.withLockedValue { $0[shard] = l } }
            }
        }
        return (nodes, shards)
    }

    public var transportStats: TransportStats { transport.stats }

    // MARK: Reads

    /// Reads this node's replica of `shard` (committed records only; no leader round trip, so a lagging
    /// replica may return fewer). nil when the node has no replica of the shard.
    public func read(shard: ShardID, _ q: ReadQuery) async -> Result<(records: [Record], commit: LogIndex), ReadError>? {
        guard let r = runner(shard) else { return nil }
        return await withCheckedContinuation { c in
            r.submit(.read(q) { c.resume(returning: $0) })
        }
    }
}
