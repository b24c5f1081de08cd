import Foundation

/// The burst nemesis (Docs/reliability.md): a follower of one shard falls far behind while a burst
/// writer floods that shard, then has to catch up — from the leader's log, or from its sealed segment
/// files when its own first segment was deleted while it was down — and is then, on the seeded
/// schedule, left alone, SIGKILLed and restarted while the files are being shipped to it, or sees the
/// shard's leader killed or isolated in the middle of its catch-up.
extension Nemesis {
    enum Lag: String, CaseIterable { case pause, partition, kill }
    enum Then: String { case catchUp = "catch-up", restartFollower = "restart-follower", leaderChange = "leader-change" }

    static let filesLine = "caught up from the leader's files"

    static func ms(_ d: Duration) -> Int { Int(d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000) }

    func shardStatus(node: Int, shard: Int) async -> [String: Any]? {
        guard let s = await client.json(host: TestNetwork.address(node), port: Cluster.apiPort, path: "/api/v1/cluster/status", timeout: .seconds(1))
        else { return nil }
        return (s["shards"] as? [[String: Any]])?.first { ($0["id"] as? Int) == shard }
    }

    /// Waits (polling) until node `n` is being sent files for `shard` (bytes in its staging directory) or
    /// has installed them; gives up after `timeout`. Returns the staged bytes seen.
    func waitForShipping(_ n: Int, shard: Int, installedBefore: Int, timeout: Duration) async -> UInt64 {
        let end = ContinuousClock.now + timeout
        while ContinuousClock.now < end {
            let b = cluster.stagedBytes(n, shard: shard)
            if b > 0 { return b }
            if cluster.logLines(n, containing: Self.filesLine) > installedBefore { return 0 }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return 0
    }

    /// Shards that some replica is still catching up on (recovering, or more than 2048 entries behind the
    /// highest commit index any node reports, by its own applied index or by the leader's match index for
    /// it), as far as the nodes that answer say.
    func shardsCatchingUp() async -> Set<Int> {
        var applied: [Int: [UInt64]] = [:]
        var commit: [Int: UInt64] = [:]
        var out: Set<Int> = []
        for n in cluster.nodes where cluster.isRunning(n) && !cluster.isPaused(n) {
            guard let s = await client.json(host: TestNetwork.address(n), port: Cluster.apiPort, path: "/api/v1/cluster/status", timeout: .seconds(2)),
                let shards = s["shards"] as? [[String: Any]]
            else { continue }
            for sh in shards {
                guard let id = sh["id"] as? Int else { continue }
                if ((sh["repair"] as? [String: Any])?["recovering"] as? Bool) == true { out.insert(id) }
                applied[id, default: []].append((sh["applied_index"] as? NSNumber)?.uint64Value ?? 0)
                if sh["role"] as? String == "leader" {
                    for r in (sh["replicas"] as? [[String: Any]]) ?? [] { applied[id, default: []].append((r["match_index"] as? NSNumber)?.uint64Value ?? 0) }
                }
                commit[id] = max(commit[id] ?? 0, (sh["commit_index"] as? NSNumber)?.uint64Value ?? 0)
            }
        }
        for (id, a) in applied where a.contains(where: { $0 + 2048 < commit[id] ?? 0 }) { out.insert(id) }
        return out
    }

    func burst(shard chosen: Int) async throws {
        burstPhase += 1
        let phase = burstPhase
        // Every choice is drawn first, so the schedule does not depend on what the cluster answers.
        let lag = rng.pick(Lag.allCases)
        let thenRoll = rng.next() % 10
        let then: Then = thenRoll < 2 ? .catchUp : thenRoll < 6 ? .restartFollower : .leaderChange
        let wantFiles = rng.chance(then == .catchUp ? 0.5 : 0.8)
        let isolateLeader = rng.chance(0.4)
        let hold = rng.millis(3000...6000)
        let tail = rng.millis(0...1500)
        let delay = rng.millis(0...400)
        let down = rng.millis(200...1500)
        let stream = UInt64(100 + Int(rng.next() % 4))
        let pickFollower = rng.next()
        let burstSeed = seed ^ rng.next()

        // A shard whose replica is still catching up from an earlier fault would have no quorum while
        // another follower lags: take the other shard then, if it is not catching up too.
        let busy = await shardsCatchingUp()
        let other = (0..<cluster.shards).first(where: { !busy.contains($0) })
        let shard = busy.contains(chosen) ? other ?? chosen : chosen
        if shard != chosen { counts["burst:shard-switched", default: 0] += 1 }

        guard let leader = await leader(shard: shard), cluster.nodes.contains(leader) else {
            counts["burst-no-leader", default: 0] += 1
            await note("burst", "skipped", ["phase": phase, "shard": shard, "why": "no leader"])
            return
        }
        let placed = Set(cluster.replicas(of: shard))
        let followers = cluster.nodes.filter { $0 != leader && placed.contains($0) }
        guard !followers.isEmpty else {
            await note("burst", "skipped", ["phase": phase, "shard": shard, "why": "no follower (replication 1)"])
            return
        }
        let follower = followers[Int(pickFollower % UInt64(followers.count))]
        let healthy = cluster.nodes.filter { $0 != follower }
        func detail() -> [String: Any] {
            ["phase": phase, "shard": shard, "stream": stream, "leader": leader, "follower": follower, "lag": lag.rawValue, "then": then.rawValue]
        }
        counts["burst", default: 0] += 1
        counts["burst:lag-\(lag.rawValue)", default: 0] += 1

        switch lag {
        case .pause: cluster.pause(follower)
        case .partition:
            for o in healthy {
                try network.cut(from: follower, to: o)
                try network.cut(from: o, to: follower)
            }
        case .kill:
            cluster.kill(follower)
            counts["sigkill", default: 0] += 1
        }
        await note("burst", "lag", detail())

        // The burst: mostly to the leader, some through the other healthy node (which forwards).
        let writer = BurstWriter(client: client, history: history, phase: phase, shard: shard, stream: stream, batch: 1024, lanes: 8)
        let targets = [leader, leader, leader] + healthy.filter { $0 != leader }
        let writeEnd = Locked(ContinuousClock.now + hold + tail)
        let limit = burstRecords
        let burstTask = Task { await writer.run(targets: { targets }, until: { writeEnd.withLock { $0 } }, maxRecords: limit, seed: burstSeed) }
        try await Task.sleep(for: hold)

        // Files: the follower loses its whole log (its first segment deleted while it is down, a disk fault
        // on one node), so it shares nothing with the leader, which ships it its sealed segment files.
        var filesForced = false
        if wantFiles {
            // One node's data at a time (as for disk faults): no other node may still be repairing. The
            // follower stays behind, and the burst goes on, for up to 10 s more while one finishes.
            let gateEnd = ContinuousClock.now + .seconds(10)
            var allowed = false
            while true {
                if ContinuousClock.now - lastDiskFault > .seconds(8) { allowed = await anyRecovering(excluding: follower) == false }
                if allowed || ContinuousClock.now >= gateEnd { break }
                try await Task.sleep(for: .milliseconds(250))
            }
            if allowed {
                if cluster.isRunning(follower) {
                    cluster.kill(follower)
                    counts["sigkill", default: 0] += 1
                }
                if let what = cluster.deleteFirstSegment(follower, shard: shard) {
                    filesForced = true
                    lastDiskFault = ContinuousClock.now
                    counts["burst:files-forced", default: 0] += 1
                    await note("burst", "delete-log", ["phase": phase, "node": follower, "detail": what])
                }
            } else {
                counts["burst:files-deferred", default: 0] += 1
            }
        }
        let installedBefore = cluster.logLines(follower, containing: Self.filesLine)
        writeEnd.withLock { $0 = ContinuousClock.now + tail }
        try network.heal()
        if cluster.isPaused(follower) { cluster.resume(follower) }
        if !cluster.isRunning(follower) { try cluster.start(follower) }
        let healedAt = ContinuousClock.now
        var healed = detail()
        healed["files_forced"] = filesForced
        await note("burst", "healed", healed)

        switch then {
        case .catchUp:
            break
        case .restartFollower:
            // SIGKILL the follower while it is being sent files (or while it catches up from the log).
            let staged = filesForced ? await waitForShipping(follower, shard: shard, installedBefore: installedBefore, timeout: .seconds(5)) : 0
            try await Task.sleep(for: delay)
            let installed = cluster.logLines(follower, containing: Self.filesLine) > installedBefore
            let stagedNow = cluster.stagedBytes(follower, shard: shard)
            cluster.kill(follower)
            counts["sigkill", default: 0] += 1
            counts["burst:restart-follower", default: 0] += 1
            let during = filesForced && !installed && max(staged, stagedNow) > 0
            if during { counts["burst:kill-during-shipping", default: 0] += 1 }
            await note(
                "burst", "kill-follower",
                [
                    "phase": phase, "node": follower, "staged_bytes": stagedNow, "staged_bytes_seen": staged, "files_installed_before_kill": installed,
                    "during_shipping": during, "ms_after_heal": Self.ms(ContinuousClock.now - healedAt),
                ])
            try await Task.sleep(for: down)
            try cluster.start(follower)
            await note("burst", "restart-follower", ["phase": phase, "node": follower])
        case .leaderChange:
            let staged = filesForced ? await waitForShipping(follower, shard: shard, installedBefore: installedBefore, timeout: .seconds(5)) : 0
            try await Task.sleep(for: delay)
            let installed = cluster.logLines(follower, containing: Self.filesLine) > installedBefore
            guard let l = await self.leader(shard: shard), cluster.nodes.contains(l), l != follower else {
                counts["burst:leader-change-skipped", default: 0] += 1
                await note("burst", "leader-change-skipped", ["phase": phase, "why": "no leader other than the follower"])
                break
            }
            let by = isolateLeader ? "isolate" : "kill"
            counts["burst:leader-change-\(by)", default: 0] += 1
            if filesForced && !installed && staged > 0 { counts["burst:leader-change-during-shipping", default: 0] += 1 }
            if isolateLeader {
                for o in cluster.nodes where o != l {
                    try network.cut(from: l, to: o)
                    try network.cut(from: o, to: l)
                }
            } else {
                cluster.kill(l)
                counts["sigkill", default: 0] += 1
            }
            await note(
                "burst", "leader-\(by)",
                ["phase": phase, "node": l, "staged_bytes_seen": staged, "files_installed_before": installed, "ms_after_heal": Self.ms(ContinuousClock.now - healedAt)])
            try await Task.sleep(for: down + .milliseconds(500))
            if isolateLeader { try network.heal() } else { try cluster.start(l) }
            await note("burst", "leader-back", ["phase": phase, "node": l])
        }

        let tally = await burstTask.value
        let t = tally.snapshot
        burstAcked += t.acked
        var target: UInt64 = 0
        let targetEnd = ContinuousClock.now + .seconds(10)
        while target == 0, ContinuousClock.now < targetEnd {
            for n in cluster.nodes where n != follower {
                if let s = await shardStatus(node: n, shard: shard) { target = max(target, (s["commit_index"] as? NSNumber)?.uint64Value ?? 0) }
            }
            if target == 0 { try await Task.sleep(for: .milliseconds(250)) }
        }
        await note(
            "burst", "end",
            [
                "phase": phase, "shard": shard, "follower": follower, "acked_records": t.acked, "acked_batches": t.batches,
                "indeterminate_batches": t.indeterminate, "files_forced": filesForced, "target_index": target,
            ])
        // The catch-up is watched in the background (the schedule goes on): until the follower has applied
        // what the leader had committed when the burst ended, for at most a minute.
        let observer = Task { [self] in
            let waitEnd = ContinuousClock.now + .seconds(60)
            var caughtUp: Double? = nil
            while target > 0, ContinuousClock.now < waitEnd {
                if let s = await shardStatus(node: follower, shard: shard), let a = (s["applied_index"] as? NSNumber)?.uint64Value, a >= target {
                    let d = ContinuousClock.now - healedAt
                    caughtUp = Double(Self.ms(d)) / 1000
                    break
                }
                try? await Task.sleep(for: .milliseconds(250))
            }
            let installed = cluster.logLines(follower, containing: Self.filesLine) - installedBefore
            if target > 0 { catchUpLog.withLock { $0.append((caughtUp, installed > 0)) } }
            await note(
                "burst", "caught-up",
                [
                    "phase": phase, "shard": shard, "follower": follower, "target_index": target, "caught_up_s": caughtUp ?? -1,
                    "files_installed": installed,
                ])
        }
        observers.withLock { $0.append(observer) }
    }
}
