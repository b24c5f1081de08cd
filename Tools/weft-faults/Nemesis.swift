import Foundation

/// Faults on a seeded schedule: the same seed makes the same choices in the same order (what each
/// fault hits when it targets "the leader" depends on the run).
final class Nemesis: @unchecked Sendable {
    enum Kind: String, CaseIterable {
        case kill, pause, isolate, partition = "partition-two-way", oneWay = "partition-one-way", split = "majority-minority-split", disk
        case full = "storage-full"
        case burst
    }
    let cluster: Cluster
    let network: TestNetwork
    let client: HTTPClient
    let history: History
    var rng: SplitMix
    var counts: [String: Int] = [:]
    var lastDiskFault = ContinuousClock.now - .seconds(3600)
    let seed: UInt64
    /// Records one burst phase may send (0: no bursts).
    let burstRecords: Int
    var burstPhase = 0
    /// Availability probes sent so far (their payloads are `a0`, `a1`, ...).
    var probesSent = 0
    /// Burst records acknowledged, over the run.
    var burstAcked = 0
    /// Each burst's catch-up: seconds from healing until the lagging follower applied what the leader had
    /// committed when the burst ended (nil: not within a minute), and whether it installed shipped files.
    let catchUpLog = Locked<[(seconds: Double?, files: Bool)]>([])
    let observers = Locked<[Task<Void, Never>]>([])

    init(cluster: Cluster, network: TestNetwork, client: HTTPClient, history: History, seed: UInt64, burstRecords: Int = 0) {
        self.cluster = cluster
        self.network = network
        self.client = client
        self.history = history
        self.seed = seed
        self.burstRecords = burstRecords
        rng = SplitMix(seed: seed)
    }

    /// The leader of a shard as some reachable node sees it.
    func leader(shard: Int) async -> Int? {
        for n in cluster.nodes where cluster.isRunning(n) && !cluster.isPaused(n) {
            if let s = await client.json(host: TestNetwork.address(n), port: Cluster.apiPort, path: "/api/v1/cluster/status"),
                let shards = s["shards"] as? [[String: Any]],
                let sh = shards.first(where: { ($0["id"] as? Int) == shard }), let l = sh["leader"] as? Int
            {
                return l
            }
        }
        return nil
    }

    /// Holds a one-node fault for `hold`. When the others hold a quorum of every shard and the fault lasts
    /// longer than the election grace, `Availability.grace` after it began one write goes through each
    /// other node to each shard (the rule "writes go on", Availability.swift), and
    /// the fault is not healed before those writes are answered (within 7 s), so a write stuck on a
    /// node that is down cannot be rescued by the heal.
    /// `targets`: where the probes go, asked once the grace has passed (default: every other node, to
    /// every shard).
    /// `after`: when the probes go (default: the election grace).
    func holdProbing(
        _ hold: Duration, kind: String, victim: Int, start: Double, quorum: Bool, after: Duration? = nil, peer: Int? = nil,
        targets: (() async -> [(node: Int, shard: Int)])? = nil
    ) async throws {
        let began = ContinuousClock.now
        let grace = after ?? Duration.milliseconds(Int(Availability.grace * 1000))
        guard quorum, hold > grace else {
            try await Task.sleep(for: hold)
            return
        }
        try await Task.sleep(for: grace)
        let targets = await targets?() ?? cluster.nodes.filter { $0 != victim }.flatMap { n in (0..<cluster.shards).map { (n, $0) } }
        let first = probesSent
        probesSent += targets.count
        await withTaskGroup(of: Void.self) { group in
            for (k, (node, shard)) in targets.enumerated() {
                let (client, history, n) = (self.client, self.history, first + k)
                group.addTask { await Self.probe(client: client, history: history, node: node, shard: shard, number: n) }
            }
        }
        let left = hold - (ContinuousClock.now - began)
        if left > .zero { try await Task.sleep(for: left) }
        await history.fault(Availability.Fault(kind: kind, victim: victim, start: start, end: await history.now(), peer: peer))
    }

    /// The probes of a storage-full fault: its replicas fail when their writes do, at no moment the
    /// harness knows, and a write in flight on a replica as it fails may fail with it. So they go only to
    /// the shards whose replica on the victim has stopped by then (the victim is out of those groups, the
    /// others hold them), and through every node, the victim included: it must serve them through the
    /// other replicas (Docs/replication.md).
    func stoppedReplicaTargets(_ victim: Int) async -> [(node: Int, shard: Int)] {
        let stopped = await stoppedShards(victim) ?? []
        counts["storage-full-stopped-replicas", default: 0] += stopped.count
        return cluster.nodes.flatMap { n in stopped.map { (n, $0) } }
    }

