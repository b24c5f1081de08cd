import ArgumentParser
import Foundation
import NIOPosix

@main
struct Faults: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "weft-faults",
        abstract: "A Jepsen-style fault run: a cluster of weft processes in network namespaces, clients outside, a seeded nemesis, a checker.",
        discussion: """
            Needs root (ip netns, veth, a bridge, iptables). Writes <out>/history.jsonl (every operation and fault),
            <out>/nodes/n<i>.log, <out>/summary.txt; exits 1 when the checker finds anything lost, duplicated,
            divergent, refused-but-written, or a cursor read out of order, a hostile request taken or its record
            in a log, a shard whose group changed, a chat message lost, doubled, reordered or never sent in a
            history or a sync, an acknowledged chat message missing from the sender's next history page, a group
            message lost, doubled, reordered, shown to a non-member or never sent in a member's history or sync, a chat
            device (WebSocket) with a gap, a reordered or changed event, or without an acknowledged message, a write
            not acknowledged that was sent through another node 2 s into a fault of one node (kill, pause,
            isolation, majority-minority split), or when weft-dump --verify fails.
            """)

    @Option(help: "Minutes of faults (the workload runs throughout; healing and checking come after).")
    var minutes: Double = 2

    @Option(help: "Seed of the fault schedule (default: random, printed).")
    var seed: UInt64?

    @Option(help: "Output folder (default: fault-runs/<seed>).")
    var out: String?

    @Option(help: "The weft binary (default: next to this one).")
    var weft: String?

    @Option(help: "Nodes in the cluster.")
    var nodes: Int = 3

    @Option(help: "Shards (each a Raft group).")
    var shards: Int = 2

    @Option(help: "Replicas per shard (default: every node). Fewer than --nodes puts WebSocket devices on nodes without their user's home shard, served by forwarding (Docs/delivery.md).")
    var replication: Int?

    @Option(help: "Segment size in bytes (small, so that faults hit sealed segments too).")
    var segmentBytes: Int = 65536

    @Option(help: "Concurrent writers.")
    var writers: Int = 6

    @Option(help: "Concurrent cursor readers.")
    var readers: Int = 3

    @Option(help: "Chat writers on the messaging API (users registered, logged in and made contacts first; histories and syncs checked after healing); 0: no chat workload.")
    var chatWriters: Int = 2

    @Option(help: "Group writers: the chat users' group (the owner adds members and members leave during the run; histories, syncs and membership checked after healing); 0: no group workload.")
    var groupWriters: Int = 2

    @Option(help: "WebSocket devices per chat user (connected through the faults, resuming after every close, a final catch-up after healing; checked against the acknowledged messages and the syncs); 0: none.")
    var chatDevices: Int = 2

    @Option(help: "Records one burst phase may send (1024-record binary batches, 8 in flight, to one shard while a follower lags); 0: no bursts.")
    var burstRecords: Int = 100_000

    @Flag(inversion: .prefixedNo, help: "Run the hostile client (reserved record types, oversize and malformed bodies, missing or wrong tokens).")
    var hostile = true

    @Flag(help: "Check the checker against histories with known anomalies, then exit (no root needed).")
    var selfCheck = false

    func run() async throws {
        if selfCheck {
            let (lines, ok) = SelfCheck.run()
            for l in lines { print(l) }
            if !ok { throw ExitCode(1) }
            return
        }
        guard (1...max(1, nodes)).contains(replication ?? nodes) else { throw HarnessError("--replication \(replication ?? nodes): 1…\(nodes) (the nodes)") }
        guard getuid() == 0 else { throw HarnessError("weft-faults needs root (network namespaces and iptables)") }
        for tool in ["ip", "iptables"] where (try? sh(["which", tool]))?.status != 0 {
            throw HarnessError("\(tool) not found: run Tools/install-deps.sh")
        }
        let seed = self.seed ?? UInt64.random(in: 1...UInt64(UInt32.max))
        let exe = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent().path
        let weft = self.weft ?? exe + "/weft"
        let dump = URL(fileURLWithPath: weft).deletingLastPathComponent().path + "/weft-dump"
        let out = URL(fileURLWithPath: self.out ?? "fault-runs/\(seed)").standardizedFileURL.path
        try? FileManager.default.removeItem(atPath: out)
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        print("weft-faults: seed \(seed), \(nodes) nodes, \(shards) shards, replication \(replication ?? nodes), \(minutes) min of faults, output in \(out)")

        let ids = Array(1...nodes)
        let network = try TestNetwork.create(nodes: ids)
        defer { network.destroy() }
        let token = Cluster.operatorToken(seed: seed)
        let cluster = try Cluster(
            nodes: ids, weft: weft, out: out, shards: shards, replication: replication ?? ids.count, segmentBytes: segmentBytes, token: token)
        defer { cluster.stopAll() }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let client = HTTPClient(group: group, token: token)
        let history = try History(path: out + "/history.jsonl")
        for n in ids { try cluster.start(n) }
        try await waitForLeaders(cluster, client, timeout: .seconds(60))
        // The group every shard starts with (and must end with: nothing in the run changes membership).
        let initialGroups = await groups(cluster, client)
        await history.write(["op": "groups", "type": "initial", "groups": Self.describe(initialGroups)])

        let chat = chatWriters > 0 || groupWriters > 0 ? try await ChatWorkload.setUp(client: client, nodes: ids, history: history) : nil
        if let chat { print("weft-faults: chat: \(chat.users.count) users, contacts \(chat.pairs.map { "\($0.a)-\($0.b)" }.joined(separator: " "))") }
        var groupChat: GroupChatWorkload?
        if let chat, groupWriters > 0 { groupChat = try await GroupChatWorkload.setUp(chat: chat) }
        if let g = groupChat?.setup { print("weft-faults: group \(g.group): owner \(g.owner), members \(g.initial)") }
        let groupWork = groupChat
        let subscribers = chat.flatMap { chatDevices > 0 ? ChatSubscribers(chat: $0, group: group, devicesPerUser: chatDevices) : nil }

        let nemesis = Nemesis(cluster: cluster, network: network, client: client, history: history, seed: seed, burstRecords: burstRecords)
        let workload = Workload(client: client, nodes: ids, shards: shards, history: history)
        let hostileClient = HostileClient(client: client, nodes: ids, shards: shards, history: history)
        let faultsEnd = ContinuousClock.now + .milliseconds(Int(minutes * 60_000))
        let workEnd = faultsEnd + .seconds(5)
        // The devices stay connected while the writers write (their own tasks: they return what they got).
        let devicesLive = subscribers.map { s in Task { await s.run(until: workEnd, seed: seed) } }
        await withThrowingTaskGroup(of: Void.self) { g in
            for w in 0..<writers { g.addTask { await workload.writer(w, until: workEnd, seed: seed) } }
            for r in 0..<readers {
                g.addTask { await workload.reader(100 + r, shard: r % shards, stream: 1 + r % workload.streams, until: workEnd, seed: seed) }
            }
            if hostile { g.addTask { await hostileClient.run(until: workEnd, seed: seed) } }
            if let chat { for w in 0..<chatWriters { g.addTask { await chat.writer(w, until: workEnd, seed: seed) } } }
            if let groupWork {
                for w in 0..<groupWriters { g.addTask { await groupWork.writer(w, until: workEnd, seed: seed) } }
                g.addTask { await groupWork.membership(until: faultsEnd - .seconds(15), seed: seed) }
            }
            g.addTask {
                while ContinuousClock.now < faultsEnd {
                    try await nemesis.step()
                    try await Task.sleep(for: .milliseconds(300 + Int(nemesis.rng.next() % 1200)))
                }
                try await nemesis.healAll()
            }
            while let r = await g.nextResult() {
                if case .failure(let e) = r { print("weft-faults: nemesis failed: \(e)") }
            }
        }
        try await nemesis.healAll()
        for t in nemesis.observers.withLock({ $0 }) { await t.value }
        let devicesDuringRun = await devicesLive?.value ?? []
        print("weft-faults: healed; waiting for every replica to converge")
        var converged = try await waitForConvergence(cluster, client, timeout: .seconds(180))
        // The relays finish copying fan-out records (their batches change the logs), then the logs settle.
        let relaysDone = await waitForRelays(cluster, client, timeout: .seconds(120))
        if converged { converged = try await waitForConvergence(cluster, client, timeout: .seconds(60)) }
        // The group workload's timeline, histories and syncs first (the chat syncs read next then hold every group event too).
        let groupSends = await history.groupSends
        let groupChanges = await history.groupChanges
        let groupRead = await groupWork?.readBack(sends: groupSends, changes: groupChanges, seed: seed)
        // The chat workload's histories and syncs, through the API (the relays have caught up).
        let chatSends = await history.chat
        let chatReads = await history.chatReads
        let chatRead = await chat?.readBack(sends: chatSends, seed: seed)
        // Each device's final catch-up (the cluster is healed and the relays are done): then it holds everything.
        let devicesCaughtUp = await subscribers?.catchUp(devicesDuringRun, seed: seed)
        let devices = devicesCaughtUp?.devices ?? []
        if subscribers != nil && converged {
            // A resume from a cursor above 0 (and an ack) makes the node write the user's `delivered` mark
            // (coalesced, flushed every 250 ms): those writes land before the logs are read and compared.
            try await Task.sleep(for: .seconds(1))
            converged = try await waitForConvergence(cluster, client, timeout: .seconds(60))
        }
        var logs: [Int: [Int: Checker.ReplicaLog]] = [:]
        for n in ids {
            for s in cluster.hosted(by: n) { logs[n, default: [:]][s] = try await readLog(node: n, shard: s, client) }
        }
        let finalGroups = await groups(cluster, client)
        await history.write(["op": "groups", "type": "final", "groups": Self.describe(finalGroups)])
        let repairs = await repairReport(cluster, client)
        let bursts = await history.bursts
        let hostileTally = await history.hostile
        let acked = await history.acked
        let failed = await history.failed
        let indeterminate = await history.indeterminate
        let anomalies = await history.readAnomalies
        let reads = await history.reads
        let recordsRead = await history.recordsRead
        let readBack = await history.seen
        let oneNodeFaults = await history.faults
        let probes = await history.probes
        let stalls = Availability.check(faults: oneNodeFaults, probes: probes)
        await history.close()
        cluster.stopAll()
        var verifyFailures: [String] = []
        for n in ids {
            let dir = cluster.dataDirectory(n)
            for s in ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter({ $0.hasPrefix("shard-") }).sorted() {
                let r = try sh([dump, "--verify", dir + "/" + s], allowFailure: true)
                if r.status != 0 { verifyFailures.append("\(dir)/\(s): \(r.output.split(separator: "\n").prefix(3).joined(separator: "; "))") }
            }
        }
        try? await group.shutdownGracefully()

        let chatRes = chat.map { ChatChecker.check(sends: chatSends, pairs: $0.pairs, histories: chatRead?.histories ?? [:], syncs: chatRead?.syncs ?? [:], reads: chatReads) } ?? Checker.Result()
        let wsRes =
            subscribers.map { _ in
                ChatChecker.checkDevices(devices, sends: chatSends, pairs: chat?.pairs ?? [], histories: chatRead?.histories ?? [:], syncs: chatRead?.syncs ?? [:])
            } ?? Checker.Result()
        let chatFailures = chatRead?.failures ?? []
        let groupRes = groupWork.map { GroupChatChecker.check(setup: $0.setup, sends: groupSends, changes: groupChanges, observed: groupRead?.observed ?? .init()) } ?? Checker.Result()
        let groupFailures = groupRead?.failures ?? []
        let wsFailures = devicesCaughtUp?.failures ?? []
        let res = Checker.check(
            logs: logs, acked: acked, failed: failed, indeterminate: indeterminate, shards: shards, readBack: readBack, bursts: bursts,
            groups: finalGroups, initialGroup: Set(ids), hostileAccepted: hostileTally.accepted,
            placement: Dictionary(uniqueKeysWithValues: (0..<shards).map { ($0, Set(cluster.replicas(of: $0))) }))
        let catchUps = nemesis.catchUpLog.withLock { $0 }
        let times = catchUps.compactMap(\.seconds).sorted()
        let counts = nemesis.counts.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        let pass = stalls.isEmpty && res.ok && chatRes.ok && wsRes.ok && groupRes.ok && groupFailures.isEmpty && chatFailures.isEmpty && wsFailures.isEmpty && anomalies.isEmpty && verifyFailures.isEmpty && converged && relaysDone
        let chatAcked = chatSends.values.filter { $0.messageID != nil }.count
        var lines: [String] = []
        lines.append("seed \(seed); \(nodes) nodes, \(shards) shards, replication \(replication ?? nodes), \(minutes) min of faults")
        lines.append("faults: \(counts)")
        lines.append("writes: \(acked.count) acknowledged, \(failed.count) failed (refused, or no connection), \(indeterminate.count) indeterminate")
        lines.append(
            "bursts: \(nemesis.burstPhase) phases, \(bursts.acked.count) batches acknowledged (\(bursts.ackedRecords) records), \(bursts.failed.count) failed, \(bursts.indeterminate.count) indeterminate; lagging follower caught up in \(times.count) of \(catchUps.count), \(catchUps.filter(\.files).count) from shipped files (median \(times.isEmpty ? "-" : String(format: "%.1f", times[times.count / 2])) s, max \(times.last.map { String(format: "%.1f", $0) } ?? "-") s)"
        )
        lines.append("reads: \(reads) cursor reads, \(recordsRead) records, \(anomalies.count) anomalies")
        lines.append(
            "hostile: \(hostileTally.sent) requests, \(hostileTally.refused) refused (4xx), \(hostileTally.unanswered) unanswered (node down or cut off), \(hostileTally.accepted.count) not refused (2xx/5xx), \(hostileTally.otherStatus.count) refused with another 4xx than the contract"
        )
        if let chat, let chatRead {
            let sends = chatSends.values
            let unknown = sends.filter { $0.messageID == nil && $0.unknown }.count
            let refused = sends.filter { $0.refusal != nil && $0.messageID == nil }
            let retried = sends.filter { $0.attempts > 1 }.count
            let ackedAfterUnknown = sends.filter { $0.unknown && $0.messageID != nil }.count
            let replayed = sends.filter { !$0.replays.isEmpty }
            let sameAnswer = replayed.filter { s in s.replays.allSatisfy { $0 == s.messageID } }.count
            lines.append(
                "chat: \(chat.users.count) users, \(chat.pairs.count) pairs, \(chatWriters) writers; \(sends.count) messages sent (\(retried) retried), \(chatAcked) acknowledged (\(ackedAfterUnknown) on a retry after an unknown outcome), \(refused.count) refused, \(unknown) of unknown outcome, \(sends.count - chatAcked - refused.count - unknown) never sent; \(replayed.count) sent again after the acknowledgement (\(sameAnswer) answered the same message); read back \(chatRead.histories.values.reduce(0) { $0 + $1.count }) history entries (\(chatRead.histories.count) histories), \(chatRead.syncs.values.reduce(0) { $0 + $1.count }) sync events (\(chatRead.syncs.count) users), \(chatRead.requests) requests, \(chatRead.failures.count) read failures"
            )
            lines.append("chat read your writes: \(ChatChecker.readSummary(chatReads))")
            lines.append(
                "chat findings: lost \(chatRes.lost.count), duplicated \(chatRes.duplicated.count), divergent \(chatRes.divergent.count), unexpected \(chatRes.unexpected.count), misplaced \(chatRes.misplaced.count), stale reads \(chatRes.stale.count)"
            )
            for s in refused.sorted(by: { $0.key < $1.key }).prefix(5) { lines.append("  note: chat \(s.key) refused: \(s.refusal ?? "")") }
            if subscribers != nil {
                lines.append("chat ws: \(ChatSubscribers.summary(devices, perUser: chatDevices))")
                let pp = ChatChecker.partitionPushes(devices, sends: chatSends, faults: oneNodeFaults)
                let slow = { (s: Double) in String(format: "%.2f", s) }
                lines.append(
                    "chat ws during two-way partitions (a measurement): \(pp.messages) messages acknowledged inside a cut; of their pushes to receivers' connections open through the heal, \(pp.beforeHeal) of \(pp.deliveries) came before it (slowest \(slow(pp.slowest)) s after the acknowledgement), on the cut pair's nodes \(pp.onCutNodesBeforeHeal) of \(pp.onCutNodes) (slowest \(slow(pp.slowestOnCutNodes)) s)"
                )
                for line in pp.slow.prefix(20) { lines.append("  slow push: \(line)") }
                lines.append(
                    "chat ws findings: lost \(wsRes.lost.count), duplicated \(wsRes.duplicated.count), divergent \(wsRes.divergent.count), unexpected \(wsRes.unexpected.count), misplaced \(wsRes.misplaced.count), catch-up failures \(wsFailures.count)"
                )
            }
        }
        if let groupWork, let groupRead {
            let sends = groupSends.values
            let acked = sends.filter { $0.messageID != nil }.count
            // Exclusive: a send refused on a retry after an unknown outcome counts as unknown (it may have landed).
            let unknown = sends.filter { $0.messageID == nil && $0.unknown }
            let refused = sends.filter { $0.refusal != nil && $0.messageID == nil }
            let retried = sends.filter { $0.attempts > 1 }.count
            let ackedAfterUnknown = sends.filter { $0.unknown && $0.messageID != nil }.count
            let replayed = sends.filter { !$0.replays.isEmpty }
            let sameAnswer = replayed.filter { s in s.replays.allSatisfy { $0 == s.messageID } }.count
            let refusedOnly = refused.filter { !$0.unknown }.count
            let o = groupRead.observed
            lines.append(
                "group: group \(groupWork.setup.group), \(groupWriters) writers; \(sends.count) messages sent (\(retried) retried), \(acked) acknowledged (\(ackedAfterUnknown) on a retry after an unknown outcome), \(refusedOnly) refused, \(unknown.count) of unknown outcome (\(refused.count - refusedOnly) refused on a retry), \(sends.count - acked - refusedOnly - unknown.count) never sent; \(replayed.count) sent again after the acknowledgement (\(sameAnswer) answered the same message); membership changes \(groupChanges.count) (\(groupChanges.filter(\.landed).count) landed, \(groupChanges.filter { $0.attempts > 1 }.count) retried), final members \(o.finalMembers.map { "\($0.sorted())" } ?? "not read"); read back \(o.histories.values.reduce(0) { $0 + $1.count }) history entries (\(o.histories.count) members), \(o.syncs.values.reduce(0) { $0 + $1.filter { $0.type == "group_message" }.count }) group_message events (\(o.syncs.count) users), \(groupRead.requests) requests, \(groupRead.failures.count) read failures"
            )
            lines.append(
                "group findings: lost \(groupRes.lost.count), duplicated \(groupRes.duplicated.count), divergent \(groupRes.divergent.count), unexpected \(groupRes.unexpected.count), misplaced \(groupRes.misplaced.count)"
            )
            for s in refused.sorted(by: { $0.key < $1.key }).prefix(5) { lines.append("  note: group \(s.key) (from \(s.from)) refused: \(s.refusal ?? "")") }
        }
        lines.append("groups: \(res.membership.isEmpty ? "every node reports voters \(ids) for every shard" : "\(res.membership.count) CHANGED")")
        lines.append("repairs reported by nodes: \(repairs)")
        lines.append("converged: \(converged); relays caught up: \(relaysDone); weft-dump --verify: \(verifyFailures.isEmpty ? "all pass" : "\(verifyFailures.count) FAIL")")
        lines.append(
            "lost \(res.lost.count), duplicated \(res.duplicated.count), divergent \(res.divergent.count), unexpected \(res.unexpected.count), misplaced \(res.misplaced.count), hostile \(res.hostile.count), membership \(res.membership.count)"
        )
        let wsFindings = (wsRes.lost + wsRes.duplicated + wsRes.divergent + wsRes.unexpected + wsRes.misplaced + wsFailures).map { "chat ws: " + $0 }
        let chatFindings = chatRes.lost + chatRes.duplicated + chatRes.divergent + chatRes.unexpected + chatRes.misplaced + chatRes.stale + wsFindings
            + chatFailures.map { "chat read: " + $0 }
        let groupFindings = groupRes.lost + groupRes.duplicated + groupRes.divergent + groupRes.unexpected + groupRes.misplaced + groupFailures.map { "group read: " + $0 }
        lines.append(
            "writes go on: \(oneNodeFaults.count) faults probed (\(oneNodeFaults.filter { $0.kind == "partition-two-way" }.count) two-way partitions), \(probes.count) writes (one-node faults: \(Availability.grace) s in, through the other nodes; after a storage-full, through every node to the shards its replica stopped; a two-way partition: once the link is down, through both nodes of the pair), \(probes.filter { $0.ok == true }.count) answered, \(stalls.count) stalls")
        let findings = stalls + res.lost + res.duplicated + res.divergent + res.unexpected + res.misplaced + res.hostile + res.membership + chatFindings + groupFindings + anomalies + verifyFailures
        for l in findings.prefix(20) { lines.append("  " + l) }
        for l in hostileTally.otherStatus.prefix(5) { lines.append("  note: " + l) }
        lines += (res.notes + chatRes.notes + groupRes.notes + wsRes.notes).map { "  " + $0 }
        lines.append(pass ? "PASS" : "FAIL")
        let text = lines.joined(separator: "\n") + "\n"
        try text.write(toFile: out + "/summary.txt", atomically: true, encoding: .utf8)
        print(text, terminator: "")
        print(
            "weft-faults: seed \(seed): \(acked.count) acknowledged, \(chatAcked) chat messages acknowledged, chat findings \(chatFindings.count), \(groupSends.values.filter { $0.messageID != nil }.count) group messages acknowledged, group findings \(groupFindings.count), lost \(res.lost.count), duplicated \(res.duplicated.count), divergent \(res.divergent.count), cursor anomalies \(anomalies.count), stalls \(stalls.count) -> \(pass ? "PASS" : "FAIL")"
        )
        if !pass { throw ExitCode(1) }
    }

    func status(_ n: Int, _ client: HTTPClient) async -> [[String: Any]]? {
        await client.json(host: TestNetwork.address(n), port: Cluster.apiPort, path: "/api/v1/cluster/status")?["shards"] as? [[String: Any]]
    }

    func waitForLeaders(_ cluster: Cluster, _ client: HTTPClient, timeout: Duration) async throws {
        let end = ContinuousClock.now + timeout
        while ContinuousClock.now < end {
            var all = true
            for n in cluster.nodes {
                guard let s = await status(n, client), s.count == cluster.hosted(by: n).count, s.allSatisfy({ $0["leader"] as? Int != nil }) else {
                    all = false
                    break
                }
            }
            if all { return }
            try await Task.sleep(for: .milliseconds(200))
        }
        throw HarnessError("no leader for every shard within \(timeout); see \(cluster.out)/nodes/")
    }

    /// Every replica of every shard applied the same index, no replica recovering, twice in a row.
    func waitForConvergence(_ cluster: Cluster, _ client: HTTPClient, timeout: Duration) async throws -> Bool {
        let end = ContinuousClock.now + timeout
        var stable = 0
        var last = ""
        while ContinuousClock.now < end {
            var view: [String] = []
            var ok = true
            for n in cluster.nodes {
                guard let s = await status(n, client), s.count == cluster.hosted(by: n).count else {
                    ok = false
                    break
                }
                for sh in s.sorted(by: { ($0["id"] as? Int ?? 0) < ($1["id"] as? Int ?? 0) }) {
                    let recovering = ((sh["repair"] as? [String: Any])?["recovering"] as? Bool) ?? false
                    if recovering || sh["leader"] as? Int == nil { ok = false }
                    view.append("\(sh["id"] ?? "?"):\(sh["applied_index"] ?? "?")")
                }
            }
            let perShard = Dictionary(grouping: view, by: { $0.split(separator: ":")[0] })
            if ok && perShard.values.allSatisfy({ Set($0).count == 1 }) && view.joined() == last {
                stable += 1
                if stable >= 2 { return true }
            } else {
                stable = 0
            }
            last = view.joined()
            try await Task.sleep(for: .milliseconds(500))
        }
        print("weft-faults: replicas did not converge within \(timeout): \(last)")
        return false
    }

    /// Every node's relays report no lag (`weft_relay_lag_records` 0 for every lane; refreshed once a
    /// second), twice in a row.
    func waitForRelays(_ cluster: Cluster, _ client: HTTPClient, timeout: Duration) async -> Bool {
        let end = ContinuousClock.now + timeout
        var clean = 0
        var lagging: [String] = []
        while ContinuousClock.now < end {
            lagging = []
            for n in cluster.nodes {
                guard case .response(200, let b) = await client.request(.GET, host: TestNetwork.address(n), port: Cluster.apiPort, path: "/metrics", timeout: .seconds(5))
                else {
                    lagging.append("node \(n): no metrics")
                    continue
                }
                for line in String(decoding: b, as: UTF8.self).split(separator: "\n") where line.hasPrefix("weft_relay_lag_records{") {
                    if let v = line.split(separator: " ").last.flatMap({ Double($0) }), v > 0 { lagging.append("node \(n): \(line)") }
                }
            }
            clean = lagging.isEmpty ? clean + 1 : 0
            if clean >= 2 { return true }
            try? await Task.sleep(for: .milliseconds(1500))
        }
        print("weft-faults: relays still lagging after \(timeout): \(lagging.prefix(4))")
        return false
    }

    /// Each shard's group as each node reports it (`replicas` of the cluster status); a node that does
    /// not answer within a few tries reports no group (a finding of the checker).
    func groups(_ cluster: Cluster, _ client: HTTPClient) async -> [Int: [Int: Checker.GroupView]] {
        var out: [Int: [Int: Checker.GroupView]] = [:]
        for n in cluster.nodes {
            out[n] = [:]
            for _ in 0..<10 {
                guard let s = await status(n, client) else {
                    try? await Task.sleep(for: .milliseconds(300))
                    continue
                }
                var view: [Int: Checker.GroupView] = [:]
                for sh in s {
                    guard let id = sh["id"] as? Int, let replicas = sh["replicas"] as? [[String: Any]] else { continue }
                    var g = Checker.GroupView(voters: [], learners: [])
                    for r in replicas {
                        guard let node = r["node"] as? Int else { continue }
                        if r["role"] as? String == "voter" { g.voters.insert(node) } else { g.learners.insert(node) }
                    }
                    view[id] = g
                }
                out[n] = view
                break
            }
        }
        return out
    }

    static func describe(_ groups: [Int: [Int: Checker.GroupView]]) -> [String: Any] {
        var d: [String: Any] = [:]
        for (n, shards) in groups {
            var s: [String: Any] = [:]
            for (id, g) in shards { s["\(id)"] = ["voters": g.voters.sorted(), "learners": g.learners.sorted()] }
            d["\(n)"] = s
        }
        return d
    }

    /// A page of `GET /api/v1/shards/{s}/log` (decoded with Codable: no object per field).
    struct LogPage: Decodable {
        struct Record: Decodable {
            var index: UInt64
            var term: UInt64
            var type: Int
            var stream: UInt64
            var seq: UInt64
            var payload_b64: String
        }
        var records: [Record]
    }

    func readLog(node: Int, shard: Int, _ client: HTTPClient) async throws -> Checker.ReplicaLog {
        var out = Checker.ReplicaLog(shard: shard)
        var last: UInt64 = 0
        var from: UInt64 = 1
        var failures = 0
        while true {
            let outcome = await client.request(
                .GET, host: TestNetwork.address(node), port: Cluster.apiPort, path: "/api/v1/shards/\(shard)/log?from=\(from)&limit=2000&consistency=local",
                timeout: .seconds(10))
            guard case .response(200, let body) = outcome, let page = try? JSONDecoder().decode(LogPage.self, from: Data(body)) else {
                failures += 1
                if failures > 20 { throw HarnessError("cannot read node \(node)'s log of shard \(shard) at \(from)") }
                try await Task.sleep(for: .milliseconds(500))
                continue
            }
            if page.records.isEmpty { return out }
            for x in page.records {
                let bytes = Data(base64Encoded: x.payload_b64).map { [UInt8]($0) } ?? []
                // Burst records are recognised from their bytes; only the others are kept, as text.
                let e = Checker.Entry(index: x.index, term: x.term, type: x.type, stream: x.stream, seq: x.seq, payload: "")
                out.add(e, payload: bytes)
                last = e.index
            }
            from = (last == 0 ? from : last) + 1
        }
    }

    /// What the nodes' logs say they repaired (the status counts only since each node's last start).
    func repairReport(_ cluster: Cluster, _ client: HTTPClient) async -> String {
        var parts: [String] = []
        for n in cluster.nodes {
            let log = (try? String(contentsOfFile: cluster.out + "/nodes/n\(n).log", encoding: .utf8)) ?? ""
            let lines = log.split(separator: "\n")
            let cuts = lines.filter { $0.contains("refetching") }.count
            let done = lines.filter { $0.contains("repaired: the log holds") }.count
            parts.append("node \(n): \(cuts) cut back, \(done) recoveries completed")
        }
        return parts.joined(separator: "; ")
    }
}
