import ClusterConfig
import Delivery
import Foundation
import Messaging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import WeftCore

/// A node's part of the delivery tier (Docs/delivery.md): the hub that hands committed inbox records to
/// the sessions on this node, the devices' acknowledgements, the clock of the sessions, and typing
/// indicators with the presence directory that routes them.
///
/// **Presence directory.** Which nodes hold sessions of user u is kept by the nodes u's home shard is
/// placed on (`config.replicas(of:)`: three of N, whatever N is). A node tells them when u's first
/// session opens on it and when the last one closes, and repeats its list every 30 s (entries not
/// repeated for 75 s are dropped: a killed node's sessions fade out). Typing from a to b goes to one
/// directory node of b, which sends it to each node holding a session of b: one or two peer hops, and
/// per event a cost that grows with b's devices, not with the cluster.
///
/// **Inbox records to nodes without the home shard.** The same directory routes a user's inbox: each
/// replica of u's home shard, as its hub applies u's inbox records, sends them to the nodes its
/// directory lists for u that hold no replica of the shard (those have their own hub). A node gets each
/// record from up to three replicas and hands it on once (`InboxHub.remote`); a lost frame shows as a
/// gap its sessions read, and one at the tail is found by `checkHeads` (every `headsEvery`: one query
/// per shard for the last inbox seq of the users it serves from afar).
final class DeliveryTier: Sendable {
    let hub = InboxHub()
    let acks = AckWriter()
    let directory = PresenceDirectory()
    let ticker = SessionTicker()
    let limits: Session.Limits
    let selfID: NodeID
    let config: ClusterConfiguration
    let send: @Sendable (NodeID, ShardID, Envelope) -> Void
    let reachable: @Sendable (NodeID) -> Bool
    static let refreshEvery: Duration = .seconds(30)
    static let headsEvery: Duration = .seconds(5)
    /// Records per forwarded frame at most.
    static let forwardRecordsMax = 256
    let forwarded = Counter(label: "weft_delivery_inbox_forwarded_total")
    /// Per shard, the peers placed on it that said their replica stopped, and when they last said so.
    let stopped = NIOLockedValueBox<[ShardID: [NodeID: ContinuousClock.Instant]]>([:])
    /// Users whose sessions the heads check found short of a record forwarding lost.
    let headsLost = Counter(label: "weft_delivery_heads_lost_total")
    /// Per shard, the inbox records this node's replica applied lately, oldest first: what a peer whose
    /// replica is cut off missed before it said so, sent to it when it does (`noteStopped`).
    let recent = NIOLockedValueBox<[ShardID: CircularBuffer<RecentInbox>]>([:])
    /// Records kept per shard at most, and for how long.
    static let recentInboxMax = 2048
    static let recentInboxFor: Duration = .seconds(5)
    /// Records sent to a peer when it newly says its replica stopped.
    let backlogForwarded = Counter(label: "weft_delivery_inbox_backlog_forwarded_total")
    /// When a backlog last went to a peer, per shard: at most one per `recentInboxFor` (a replica that
    /// flaps between cut off and serving does not draw a burst each time).
    let backlogSent = NIOLockedValueBox<[ShardID: [NodeID: ContinuousClock.Instant]]>([:])
    /// Held across a batch's remembering, the check of who is stopped and its forwarding
    /// (`forwardInbox`), and across a peer's newly noted stop with its backlog (`noteStopped`). So this
    /// node sends a cut-off peer its backlog before any record applied after it (the peer's hub drops
    /// forwarded records at or below one it handed on already, so a later record first would void the
    /// backlog), and no record falls between the two.
    let forwarding = NIOLock()

    struct RecentInbox {
        var at: ContinuousClock.Instant
        var user: UInt64
        var record: Record
    }

    init(
        config: ClusterConfiguration, selfID: NodeID, send: @escaping @Sendable (NodeID, ShardID, Envelope) -> Void,
        reachable: @escaping @Sendable (NodeID) -> Bool
    ) {
        self.config = config
        self.selfID = selfID
        self.send = send
        self.reachable = reachable
        limits = Session.Limits(
            queueCountMax: config.delivery.sessionQueueMax, writeStallMillisMax: Int64(config.delivery.writeStallMillis))
    }

    /// The nodes that keep `user`'s presence: where the user's home shard is placed.
    func directoryNodes(of user: UInt64) -> [NodeID] {
        config.replicas(of: Ids.homeShard(user, shards: config.shards)).sorted()
    }