    /// Whether node n's status says it reaches node m now (nil when it does not answer).
    func reaches(_ n: Int, _ m: Int) async -> Bool? {
        guard let s = await client.json(host: TestNetwork.address(n), port: Cluster.apiPort, path: "/api/v1/cluster/status"),
            let nodes = s["nodes"] as? [[String: Any]]
        else { return nil }
        return nodes.first { $0["id"] as? Int == m }?["reachable"] as? Bool
    }

    /// The shards whose replica on node n reports `stopped` (nil when it does not answer).
    func stoppedShards(_ n: Int) async -> [Int]? {
        guard let s = await client.json(host: TestNetwork.address(n), port: Cluster.apiPort, path: "/api/v1/cluster/status"),
            let shards = s["shards"] as? [[String: Any]]
        else { return nil }
        return shards.filter { $0["role"] as? String == "stopped" }.compactMap { $0["id"] as? Int }.sorted()
    }

    /// Heals a storage-full fault as an operator would without a restart: the limit lifted (the disk
    /// freed), then each stopped replica opened again through the admin route. True if every reopen
    /// was answered 200; a failure is printed and counted, and the caller restarts the node instead.
    func healByReopening(_ victim: Int) async -> Bool {
        guard cluster.liftFileSizeLimit(victim) else {
            counts["storage-full-lift-failed", default: 0] += 1
            print("weft-faults: storage-full: could not lift node \(victim)'s file-size limit; restarting it instead")
            return false
        }
        // A node that does not say which replicas stopped is restarted instead.
        guard let stopped = await stoppedShards(victim) else { return false }
        var ok = true
        var reopened: [Int] = []
        for shard in stopped {
            let outcome = await client.request(
                .POST, host: TestNetwork.address(victim), port: Cluster.apiPort, path: "/api/v1/admin/shards/\(shard)/reopen", timeout: .seconds(10))
            if case .response(200, _) = outcome {
                reopened.append(shard)
            } else {
                ok = false
                counts["storage-full-reopen-failed", default: 0] += 1
                print("weft-faults: storage-full: reopening shard \(shard) on node \(victim) failed: \(outcome)")
            }
        }
        // A write that failed as the limit was lifted can stop a replica after the list was read: one left
        // stopped now would stay so for the rest of the run.
        if await stoppedShards(victim) != [] { ok = false }
        counts["storage-full-reopened", default: 0] += reopened.count
        await note("storage-full", "reopen", ["node": victim, "shards": reopened, "ok": ok])
        return ok
    }

