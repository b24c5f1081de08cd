import Foundation

/// Faults on a seeded schedule: the same seed makes the same choices in the same order (what each
/// fault hits when it targets "the leader" depends on the run).
final class Nemesis: @unchecked Sendable {
    enum Kind: String, CaseIterable {
        case kill, pause, isolate, partition = "partition-two-way", oneWay = "partition-one-way", split = "majority-minority-split", disk
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
            (.kill, 38), (.pause, 9), (.isolate, 9), (.partition, 9), (.oneWay, 9), (.split, 8), (.disk, 18), (.burst, burstRecords > 0 ? 16 : 0),
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
            cluster.kill(victim)
            counts["sigkill", default: 0] += 1
            await note("kill", "start", ["node": victim, "leader_targeted": targetLeader])
            try await Task.sleep(for: hold)
            try cluster.start(victim)
            await note("kill", "end", ["node": victim])
        case .pause:
            cluster.pause(victim)
            await note("pause", "start", ["node": victim, "leader_targeted": targetLeader])
            try await Task.sleep(for: hold)
            cluster.resume(victim)
            await note("pause", "end", ["node": victim])
        case .isolate, .split:
            // With three nodes a majority/minority split is one node against two; the split puts the
            // shard's leader in the minority.
            var isolated = victim
            if kind == .split, let l = await leader(shard: shard), cluster.nodes.contains(l) { isolated = l }
            for o in cluster.nodes where o != isolated {
                try network.cut(from: isolated, to: o)
                try network.cut(from: o, to: isolated)
            }
            await note(kind.rawValue, "start", ["minority": [isolated], "majority": cluster.nodes.filter { $0 != isolated }])
            try await Task.sleep(for: hold)
            try network.heal()
            await note(kind.rawValue, "end", [:])
        case .partition:
            try network.cut(from: victim, to: peer)
            try network.cut(from: peer, to: victim)
            await note(kind.rawValue, "start", ["nodes": [victim, peer]])
            try await Task.sleep(for: hold)
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