    /// These users' first session opened on this node (`on`), or their last one closed.
    func announce(_ users: [UInt64], on: Bool) {
        var byNode: [NodeID: [UInt64]] = [:]
        for u in users {
            for n in directoryNodes(of: u) { byNode[n, default: []].append(u) }
        }
        for (n, us) in byNode {
            if n == selfID {
                directory.note(us, node: selfID, on: on)
                continue
            }
            for start in stride(from: 0, to: us.count, by: Envelope.presenceUsersMax) {
                let chunk = Array(us[start..<min(start + Envelope.presenceUsersMax, us.count)])
                send(n, Ids.homeShard(chunk[0], shards: config.shards), .presence(on: on, users: chunk))
            }
        }
    }

    /// A batch of inbox records this node's replica of `shard` applied, by user: to every node the
    /// directory lists for a user that holds no replica of the shard.
    /// Nodes placed on the shard whose replica stopped count as holding none (`noteStopped`).
    func forwardInbox(_ byUser: [UInt64: [Record]], shard: ShardID) {
        forwarding.withLock { forwardLocked(byUser, shard: shard) }
    }

    private func forwardLocked(_ byUser: [UInt64: [Record]], shard: ShardID) {
        remember(byUser, shard: shard)
        let replicas = config.replicas(of: shard)
        let stopped = stoppedNodes(of: shard)
        // Every node holds this shard (3 nodes, replication 3) and runs its replica: no one to forward to.
        guard replicas.count < config.nodes.count || !stopped.isEmpty else { return }
        var byNode: [NodeID: [Record]] = [:]
        for (u, rs) in byUser {
            for n in directory.nodes(of: u) where n != selfID && (!replicas.contains(n) || stopped.contains(n)) { byNode[n, default: []] += rs }
        }
        for (n, rs) in byNode {
            for start in stride(from: 0, to: rs.count, by: Self.forwardRecordsMax) {
                send(n, shard, .inbox(records: Array(rs[start..<min(start + Self.forwardRecordsMax, rs.count)])))
            }
            forwarded.increment(by: rs.count)
        }
    }

    /// How long a peer's `replicaStopped` counts without a repeat (it repeats every 2 s; a node that
    /// restarted with its replica running sends none).
    static let stoppedValidFor: Duration = .seconds(7)

    /// Keeps `byUser`'s records as the newest applied of `shard`, dropping the oldest past
    /// `recentInboxMax` and those older than `recentInboxFor`.
    func remember(_ byUser: [UInt64: [Record]], shard: ShardID) {
        let now = ContinuousClock.now
        // Mutated in place (a copy taken out and stored back would copy the whole ring each time).
        func add(_ ring: inout CircularBuffer<RecentInbox>) {
            for (u, rs) in byUser {
                for r in rs { ring.append(RecentInbox(at: now, user: u, record: r)) }
            }
            if ring.count > Self.recentInboxMax { ring.removeFirst(ring.count - Self.recentInboxMax) }
            while let first = ring.first, now - first.at > Self.recentInboxFor { ring.removeFirst() }
        }
        recent.withLockedValue { all in add(&all[shard, default: CircularBuffer(initialCapacity: 64)]) }
    }

    /// Peer `node` says its replica of `shard` stopped (a storage failure) or is cut off from the leader.
    /// When it had not said so lately, it is sent the inbox records this node's replica applied in the
    /// last `recentInboxFor` of the users it holds sessions of: those applied between the cut and its
    /// saying so would otherwise reach its sessions only when a later record shows the gap or through the
    /// heads check, 7–17 s on. Its hub and sessions drop what they already have.
    func noteStopped(_ shard: ShardID, node: NodeID) {
        guard node != selfID, config.replicas(of: shard).contains(node) else { return }
        forwarding.withLock { noteStoppedLocked(shard, node: node) }
    }