    /// Probe `number`: one unkeyed append of `a<number>` through `node` (stream 1), recorded like the
    /// writers' (never retried), as process 100 000 + number (one operation per process). The client
    /// waits 7 s, past the node's 5 s deadline, so a node's own 503 or 504 is seen as such.
    static func probe(client: HTTPClient, history: History, node: Int, shard: Int, number: Int) async {
        let process = 100_000 + number
        let value = "a\(number)"
        await history.probeInvoke(process: process, shard: shard, stream: 1, value: value, node: node)
        let outcome = await client.request(
            .POST, host: TestNetwork.address(node), port: Cluster.apiPort, path: "/api/v1/shards/\(shard)/append",
            body: Array(#"{"records":[{"stream":1,"payload":"\#(value)"}]}"#.utf8), timeout: .seconds(7))
        switch outcome {
        case .response(200, let b):
            let obj = (try? JSONSerialization.jsonObject(with: Data(b))) as? [String: Any]
            if let r = (obj?["records"] as? [[String: Any]])?.first, let index = (r["index"] as? NSNumber)?.uint64Value,
                let seq = (r["seq"] as? NSNumber)?.uint64Value
            {
                await history.ok(process: process, shard: shard, value: value, node: node, index: index, seq: seq)
            } else {
                await history.info(process: process, value: value, node: node, error: "200 with an unreadable body")
            }
        case .response(let status, let b) where status >= 400 && status < 500:
            await history.fail(process: process, value: value, node: node, status: status, error: String(decoding: b.prefix(300), as: UTF8.self))
        case .response(let status, let b):
            await history.info(process: process, value: value, node: node, error: "\(status) \(String(decoding: b.prefix(300), as: UTF8.self))")
        case .failed(let why) where why.hasPrefix("connect:"):
            await history.fail(process: process, value: value, node: node, status: 0, error: why)
        case .failed(let why):
            await history.info(process: process, value: value, node: node, error: why)
        }
    }

    /// Whether the nodes other than `victim` hold a quorum of every shard without it: all of them up,
    /// none of their replicas recovering (a recovering replica does not vote) and no replica far behind.
    /// Asked before the fault.
    func othersHoldQuorums(_ victim: Int) async -> Bool {
        let others = cluster.nodes.filter { $0 != victim }
        guard others.allSatisfy({ cluster.isRunning($0) && !cluster.isPaused($0) }) else { return false }
        for s in 0..<cluster.shards {
            let replicas = cluster.replicas(of: s)
            guard replicas.filter({ $0 != victim }).count > replicas.count / 2 else { return false }
        }
        guard await anyRecovering(excluding: victim) == false else { return false }
        // A replica still catching up after a burst (thousands of entries behind) does not count toward
        // a quorum that commits now: with the victim gone, its shard could wait for it past a write's
        // deadline, which is Raft working, not a stall.
        return await shardsCatchingUp().isEmpty
    }

    /// Whether any replica is still recovering from earlier damage (nil: some node did not answer), on
    /// every node but `excluding`.
    func anyRecovering(excluding: Int? = nil) async -> Bool? {
        for n in cluster.nodes where n != excluding {
            guard let s = await client.json(host: TestNetwork.address(n), port: Cluster.apiPort, path: "/api/v1/cluster/status"),
                let shards = s["shards"] as? [[String: Any]], shards.count == cluster.hosted(by: n).count
            else { return nil }
            for sh in shards where ((sh["repair"] as? [String: Any])?["recovering"] as? Bool) == true { return true }
        }
        return false
    }

    func note(_ kind: String, _ phase: String, _ detail: sending [String: Any]) async {
        var e = detail
        e["op"] = "nemesis"
        e["fault"] = kind
        e["phase"] = phase
        await history.write(e)
    }

    /// One fault: applied, held for a while, healed.
    func step() async throws {
        let weights: [(Kind, Int)] = [
            (.kill, 38), (.pause, 9), (.isolate, 9), (.partition, 9), (.oneWay, 9), (.split, 8), (.disk, 18), (.full, 12),
            (.burst, burstRecords > 0 ? 16 : 0),
        ]
        var r = Int(rng.next() % UInt64(weights.reduce(0) { $0 + $1.1 }))
        var kind = Kind.kill
        for (k, w) in weights {
            if r < w {
                kind = k
                break
            }
            r -= w
        }
        let targetLeader = rng.chance(0.5)
        let shard = Int(rng.next() % UInt64(cluster.shards))
        var victim = rng.pick(cluster.nodes)
        if targetLeader, let l = await leader(shard: shard), cluster.nodes.contains(l) { victim = l }
        let hold = rng.millis(800...4000)
        let others = cluster.nodes.filter { $0 != victim }
        let peer = rng.pick(others)

        switch kind {
        case .burst:
            try await burst(shard: shard)
            return
        case .kill:
            let quorum = await othersHoldQuorums(victim)
            cluster.kill(victim)
            counts["sigkill", default: 0] += 1
            let start = await history.now()
            await note("kill", "start", ["node": victim, "leader_targeted": targetLeader])
            try await holdProbing(hold, kind: "kill", victim: victim, start: start, quorum: quorum)
            try cluster.start(victim)
            await note("kill", "end", ["node": victim])
        case .full:
            // The node restarts with its files limited below the segment size: as its active segments
            // grow past it, writes fail (EFBIG, as on a full disk) and its replicas stop one by one while
            // the node goes on serving through the others. Healed by reopening them or by a restart
            // without the limit (the replicas cut what a failed write left, and catch up).
            guard await anyRecovering() == false else {
                counts["storage-full-deferred", default: 0] += 1
                try await Task.sleep(for: .milliseconds(500))
                return
            }
            let quorum = await othersHoldQuorums(victim)
            let limit = cluster.segmentBytes / 4 + Int(rng.next() % UInt64(max(1, cluster.segmentBytes / 2)))
            cluster.kill(victim)
            counts["sigkill", default: 0] += 1
            try cluster.start(victim, fileSizeLimit: limit)
            let start = await history.now()
            await note("storage-full", "start", ["node": victim, "file_size_limit": limit, "leader_targeted": targetLeader])
            try await holdProbing(hold + .seconds(2), kind: "storage-full", victim: victim, start: start, quorum: quorum) {
                await self.stoppedReplicaTargets(victim)
            }
            // Healed half the time as an operator would on a running node (the disk freed, the stopped
            // replicas reopened through the admin route), else by a restart without the limit.
            let reopen = rng.chance(0.5)
            let reopened = reopen ? await healByReopening(victim) : false
            if !reopened {
                cluster.kill(victim)
                counts["sigkill", default: 0] += 1
                try cluster.start(victim)
            }
            await note("storage-full", "end", ["node": victim])
        case .pause:
            let quorum = await othersHoldQuorums(victim)
            cluster.pause(victim)
            let start = await history.now()
            await note("pause", "start", ["node": victim, "leader_targeted": targetLeader])
            try await holdProbing(hold, kind: "pause", victim: victim, start: start, quorum: quorum)
            cluster.resume(victim)
            await note("pause", "end", ["node": victim])
        case .isolate, .split:
            // With three nodes a majority/minority split is one node against two; the split puts the
            // shard's leader in the minority.
            var isolated = victim
            if kind == .split, let l = await leader(shard: shard), cluster.nodes.contains(l) { isolated = l }
            let quorum = await othersHoldQuorums(isolated)
            for o in cluster.nodes where o != isolated {
                try network.cut(from: isolated, to: o)
                try network.cut(from: o, to: isolated)
            }
            let start = await history.now()
            await note(kind.rawValue, "start", ["minority": [isolated], "majority": cluster.nodes.filter { $0 != isolated }])
            try await holdProbing(hold, kind: kind.rawValue, victim: isolated, start: start, quorum: quorum)
            try network.heal()
            await note(kind.rawValue, "end", [:])
        case .partition:
            // A cut between two nodes only: each still reaches the third. When every node is up and
            // healthy, every shard keeps a quorum, and writes through either node of the pair must go
            // on: to a leader on the other side through the third node (Docs/replication.md,
            // "Forwarding through another node"). Probed once both nodes report the cut links dead (the
            // transport's dead-link timeout, about 5 s; before, a write sent over a black-holed link is
            // in doubt at its deadline, which is what a partition does), at most 12 s in, so such a
            // fault lasts longer.
            let othersHold = await othersHoldQuorums(victim)
            let quorum = othersHold && cluster.isRunning(victim) && !cluster.isPaused(victim)
            try network.cut(from: victim, to: peer)
            try network.cut(from: peer, to: victim)
            let start = await history.now()
            await note(kind.rawValue, "start", ["nodes": [victim, peer]])
            try await holdProbing(
                hold + .seconds(8), kind: kind.rawValue, victim: victim, start: start, quorum: quorum, after: .seconds(5), peer: peer,
                targets: { [self] in
                    let until = ContinuousClock.now + .seconds(7)
                    while ContinuousClock.now < until {
                        let a = await reaches(victim, peer)
                        let b = await reaches(peer, victim)
                        if a == false && b == false { break }
                        try? await Task.sleep(for: .milliseconds(200))
                    }
                    return [victim, peer].flatMap { n in (0..<cluster.shards).map { (n, $0) } }
                })
            try network.heal()
            await note(kind.rawValue, "end", [:])
        case .oneWay:
            try network.cut(from: victim, to: peer)
            await note(kind.rawValue, "start", ["from": victim, "to": peer])
            try await Task.sleep(for: hold)
            try network.heal()
            await note(kind.rawValue, "end", [:])
        case .disk:
            let fault = rng.pick(DiskFault.allCases)
            // One node's data at a time: wait until earlier damage has been found and repaired.
            guard ContinuousClock.now - lastDiskFault > .seconds(8), await anyRecovering() == false else {
                counts["disk-fault-deferred", default: 0] += 1
                try await Task.sleep(for: .milliseconds(500))
                return
            }
            cluster.kill(victim)
            counts["sigkill", default: 0] += 1
            var what = cluster.damage(victim, fault, rng: &rng)
            var applied = fault
            if what == nil {
                applied = .truncateActive
                what = cluster.damage(victim, .truncateActive, rng: &rng)
            }
            await note("disk", "start", ["node": victim, "kind": applied.rawValue, "detail": what ?? "nothing to damage"])
            if what != nil {
                counts["disk:" + applied.rawValue, default: 0] += 1
                lastDiskFault = ContinuousClock.now
            }
            try await Task.sleep(for: .milliseconds(300))
            try cluster.start(victim)
            await note("disk", "end", ["node": victim])
            return
        }
        counts[kind.rawValue, default: 0] += 1
        if targetLeader && (kind == .kill || kind == .pause) { counts[kind.rawValue + "-leader", default: 0] += 1 }
    }

    /// Undoes everything: rules removed, paused nodes continued, stopped nodes started.
    func healAll() async throws {
        try network.heal()
        for n in cluster.nodes {
            if cluster.isPaused(n) { cluster.resume(n) }
            if !cluster.isRunning(n) { try cluster.start(n) }
        }
        await note("heal", "end", [:])
    }
}

/// A value behind a lock (the burst's catch-up observers run beside the schedule).
final class Locked<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Value
    init(_ v: Value) { value = v }
    func withLock<R>(_ f: (inout Value) -> R) -> R {
        lock.lock()
        defer { lock.unlock() }
        return f(&value)
    }
}