    private func noteStoppedLocked(_ shard: ShardID, node: NodeID) {
        let now = ContinuousClock.now
        let newly = stopped.withLockedValue { s -> Bool in
            let fresh = s[shard]?[node].map { now - $0 < Self.stoppedValidFor } ?? false
            s[shard, default: [:]][node] = now
            return !fresh
        }
        guard newly else { return }
        let due = backlogSent.withLockedValue { sent -> Bool in
            guard sent[shard]?[node].map({ now - $0 >= Self.recentInboxFor }) ?? true else { return false }
            sent[shard, default: [:]][node] = now
            return true
        }
        guard due else { return }
        let ring = recent.withLockedValue { $0[shard] } ?? CircularBuffer()
        var listed: [UInt64: Bool] = [:]
        var backlog: [Record] = []
        for e in ring where now - e.at <= Self.recentInboxFor {
            let yes = listed[e.user] ?? directory.nodes(of: e.user).contains(node)
            listed[e.user] = yes
            if yes { backlog.append(e.record) }
        }
        guard !backlog.isEmpty else { return }
        for start in stride(from: 0, to: backlog.count, by: Self.forwardRecordsMax) {
            send(node, shard, .inbox(records: Array(backlog[start..<min(start + Self.forwardRecordsMax, backlog.count)])))
        }
        backlogForwarded.increment(by: backlog.count)
    }

    /// Peer `node` says its replica of `shard` serves its sessions again.
    func noteServing(_ shard: ShardID, node: NodeID) {
        _ = stopped.withLockedValue { $0[shard]?.removeValue(forKey: node) }
    }

    /// The nodes placed on `shard` that said lately that their replica of it stopped.
    func stoppedNodes(of shard: ShardID) -> Set<NodeID> {
        let now = ContinuousClock.now
        return stopped.withLockedValue { s in
            guard let nodes = s[shard] else { return [] }
            return Set(nodes.filter { now - $0.value < Self.stoppedValidFor }.keys)
        }
    }

    /// What of a forwarded `inbox` frame this node takes: nothing unless the frame's shard exists, comes
    /// from a node placed on it, and this node holds no replica of it (else its own hub has the records);
    /// of it, only inbox records of users homed on that shard.
    func acceptForwarded(_ records: [Record], from: NodeID, shard: ShardID, holdsReplica: Bool) -> [Record] {
        guard shard.rawValue < UInt64(config.shards), !holdsReplica, config.replicas(of: shard).contains(from) else { return [] }
        return records.filter { r in
            r.type == .messaging && Ids.inboxUser(r.stream).map { Ids.homeShard($0, shards: config.shards) == shard } == true
        }
    }

    /// Finds inbox records forwarding lost (a frame dropped on a broken connection, a directory that
    /// restarted and does not list this node yet): asks each home shard of the users served here from
    /// afar for their last inbox seq (the shards at once, one query per 4 096 users), and tells the
    /// sessions of a user whose head at the previous check is past what the hub handed them (a record in
    /// flight is not a loss); each such session reads from its own cursor. Returns the heads for the next
    /// check (a shard that did not answer keeps its users' previous heads).
    func checkHeads(node: WeftNode, previous: [UInt64: StreamSeq]) async -> [UInt64: StreamSeq] {
        let shards = config.shards
        var chunks: [(ShardID, [UInt64])] = []
        var byShard: [ShardID: [UInt64]] = [:]
        for u in hub.users where !node.servesSessions(Ids.homeShard(u, shards: shards)) {
            byShard[Ids.homeShard(u, shards: shards), default: []].append(u)
        }
        for (shard, users) in byShard {
            for start in stride(from: 0, to: users.count, by: MessagingQuery.headsUsersMax) {
                chunks.append((shard, Array(users[start..<min(start + MessagingQuery.headsUsersMax, users.count)])))
            }
        }
        let answers = await withTaskGroup(of: ([UInt64], [StreamSeq]?).self) { group in
            for (shard, users) in chunks {
                group.addTask {
                    guard case .success(let a?) = await node.ask(shard, .inboxHeads(users), at: .linearizable, timeout: .seconds(4)),
                        a.heads.count == users.count
                    else { return (users, nil) }
                    return (users, a.heads)
                }
            }
            return await group.reduce(into: []) { $0.append($1) }
        }
        var heads: [UInt64: StreamSeq] = [:]
        var reached: [(user: UInt64, seq: StreamSeq)] = []
        for (users, answer) in answers {
            guard let answer else {
                for u in users { heads[u] = previous[u] }
                continue
            }
            for (u, h) in zip(users, answer) {
                heads[u] = h
                if let before = previous[u], before > 0 { reached.append((u, min(before, h))) }
            }
        }
        headsLost.increment(by: hub.headsReached(reached))
        return heads
    }

    /// A session on this node says `from` is typing to `to`: to a directory node of `to` (this one if it
    /// is one).
    func sendTyping(from: UInt64, to: UInt64) {
        let d = directoryNodes(of: to)
        if d.contains(selfID) {
            typing(from: from, to: to, route: true)
        } else if let n = d.first(where: reachable) {
            send(n, Ids.homeShard(to, shards: config.shards), .typing(from: from, to: to, route: true))
        }
    }

    /// A typing event: `route`, as a directory node (to every node holding a session of `to`); else to
    /// the sessions of `to` here.
    func typing(from: UInt64, to: UInt64, route: Bool) {
        guard route else { return hub.typing(from: from, to: to) }
        for n in directory.nodes(of: to) {
            if n == selfID {
                hub.typing(from: from, to: to)
            } else {
                send(n, Ids.homeShard(to, shards: config.shards), .typing(from: from, to: to, route: false))
            }
        }
    }

    /// Repeats this node's presence list and drops stale entries, until cancelled; flushes acks.
    func run(node: WeftNode) async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.acks.run(node: node) }
            group.addTask { await self.ticker.run() }
            group.addTask {
                var previous: [UInt64: StreamSeq] = [:]
                while !Task.isCancelled {
                    try? await Task.sleep(for: Self.headsEvery)
                    previous = await self.checkHeads(node: node, previous: previous)
                }
            }
            group.addTask {
                while !Task.isCancelled {
                    try? await Task.sleep(for: Self.refreshEvery)
                    self.announce(self.hub.users, on: true)
                    self.directory.expire()
                }
            }
        }
    }
}

/// Users → the nodes that said they hold sessions of them, with when each said so last.
final class PresenceDirectory: Sendable {
    let entries = NIOLockedValueBox<[UInt64: [NodeID: ContinuousClock.Instant]]>([:])
    static let ttl: Duration = .seconds(75)
    /// Users a directory keeps at most (a peer that sends made-up users cannot grow it past this).
    static let usersMax = 4 << 20

    func note(_ users: [UInt64], node: NodeID, on: Bool) {
        let now = ContinuousClock.now
        entries.withLockedValue { e in
            for u in users {
                if on {
                    guard e[u] != nil || e.count < Self.usersMax else { continue }
                    e[u, default: [:]][node] = now
                } else {
                    e[u]?[node] = nil
                    if e[u]?.isEmpty == true { e[u] = nil }
                }
            }
        }
    }

    func nodes(of user: UInt64) -> [NodeID] {
        let oldest = ContinuousClock.now - Self.ttl
        return entries.withLockedValue { $0[user]?.filter { $0.value > oldest }.map(\.key).sorted() ?? [] }
    }

    func expire() {
        let oldest = ContinuousClock.now - Self.ttl
        entries.withLockedValue { e in
            for (u, ns) in e {
                let kept = ns.filter { $0.value > oldest }
                e[u] = kept.isEmpty ? nil : kept
            }
        }
    }
}

/// One clock for every session of the node: every second, one task per event loop ticks that loop's
/// sessions (a timer or a wake-up per session would cost 18 000 wake-ups a second at 18 000 sessions).
final class SessionTicker: Sendable {
    struct Loop {
        let loop: any EventLoop
        var ticks: [UInt64: @Sendable () -> Void]
    }
    let sessions = NIOLockedValueBox<(next: UInt64, loops: [ObjectIdentifier: Loop])>((1, [:]))

    /// `tick` runs on `loop`.
    func register(on loop: any EventLoop, _ tick: @escaping @Sendable () -> Void) -> UInt64 {
        sessions.withLockedValue { s in
            let id = s.next
            s.next += 1
            s.loops[ObjectIdentifier(loop), default: Loop(loop: loop, ticks: [:])].ticks[id] = tick
            return id
        }
    }

    func unregister(_ id: UInt64, on loop: any EventLoop) {
        sessions.withLockedValue { _ = $0.loops[ObjectIdentifier(loop)]?.ticks.removeValue(forKey: id) }
    }

    func run() async {
        while !Task.isCancelled {
            try? await Task.sleep(for: .seconds(1))
            for l in sessions.withLockedValue({ Array($0.loops.values) }) where !l.ticks.isEmpty {
                let ticks = Array(l.ticks.values)
                l.loop.execute { for t in ticks { t() } }
            }
        }
    }
}
