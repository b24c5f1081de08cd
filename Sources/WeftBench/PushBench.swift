import ClusterConfig
import Dispatch
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket

/// `weft bench push`: real-time delivery over `GET /api/v1/ws` (Docs/delivery.md, Docs/benchmarks.md).
///
/// - Push latency: every user has one device connected over a WebSocket to a random node
///   (authenticated, resumed from 0, live). Senders send text messages to a contact at a target rate,
///   open loop, each message's content carrying its intended send time (nanoseconds of this process's
///   monotonic clock: one process, one clock); the recipient's socket reading the event gives the send →
///   push latency. A sweep of rates, a few seconds each, with the send → answer latency and the pushes
///   that never came.
/// - Idle sessions: N WebSockets that authenticate, resume and then only ping, spread over the nodes
///   from several loopback source addresses; each node's resident memory before and after gives the
///   server's bytes per idle session. One process holds at most its open file limit of sockets, so with
///   `idleClients` K > 1 the sessions are held by K child processes (`weft bench idle-client`, each with
///   its share), and the bench only signs up, measures and collects.
extension ClusterBench {
    /// How `runPush` sends: over each sender's own socket (`{"type":"send"}`), or `POST /api/v1/messages`.
    public enum SendPath: String, Codable, Sendable {
        case ws, http
    }

    public struct PushOptions: Sendable {
        /// Users in the push sweep, each with one device (a contact of the next: a ring).
        public var users = 200
        /// Target send rates (messages/s), one step each; empty: no sweep.
        public var rates: [Double] = [250, 500, 1000, 2000]
        public var stepSeconds = 5.0
        public var sendVia = SendPath.ws
        /// Keep-alive HTTP connections for `sendVia == .http` (one request at a time on each).
        public var httpConnections = 128
        /// A message acknowledged but not pushed this long after the step's last send is lost.
        public var pushTimeout = 10.0
        /// Idle sessions to open (0: none); they stay open during the sweep that follows.
        public var idleSessions = 0
        /// Idle sessions connect from 127.0.0.2 … 127.0.0.(1 + k), so that no source address runs out of ports
        /// (raised, and said so, when a source address would need more than `idleSessionsPerSourceMax`).
        public var sourceAddresses = 8
        /// Idle sessions being opened at a time (over all idle clients).
        public var connectConcurrency = 256
        /// Processes holding the idle sessions: 1, this one; K > 1, K children (`weft bench idle-client`)
        /// with n / K sessions each, for more sessions than one process's open file limit allows.
        public var idleClients = 1
        /// Seconds the idle sessions are held (and the servers' idle CPU measured) before memory is read.
        public var idleHold = 10.0
        /// Seconds to wait, with the nodes' pids printed, before opening idle sessions (to attach a profiler).
        public var pauseBeforeSessions = 0.0
        public var jsonOut: String?
        public var htmlOut: String?
        public init() {}
    }

    /// One idle client (`weft bench idle-client`, started by `weft bench push --idle-clients`): the idle
    /// sessions `range` of the bench's numbering, to `nodes` (API `host:port`, in the config's order), as
    /// the users whose tokens are the lines of `tokensFile`.
    public struct IdleClientOptions: Sendable {
        public var nodes: [String]
        public var tokensFile: String
        public var range: Range<Int>
        public var sourceAddresses: Int
        public var connectConcurrency: Int

        public init(nodes: [String], tokensFile: String, range: Range<Int>, sourceAddresses: Int, connectConcurrency: Int) {
            self.nodes = nodes
            self.tokensFile = tokensFile
            self.range = range
            self.sourceAddresses = sourceAddresses
            self.connectConcurrency = connectConcurrency
        }
    }

    /// One rate step of the sweep. Latencies in microseconds, from each message's intended send time.
    public struct PushStep: Codable, Sendable {
        public var target_rate: Double
        public var messages: Int
        /// Sends written / (last send − step start): below the target when the generator fell behind.
        public var sent_rate: Double
        /// Sends acknowledged / (last acknowledgement − step start).
        public var achieved_rate: Double
        public var acked: Int
        /// Sends answered with an error (rate limit, validation…); `first_refusal` names one.
        public var refused: Int
        public var first_refusal: String?
        /// Sends neither acknowledged nor refused by the end of the step's drain.
        public var unanswered: Int
        /// Acknowledged, but never pushed to the recipient's socket within `push_timeout_s`: must be 0.
        public var lost_pushes: Int
        /// The same message pushed twice to the recipient's socket: must be 0.
        public var duplicate_pushes: Int
        /// At the end of the sweep (one more `push_timeout_s` after the last step, if anything was
        /// missing): sends never answered, and acknowledged messages never pushed at all.
        public var never_answered: Int?
        public var never_pushed: Int?
        /// Send (intended time) → event read by the recipient's socket.
        public var push_latency_us: Percentiles
        /// Send (intended time) → the server's acknowledgement (`sent` frame or HTTP 200).
        public var ack_latency_us: Percentiles
        /// Intended send time → the bench actually writing the send: the generator's own lag, and over
        /// the socket the wait for a free slot of the device's 8 sends in flight.
        public var send_lag_us: Percentiles
        public var server_cores_busy: Double?
        public var client_cores_busy: Double
        /// Push latency per 100 ms of send time, from the start of the sweep.
        public var series: [SeriesPoint]
        /// Push latencies counted in the buckets `PushResult.histogram_edges_us`.
        public var histogram_counts: [Int]
    }

    public struct SeriesPoint: Codable, Sendable {
        /// Start of the 100 ms window of intended send times, ms since the sweep began.
        public var t_ms: Double
        public var sent: Int
        public var pushed: Int
        public var lost: Int
        public var p50_us: Double
        public var p99_us: Double
        public var max_us: Double
    }

    public struct IdleResult: Codable, Sendable {
        public var sessions_target: Int
        public var sessions_ready: Int
        public var failed: Int
        public var first_failure: String?
        public var users: Int
        public var source_addresses: Int
        public var connect_concurrency: Int
        public var connect_seconds: Double
        /// Sessions ready (connected, upgraded, authenticated, resumed) per second.
        public var connect_rate: Double
        /// Sessions closed by the servers while held.
        public var closed_while_held: Int
        public var close_codes: [String: Int]
        /// VmRSS of each node (KiB), before opening the sessions and after holding them.
        public var rss_before_kib: [Int]
        public var rss_after_kib: [Int]
        /// Sum over nodes of the VmRSS growth / sessions ready.
        public var server_bytes_per_session: Double
        /// The bench's VmRSS growth / sessions ready; with `clients` > 1, the idle clients' VmRSS growth
        /// from their start (tokens read, before connecting) to the end of the hold, summed, / sessions ready.
        public var client_bytes_per_session: Double
        /// Growth of the kernel's slab memory per session (/proc/meminfo `Slab`): both ends' sockets,
        /// files and epoll entries, since client and servers share this kernel. Machine-wide, so approximate.
        public var kernel_slab_bytes_per_session: Double
        /// CPU the nodes used while the sessions were idle (cores busy, all nodes), and before any session.
        public var server_cores_busy_idle: Double?
        public var server_cores_busy_baseline: Double?
        public var open_file_limit: Int
        /// Processes that held the sessions (`--idle-clients`); nil in results from before the option (1).
        public var clients: Int?
    }

    public struct PushResult: Codable, Sendable {
        /// The command line that produced it.
        public var command: String?
        public var date: String
        public var nodes: Int
        public var shards: Int
        public var replication: Int
        public var fsync: String
        public var users: Int
        public var send_via: SendPath
        public var step_seconds: Double
        public var push_timeout_s: Double
        public var steps: [PushStep]
        /// The highest target rate whose push p99 stayed under 100 ms with no lost push.
        public var max_rate_p99_under_100ms: Double?
        /// Upper edges of the histogram buckets (µs), 10 per decade; the last catches everything above.
        public var histogram_edges_us: [Double]
        public var idle: IdleResult?
    }

    /// Runs the idle sessions (if asked), then the rate sweep (if any rates), in one cluster.
    @discardableResult
    public mutating func runPush(_ o: PushOptions, print: @escaping @Sendable (String) -> Void) async throws -> PushResult {
        let plan = PushPlan(users: o.users, rates: o.rates, stepSeconds: o.stepSeconds, seed: 7)
        let m = config.messaging
        guard m.bcryptCost <= 4, m.actionsPerMinute >= 4, m.sendsPerMinute >= plan.maxSendsPerUser else {
            throw BenchFailure(
                description: "\(configPath): the push bench sends up to \(plan.maxSendsPerUser) messages from one user within the sweep "
                    + "(\(o.users) users, rates \(o.rates.map { Int($0) }), \(o.stepSeconds) s each): set [messaging] sends_per_minute >= \(plan.maxSendsPerUser), "
                    + "actions_per_minute >= 4 and bcrypt_cost = 4 (Docs/benchmarks.md)")
        }
        // Descriptors: one per session (and, in the nodes, one per session on that node), the sweep's
        // devices and HTTP connections, and ~1 000 for everything else (URLSession, segment files, peers).
        // With idle clients, this process holds no session: each client its share, each node its share.
        let sweepSockets = o.rates.isEmpty ? 0 : o.users + (o.sendVia == .http ? o.httpConnections : 0)
        let clients = max(1, o.idleClients)
        let perNode = (o.idleSessions + config.nodes.count - 1) / max(1, config.nodes.count)
        let perClient = (o.idleSessions + clients - 1) / clients
        let want = clients == 1 ? o.idleSessions + sweepSockets + 1024 : max(sweepSockets + 1024, perClient + 1024, perNode + sweepSockets + 1024)
        let need =
            clients == 1
            ? nil
            : "this run needs \(want) open files in each process: \(perClient) idle sessions in each of \(clients) idle clients and \(perNode) in each of "
                + "\(config.nodes.count) nodes, plus ~1 000"
        let fileLimit = try raiseOpenFileLimit(to: want, need: need, idleSessions: o.idleSessions)
        try startAll()
        defer { stopAll() }
        try await waitForLeaders()
        print(
            "weft bench push: \(config.nodes.count) nodes, \(config.shards) shards, replication \(config.replication), fsync \(config.storage.fsync); "
                + "open files limit \(fileLimit) (inherited by the nodes)")
        var result = PushResult(
            command: CommandLine.arguments.joined(separator: " "), date: ISO8601DateFormatter().string(from: Date()), nodes: config.nodes.count,
            shards: config.shards, replication: config.replication, fsync: config.storage.fsync.description, users: o.users, send_via: o.sendVia,
            step_seconds: o.stepSeconds, push_timeout_s: o.pushTimeout, steps: [], histogram_edges_us: PushRecorder.histogramEdges)
        var holding = IdleHolding()
        // Before the nodes are stopped (defers run last first): the idle clients, if still running.
        defer { holding.clients?.stop() }
        if o.idleSessions > 0 {
            let (idle, held) = try await runIdleSessions(o, openFileLimit: fileLimit, print: print)
            result.idle = idle
            holding = held
        }
        if !o.rates.isEmpty {
            result.steps = try await runSweep(o, plan: plan, print: print)
            result.max_rate_p99_under_100ms = result.steps.filter { $0.push_latency_us.p99 < 100_000 && $0.lost_pushes == 0 && $0.acked > 0 }
                .map(\.target_rate).max()
            print("highest rate with push p99 under 100 ms: \(result.max_rate_p99_under_100ms.map { "\(Int($0)) msgs/s" } ?? "none")")
        }
        if let clients = holding.clients { await clients.finish(print: print) }
        if let jsonOut = o.jsonOut {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            try enc.encode(result).write(to: URL(fileURLWithPath: jsonOut))
            print("result written to \(jsonOut)")
        }
        if let htmlOut = o.htmlOut {
            try Data(BenchReport.pushHTML(result).utf8).write(to: URL(fileURLWithPath: htmlOut))
            print("report written to \(htmlOut)")
        }
        withExtendedLifetime(holding.sockets) {}
        return result
    }

    // MARK: The rate sweep

    /// Signs up the users, connects one device each to a random node, then runs each rate step.
    func runSweep(_ o: PushOptions, plan: PushPlan, print: @escaping @Sendable (String) -> Void) async throws -> [PushStep] {
        let (ids, tokens) = try await signUp(o.users, prefix: "push", concurrency: 16)
        try await makeRing(ids: ids, tokens: tokens)
        print("\(o.users) users signed up, each a contact of the next")
        let recorder = PushRecorder(senders: plan.senders, receivers: plan.receivers)
        var rng = BenchRNG(seed: 11)
        let nodes = config.nodes
        let homes = (0..<o.users).map { _ in nodes[Int(rng.next() % UInt64(nodes.count))] }
        let sockets = try await withThrowingTaskGroup(of: DeviceSocket.self) { group in
            for u in 0..<o.users {
                group.addTask {
                    let s = try await DeviceSocket.open(
                        device: u, host: homes[u].apiAddress.host, port: homes[u].apiAddress.port, from: nil, token: tokens[u],
                        keepAlive: .live, observer: recorder)
                    try await s.ready.get()
                    return s
                }
            }
            var all: [DeviceSocket] = []
            for try await s in group { all.append(s) }
            return all.sorted { $0.device < $1.device }
        }
        let how = o.sendVia == .ws ? "over each sender's socket" : "with POST /api/v1/messages on \(o.httpConnections) connections to random nodes"
        print("\(sockets.count) devices connected over /api/v1/ws (random nodes), resumed and live; sending \(how)")
        var conns: [HTTPLoadConnection] = []
        if o.sendVia == .http {
            for _ in 0..<o.httpConnections {
                let n = nodes[Int(rng.next() % UInt64(nodes.count))]
                conns.append(try await HTTPLoadConnection.connect(host: n.apiAddress.host, port: n.apiAddress.port, group: MultiThreadedEventLoopGroup.singleton))
            }
        }
        let nonce = String(UInt32.random(in: 0...UInt32.max), radix: 36)
        let sweepStart = DispatchTime.now().uptimeNanoseconds
        var steps: [PushStep] = []
        for (s, rate) in o.rates.enumerated() {
            let range = plan.stepRanges[s]
            let templates = range.map { k in
                MessageTemplate(k: k, receiverID: ids[plan.receivers[k]], nonce: nonce, text: plan.text(k), frame: o.sendVia == .ws)
            }
            let step = try await runStep(
                rate: rate, range: range, templates: templates, o, sockets: sockets, conns: conns, tokens: tokens, plan: plan, recorder: recorder,
                sweepStart: sweepStart)
            steps.append(step)
            print(Self.describe(step))
            try await Task.sleep(for: .milliseconds(500))
        }
        // Late arrivals: a message counted lost may still come; after one more timeout, what never did.
        if steps.contains(where: { $0.lost_pushes > 0 || $0.unanswered > 0 }) {
            print("waiting \(Int(o.pushTimeout)) s more for late answers and pushes")
            try await Task.sleep(for: .seconds(o.pushTimeout))
        }
        for (s, range) in plan.stepRanges.prefix(steps.count).enumerated() {
            let (answered, pushed) = recorder.neverAnsweredOrPushed(range)
            steps[s].never_answered = answered
            steps[s].never_pushed = pushed
            if steps[s].lost_pushes > 0 || steps[s].unanswered > 0 {
                print("rate \(Int(steps[s].target_rate)): at the end of the sweep \(answered) sends never answered, \(pushed) acknowledged messages never pushed")
            }
        }
        let closes = recorder.closes
        if !closes.isEmpty { print("device sockets closed by the servers during the sweep (device: close codes): \(closes)") }
        for c in conns { await c.close() }
        for s in sockets { s.close() }
        return steps
    }

    /// One rate: the sends (open loop), then the drain — every send answered and every acknowledged
    /// message pushed, or `pushTimeout` after the last send — and the step's figures.
    func runStep(
        rate: Double, range: Range<Int>, templates: [MessageTemplate], _ o: PushOptions, sockets: [DeviceSocket], conns: [HTTPLoadConnection],
        tokens: [String], plan: PushPlan, recorder: PushRecorder, sweepStart: UInt64
    ) async throws -> PushStep {
        let serverCPU0 = serverCPUSeconds()
        let clientCPU0 = Self.ownCPUSeconds()
        let origin = DispatchTime.now().uptimeNanoseconds + 20_000_000
        let period = 1e9 / rate
        if o.sendVia == .ws {
            try await sendOverSockets(range: range, origin: origin, period: period, templates: templates, sockets: sockets, plan: plan, recorder: recorder)
        } else {
            await sendOverHTTP(range: range, origin: origin, period: period, templates: templates, conns: conns, tokens: tokens, plan: plan, recorder: recorder)
        }
        let lastSend = DispatchTime.now().uptimeNanoseconds
        while recorder.pending(range) > 0, DispatchTime.now().uptimeNanoseconds - lastSend < UInt64(o.pushTimeout * 1e9) {
            try await Task.sleep(for: .milliseconds(50))
        }
        let wall = Double(DispatchTime.now().uptimeNanoseconds - origin) / 1e9
        let serverCPU = serverCPUSeconds().flatMap { end in serverCPU0.map { end - $0 } }
        var step = recorder.step(range, targetRate: rate, origin: origin, sweepStart: sweepStart)
        step.server_cores_busy = serverCPU.map { $0 / wall }
        step.client_cores_busy = (Self.ownCPUSeconds() - clientCPU0) / wall
        return step
    }

    static func describe(_ s: PushStep) -> String {
        "rate \(Int(s.target_rate)) msgs/s: sent \(Int(s.sent_rate))/s, achieved \(Int(s.achieved_rate))/s (\(s.acked) of \(s.messages) acknowledged, "
            + "\(s.refused) refused, \(s.unanswered) unanswered); push \(s.push_latency_us.text); ack p50 \(s.ack_latency_us.ms(s.ack_latency_us.p50)) "
            + "p99 \(s.ack_latency_us.ms(s.ack_latency_us.p99)) ms; lost pushes \(s.lost_pushes), duplicates \(s.duplicate_pushes); "
            + "send lag p99 \(s.send_lag_us.ms(s.send_lag_us.p99)) ms; cores busy: servers \(s.server_cores_busy.map { f2($0) } ?? "?"), client \(f2(s.client_cores_busy))"
            + (s.first_refusal.map { "; first refusal: \($0)" } ?? "")
    }

    /// Sends one device keeps waiting for their answers at most, as a well-behaved client of the server's
    /// limit (`DeliverySocket.sendsInFlightMax`: more are refused with `too_many_requests`).
    static let sendsInFlightPerDevice = 8

    /// Open loop: message j of the step is due at `origin + j × period`; every due message is written
    /// on its sender's socket as soon as the pacer wakes, or, while that device already has
    /// `sendsInFlightPerDevice` sends unanswered, as soon as one is answered. Late ones keep their
    /// intended stamp, so the wait counts in their latency.
    func sendOverSockets(
        range: Range<Int>, origin: UInt64, period: Double, templates: [MessageTemplate], sockets: [DeviceSocket], plan: PushPlan,
        recorder: PushRecorder
    ) async throws {
        try await Self.paceOverSockets(
            count: range.count, origin: origin, period: period, sender: { plan.senders[range.lowerBound + $0] }, inFlight: { recorder.inFlight($0) }
        ) { j, stamp in
            let k = range.lowerBound + j
            recorder.sending(k, stamp: stamp)
            sockets[plan.senders[k]].send(templates[j].bytes(stamp: stamp))
        }
    }

    /// The open-loop pacer behind `sendOverSockets` (also `weft bench groups`): message j of `count` is
    /// due at `origin + j × period` and goes from device `sender(j)`; `send(j, stamp)` writes it with
    /// its intended stamp, at once when due, or — while the device has `sendsInFlightPerDevice` sends
    /// unanswered (`inFlight`) — as soon as one of them is answered, oldest first.
    static func paceOverSockets(
        count: Int, origin: UInt64, period: Double, sender: (Int) -> Int, inFlight: (Int) -> Int, send: (Int, UInt64) -> Void
    ) async throws {
        var j = 0
        // Per sender, the messages (j) waiting for a free slot, oldest first.
        var waiting: [Int: [Int]] = [:]
        var waitingCount = 0
        func due(_ j: Int) -> UInt64 { origin + UInt64(Double(j) * period) }
        while j < count || waitingCount > 0 {
            for u in Array(waiting.keys) {
                while let next = waiting[u]?.first, inFlight(u) < sendsInFlightPerDevice {
                    waiting[u]?.removeFirst()
                    waitingCount -= 1
                    send(next, due(next))
                }
                if waiting[u]?.isEmpty == true { waiting[u] = nil }
            }
            let now = DispatchTime.now().uptimeNanoseconds
            while j < count, due(j) <= now {
                let u = sender(j)
                if waiting[u] == nil && inFlight(u) < sendsInFlightPerDevice {
                    send(j, due(j))
                } else {
                    waiting[u, default: []].append(j)
                    waitingCount += 1
                }
                j += 1
            }
            let next = j < count ? due(j) : now + 1_000_000
            if next > now { try await Task.sleep(nanoseconds: min(next - now, waitingCount > 0 ? 500_000 : 2_000_000)) }
        }
    }

    /// Open loop over keep-alive HTTP connections: connection w takes the step's messages w, w + n, …,
    /// each at its due time or at once when the connection is still busy with the one before.
    func sendOverHTTP(
        range: Range<Int>, origin: UInt64, period: Double, templates: [MessageTemplate], conns: [HTTPLoadConnection], tokens: [String], plan: PushPlan,
        recorder: PushRecorder
    ) async {
        await withTaskGroup(of: Void.self) { group in
            for (w, conn) in conns.enumerated() {
                group.addTask {
                    for j in stride(from: w, to: range.count, by: conns.count) {
                        let k = range.lowerBound + j
                        let stamp = origin + UInt64(Double(j) * period)
                        let now = DispatchTime.now().uptimeNanoseconds
                        if stamp > now { try? await Task.sleep(nanoseconds: stamp - now) }
                        recorder.sending(k, stamp: stamp)
                        let status = try? await conn.post(
                            path: "/api/v1/messages", body: templates[j].bytes(stamp: stamp), contentType: "application/json", token: tokens[plan.senders[k]])
                        recorder.answered(k, refusal: status == 200 ? nil : "HTTP \(status.map(String.init) ?? "failed")", at: DispatchTime.now().uptimeNanoseconds)
                    }
                }
            }
        }
    }

    // MARK: Idle sessions

    /// Users for `n` idle sessions: session i goes to node i % nodes and belongs to user (i / nodes) / 14,
    /// so no user has more than 14 sessions on a node (the server allows 16: `InboxHub.sessionsPerUserMax`).
    static let idleSessionsPerUserPerNode = 14

    /// Idle sessions one loopback source address carries at most: a socket bound to (address, port 0)
    /// before it connects takes a port of its own, and the ephemeral range has ~28 000.
    static let idleSessionsPerSourceMax = 20_000

    /// What holds the idle sessions while the bench goes on: their sockets here, or the idle clients.
    struct IdleHolding {
        var sockets: [DeviceSocket] = []
        var clients: IdleClientGroup?
    }

    /// Source addresses for `n` idle sessions: as asked, or more when one would carry more than
    /// `idleSessionsPerSourceMax` (at most 250: 127.0.0.2 … 127.0.0.251).
    static func idleSourceAddresses(sessions n: Int, asked: Int) -> Int {
        min(250, max(1, asked, (n + idleSessionsPerSourceMax - 1) / idleSessionsPerSourceMax))
    }

    func runIdleSessions(_ o: PushOptions, openFileLimit: Int, print: @escaping @Sendable (String) -> Void) async throws -> (IdleResult, IdleHolding) {
        let nodes = config.nodes
        let per = Self.idleSessionsPerUserPerNode
        let perNode = (o.idleSessions + nodes.count - 1) / nodes.count
        let userCount = (perNode + per - 1) / per
        let clock = ContinuousClock()
        let t0 = clock.now
        let (_, tokens) = try await signUp(userCount, prefix: "idle", concurrency: 32)
        print("\(userCount) users signed up for \(o.idleSessions) idle sessions (\(per) per user and node) in \(f2(seconds(clock.now - t0))) s")
        // Settle, and the servers' CPU with no session (Raft heartbeats, relays, tails): the baseline.
        let base0 = serverCPUSeconds()
        let tb = clock.now
        try await Task.sleep(for: .seconds(3))
        let baseline = serverCPUSeconds().flatMap { end in base0.map { (end - $0) / seconds(clock.now - tb) } }
        let pids = processes.keys.sorted().compactMap { processes[$0]?.processIdentifier }
        let rssBefore = pids.map { residentKiB(pid: $0) ?? 0 }
        let clientBefore = residentKiB(pid: getpid()) ?? 0
        let slabBefore = kernelSlabKiB()
        print("resident memory before the sessions, per node: \(rssBefore.map { "\($0 / 1024) MiB" }.joined(separator: ", ")); client \(clientBefore / 1024) MiB")
        if o.pauseBeforeSessions > 0 {
            print("node pids: \(pids.map(String.init).joined(separator: " ")); waiting \(Int(o.pauseBeforeSessions)) s before opening sessions")
            try await Task.sleep(for: .seconds(o.pauseBeforeSessions))
        }
        let n = o.idleSessions
        let clientCount = max(1, min(o.idleClients, n))
        let lanes = max(1, min(o.connectConcurrency, n))
        let k = Self.idleSourceAddresses(sessions: n, asked: o.sourceAddresses)
        let pairs = k / gcd(k, nodes.count) * nodes.count
        print(
            "sessions from 127.0.0.2 … 127.0.0.\(1 + k) (\(k) source addresses\(k > o.sourceAddresses ? ", raised from --source-addresses \(o.sourceAddresses)" : "")): "
                + "at most \((n + k - 1) / k) per source address, \((n + pairs - 1) / pairs) per source address and node; "
                + (clientCount == 1 ? "held by this process" : "held by \(clientCount) idle clients (\((n + clientCount - 1) / clientCount) each at most)"))
        let targets = nodes.map { IdleTarget(host: $0.apiAddress.host, port: $0.apiAddress.port, label: "node \($0.id.rawValue)") }
        let counter = IdleObserver()
        var holding = IdleHolding()
        do {
            let tc = clock.now
            var opened = 0
            var failed = 0
            var firstFailure: String?
            // The idle clients' VmRSS at their start, summed (KiB).
            var clientsStartKiB = 0
            if clientCount == 1 {
                let out = await Self.openIdleSessions(0..<n, targets: targets, tokens: tokens, sources: k, lanes: lanes, observer: counter) { total in
                    if total % 10_000 == 0 { print("\(total) sessions ready after \(f2(seconds(clock.now - tc))) s") }
                }
                holding.sockets = out.sockets
                opened = out.sockets.count
                failed = out.failed
                firstFailure = out.first
            } else {
                // The tokens go to the children in a file (one per line), removed once they are connected.
                let tokensPath = FileManager.default.temporaryDirectory.appendingPathComponent("weft-idle-tokens-\(getpid()).txt").path
                guard FileManager.default.createFile(atPath: tokensPath, contents: Data((tokens.joined(separator: "\n") + "\n").utf8), attributes: [.posixPermissions: 0o600])
                else { throw BenchFailure(description: "could not write the idle clients' tokens to \(tokensPath)") }
                defer { try? FileManager.default.removeItem(atPath: tokensPath) }
                let ranges = (0..<clientCount).map { c in (c * n / clientCount)..<((c + 1) * n / clientCount) }
                let lanesEach = (lanes + clientCount - 1) / clientCount
                let nodeList = nodes.map { "\($0.apiAddress.host):\($0.apiAddress.port)" }.joined(separator: ",")
                let group = try IdleClientGroup(executable: executable, ranges: ranges) { r in
                    [
                        "bench", "idle-client", "--nodes", nodeList, "--tokens", tokensPath, "--from", String(r.lowerBound), "--to", String(r.upperBound),
                        "--source-addresses", String(k), "--connect-concurrency", String(lanesEach),
                    ]
                }
                holding.clients = group
                print("\(clientCount) idle clients started (pids \(group.pids.map(String.init).joined(separator: " "))), \(lanesEach) sessions being opened at a time in each")
                for c in try await group.waitConnected(since: tc, print: print) {
                    opened += c.ready
                    failed += c.failed ?? 0
                    if firstFailure == nil { firstFailure = c.first_failure }
                    clientsStartKiB += c.rss_start_kib ?? 0
                }
            }
            let connectSeconds = max(1e-9, seconds(clock.now - tc))
            print(
                "\(opened) idle sessions ready in \(f2(connectSeconds)) s = \(Int(Double(opened) / connectSeconds)) sessions/s; "
                    + "\(failed) failed\(firstFailure.map { " (first: \($0))" } ?? "")")
            let closedBefore = counter.snapshot.closed
            let cpu0 = serverCPUSeconds()
            let th = clock.now
            try await Task.sleep(for: .seconds(o.idleHold))
            let cpu = serverCPUSeconds().flatMap { end in cpu0.map { end - $0 } }
            let holdSeconds = seconds(clock.now - th)
            let rssAfter = pids.map { residentKiB(pid: $0) ?? 0 }
            let clientAfter = holding.clients?.residentKiB() ?? residentKiB(pid: getpid()) ?? 0
            let clientGrown = holding.clients == nil ? clientAfter - clientBefore : clientAfter - clientsStartKiB
            let slabAfter = kernelSlabKiB()
            var closes = counter.snapshot
            closes.closed -= closedBefore
            if let group = holding.clients { closes = await group.report(print: print) }
            let ready = max(1, opened)
            let grown = zip(rssAfter, rssBefore).map { $0 - $1 }.reduce(0, +)
            let result = IdleResult(
                sessions_target: n, sessions_ready: opened, failed: failed, first_failure: firstFailure, users: userCount, source_addresses: k,
                connect_concurrency: lanes, connect_seconds: connectSeconds, connect_rate: Double(opened) / connectSeconds,
                closed_while_held: closes.closed, close_codes: closes.codes,
                rss_before_kib: rssBefore, rss_after_kib: rssAfter, server_bytes_per_session: Double(grown) * 1024 / Double(ready),
                client_bytes_per_session: Double(clientGrown) * 1024 / Double(ready),
                kernel_slab_bytes_per_session: Double((slabAfter ?? 0) - (slabBefore ?? 0)) * 1024 / Double(ready),
                server_cores_busy_idle: cpu.map { $0 / holdSeconds }, server_cores_busy_baseline: baseline, open_file_limit: openFileLimit,
                clients: clientCount)
            let clientName = clientCount == 1 ? "client" : "idle clients"
            print(
                "resident memory after holding them \(Int(holdSeconds)) s, per node: \(rssAfter.map { "\($0 / 1024) MiB" }.joined(separator: ", ")); "
                    + "\(clientName) \(clientAfter / 1024) MiB")
            print(
                "server memory per idle session: \(Int(result.server_bytes_per_session)) bytes (\(f2(result.server_bytes_per_session / 1024)) KiB; target ≤ 8 KiB); "
                    + "\(clientName) \(Int(result.client_bytes_per_session)) bytes; kernel slab (both ends) \(Int(result.kernel_slab_bytes_per_session)) bytes")
            print(
                "servers' CPU while the sessions were idle: \(result.server_cores_busy_idle.map { f2($0) } ?? "?") cores "
                    + "(\(result.server_cores_busy_baseline.map { f2($0) } ?? "?") with no session); closed by the servers while held: "
                    + "\(result.closed_while_held) \(closes.codes)")
            return (result, holding)
        } catch {
            holding.clients?.stop()
            throw error
        }
    }

    /// Opens idle sessions `range`: session i to `targets[i % targets.count]` from 127.0.0.(2 + i % sources)
    /// as user (i / targets.count) / `idleSessionsPerUserPerNode` (`tokens`), `lanes` being opened at a
    /// time; `ready(total)` after each one ready. The sessions ready, the failures, the first failure.
    static func openIdleSessions(
        _ range: Range<Int>, targets: [IdleTarget], tokens: [String], sources: Int, lanes: Int, observer: IdleObserver,
        ready: @escaping @Sendable (Int) -> Void
    ) async -> (sockets: [DeviceSocket], failed: Int, first: String?) {
        guard !targets.isEmpty, !range.isEmpty else { return ([], range.count, targets.isEmpty ? "no node to connect to" : nil) }
        let per = idleSessionsPerUserPerNode
        let lanes = max(1, min(lanes, range.count))
        let sources = max(1, sources)
        return await withTaskGroup(of: ([DeviceSocket], Int, String?).self) { group in
            for lane in 0..<lanes {
                group.addTask {
                    var opened: [DeviceSocket] = []
                    var failed = 0
                    var first: String?
                    for i in stride(from: range.lowerBound + lane, to: range.upperBound, by: lanes) {
                        let target = targets[i % targets.count]
                        let user = (i / targets.count) / per
                        do {
                            guard user < tokens.count else { throw BenchFailure(description: "no token for user \(user) (\(tokens.count) tokens)") }
                            let s = try await DeviceSocket.open(
                                device: i, host: target.host, port: target.port, from: "127.0.0.\(2 + i % sources)",
                                token: tokens[user], keepAlive: .idle, observer: observer)
                            try await s.ready.get()
                            opened.append(s)
                            ready(observer.opened())
                        } catch {
                            failed += 1
                            if first == nil { first = "session \(i) to \(target.label): \(error)" }
                            // Many failures in a row (ports or file descriptors gone): this lane stops.
                            if failed > 50 && opened.count < failed { break }
                        }
                    }
                    return (opened, failed, first)
                }
            }
            var all: ([DeviceSocket], Int, String?) = ([], 0, nil)
            for await part in group {
                all.0 += part.0
                all.1 += part.1
                if all.2 == nil { all.2 = part.2 }
            }
            return all
        }
    }

    /// `weft bench idle-client` (one of `weft bench push --idle-clients K`): opens idle sessions
    /// `o.range` exactly as the bench would in-process (`openIdleSessions`), prints a JSON line
    /// (`IdleClientReport`) every 1 000 sessions ready (`progress`) and once all are tried (`connected`),
    /// then holds them: a line `report` on stdin prints its closes so far (`held`); the end of stdin or
    /// SIGTERM prints them a last time (`closed`) and returns.
    public static func runIdleClient(_ o: IdleClientOptions) async throws {
        let out = IdleReportWriter()
        // The bench's limit is inherited; as far as the hard limit goes, in case it was lower.
        let limit = raiseFileLimit(to: Int.max)?.soft ?? 0
        var targets: [IdleTarget] = []
        for a in o.nodes {
            guard let colon = a.lastIndex(of: ":"), let port = Int(a[a.index(after: colon)...]), port > 0, port < 65_536, colon > a.startIndex else {
                throw BenchFailure(description: "--nodes: \(a) is not host:port")
            }
            targets.append(IdleTarget(host: String(a[..<colon]), port: port, label: a))
        }
        guard !targets.isEmpty else { throw BenchFailure(description: "--nodes: no node") }
        let tokens = try String(contentsOfFile: o.tokensFile, encoding: .utf8).split(separator: "\n").map(String.init)
        if limit < o.range.count + 64 {
            FileHandle.standardError.write(Data("weft bench idle-client: open file limit \(limit), for \(o.range.count) sessions: some will fail\n".utf8))
        }
        let rssStart = processResidentKiB(pid: getpid())
        let counter = IdleObserver()
        let clock = ContinuousClock()
        let t0 = clock.now
        let opened = await openIdleSessions(
            o.range, targets: targets, tokens: tokens, sources: o.sourceAddresses, lanes: o.connectConcurrency, observer: counter
        ) { total in
            if total % 1000 == 0 { out.emit(IdleClientReport(event: "progress", ready: total)) }
        }
        let closedAtConnected = counter.snapshot.closed
        let ready = opened.sockets.count
        out.emit(
            IdleClientReport(
                event: "connected", ready: ready, failed: opened.failed, first_failure: opened.first, connect_seconds: seconds(clock.now - t0),
                rss_start_kib: rssStart, open_file_limit: limit))
        let end = IdleClientEnd()
        signal(SIGTERM, SIG_IGN)
        let term = DispatchSource.makeSignalSource(signal: SIGTERM, queue: .global())
        term.setEventHandler { end.fire() }
        term.resume()
        let stdinReader = Thread {
            while let line = readLine() {
                guard line.trimmingCharacters(in: .whitespaces) == "report" else { continue }
                let s = counter.snapshot
                out.emit(IdleClientReport(event: "held", ready: ready, closed_while_held: s.closed - closedAtConnected, close_codes: s.codes))
            }
            end.fire()
        }
        stdinReader.start()
        await end.wait()
        let s = counter.snapshot
        out.emit(IdleClientReport(event: "closed", ready: ready, closed_while_held: s.closed - closedAtConnected, close_codes: s.codes))
        term.cancel()
        withExtendedLifetime(opened.sockets) {}
    }

    /// VmRSS of a process, KiB.
    func residentKiB(pid: Int32) -> Int? { Self.processResidentKiB(pid: pid) }

    static func processResidentKiB(pid: Int32) -> Int? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
            let line = text.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") })
        else { return nil }
        return line.split(separator: " ").dropFirst().first.flatMap { Int($0) }
    }

    /// The kernel's slab memory (`Slab:` of /proc/meminfo), KiB: socket objects, files, epoll entries.
    func kernelSlabKiB() -> Int? {
        guard let text = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8),
            let line = text.split(separator: "\n").first(where: { $0.hasPrefix("Slab:") })
        else { return nil }
        return line.split(separator: " ").dropFirst().first.flatMap { Int($0) }
    }

    /// Raises this process's RLIMIT_NOFILE (soft and hard) to at least `want`, up to the kernel's
    /// `fs.nr_open`; the nodes (and idle clients), started after, inherit it. The limit now in force.
    /// `need` says what the run needs when it is not raised far enough (default: `want` in the bench
    /// process, and its share in each node).
    func raiseOpenFileLimit(to want: Int, need: String? = nil, idleSessions: Int = 0) throws -> Int {
        guard let r = Self.raiseFileLimit(to: want) else { throw BenchFailure(description: "getrlimit(RLIMIT_NOFILE) failed: errno \(errno)") }
        guard r.soft >= want else {
            let needs = need ?? "this run needs \(want) open files in the bench process and about \(want / max(1, config.nodes.count)) in each node"
            // Under this hard limit, a process (bench, idle client or node) holds ~hard − 1 000 sessions.
            let cap = max(1, r.hard - 1024)
            let several =
                idleSessions > 0
                ? "; or, under this limit, for \(idleSessions) idle sessions: --idle-clients \((idleSessions + cap - 1) / cap) or more, "
                    + "and a config of \((idleSessions + cap - 1) / cap) nodes or more (\(config.nodes.count) now)"
                : ""
            throw BenchFailure(
                description: "\(needs); the limit is \(r.soft) (hard \(r.hard)), and it could not be raised: run as root, or raise `nofile` "
                    + "(ulimit -n, /etc/security/limits.conf, LimitNOFILE= in a systemd unit)\(several)")
        }
        return r.soft
    }

    /// Raises RLIMIT_NOFILE to at least `want` (soft and hard, up to `fs.nr_open`), or, without the
    /// right to raise the hard limit, the soft one as far as the hard one. The limits then in force
    /// (nil: getrlimit failed).
    static func raiseFileLimit(to want: Int) -> (soft: Int, hard: Int)? {
        #if os(Linux)
        let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
        #else
        let resource = RLIMIT_NOFILE
        #endif
        var r = rlimit()
        guard getrlimit(resource, &r) == 0 else { return nil }
        if Int(clamping: r.rlim_cur) >= want { return (Int(clamping: r.rlim_cur), Int(clamping: r.rlim_max)) }
        let nrOpen = (try? String(contentsOfFile: "/proc/sys/fs/nr_open", encoding: .utf8)).flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) } ?? 1 << 20
        let target = rlim_t(max(0, min(want, nrOpen)))
        var raised = rlimit(rlim_cur: target, rlim_max: max(r.rlim_max, target))
        if setrlimit(resource, &raised) != 0 {
            // Not allowed to raise the hard limit: the soft one as far as it goes.
            raised = rlimit(rlim_cur: min(target, r.rlim_max), rlim_max: r.rlim_max)
            _ = setrlimit(resource, &raised)
        }
        _ = getrlimit(resource, &r)
        return (Int(clamping: r.rlim_cur), Int(clamping: r.rlim_max))
    }
}

// MARK: The plan and the recorder

/// Who sends what: message k of the sweep goes from `senders[k]` to `receivers[k]`, a contact (the
/// next or previous user of the ring); step s is messages `stepRanges[s]`.
struct PushPlan: Sendable {
    let senders: [Int]
    let receivers: [Int]
    let stepRanges: [Range<Int>]
    /// The most messages one user sends in the sweep (the bucket of `sends_per_minute` must hold them).
    let maxSendsPerUser: Int
    let texts: [String]

    init(users: Int, rates: [Double], stepSeconds: Double, seed: UInt64) {
        var rng = BenchRNG(seed: seed)
        var s: [Int] = []
        var r: [Int] = []
        var ranges: [Range<Int>] = []
        for rate in rates {
            let count = max(1, Int(rate * stepSeconds))
            ranges.append(s.count..<(s.count + count))
            for k in 0..<count {
                let u = Int(rng.next() % UInt64(max(1, users)))
                s.append(u)
                r.append(k % 2 == 0 ? (u + 1) % users : (u + users - 1) % users)
            }
        }
        var perUser = [Int](repeating: 0, count: max(1, users))
        for u in s { perUser[u] += 1 }
        senders = s
        receivers = r
        stepRanges = ranges
        maxSendsPerUser = perUser.max() ?? 0
        // 64 chat texts of ~150 bytes, used in turn.
        var corpus = ChatCorpus(seed: 42, streams: 1)
        texts = (0..<64).map { _ in
            var text = ""
            while text.utf8.count < 140 { text += (text.isEmpty ? "" : " ") + corpus.sentence() }
            while text.utf8.count > 160, !text.isEmpty { text.removeLast() }
            return text
        }
    }

    func text(_ k: Int) -> String { texts[k % texts.count] }
}

/// A send's bytes with a 20-digit stamp spliced in: the message JSON (or, over the socket, the `send`
/// frame around it) whose content begins `wb <k> <stamp> `.
struct MessageTemplate: Sendable {
    let head: [UInt8]
    let tail: [UInt8]

    init(k: Int, receiverID: UInt64, nonce: String, text: String, frame: Bool) {
        self.init(k: k, to: "receiver_id", id: receiverID, nonce: nonce, text: text, frame: frame)
    }

    /// `to`: `receiver_id` (a 1:1 message) or `group_id` (a group message).
    init(k: Int, to field: String, id: UInt64, nonce: String, text: String, frame: Bool) {
        let placeholder = "wb \(k) " + String(repeating: "0", count: 20)
        let message: [String: Any] = [
            field: id, "message_type": "text", "content": "\(placeholder) \(text)", "client_msg_id": "p\(k).\(nonce)",
        ]
        var json = Array((try? JSONSerialization.data(withJSONObject: message)) ?? Data())
        if frame { json = Array(#"{"type":"send","request_id":"\#(k)","message":"#.utf8) + json + Array("}".utf8) }
        let marker = Array(placeholder.utf8)
        let at = FrameScan.find(marker, in: json[...]).map { $0 + marker.count - 20 } ?? json.count
        head = Array(json[..<at])
        tail = at + 20 <= json.count ? Array(json[(at + 20)...]) : []
    }

    func bytes(stamp: UInt64) -> [UInt8] {
        var out = head
        out.reserveCapacity(head.count + 20 + tail.count)
        var digits = [UInt8](repeating: UInt8(ascii: "0"), count: 20)
        var v = stamp
        var i = 19
        while v > 0, i >= 0 {
            digits[i] = UInt8(ascii: "0") + UInt8(v % 10)
            v /= 10
            i -= 1
        }
        return out + digits + tail
    }
}

/// Send, answer and push times of every message of the sweep (nanoseconds of `DispatchTime`), written
/// from the pacer and the sockets' event loops.
final class PushRecorder: DeviceObserver, @unchecked Sendable {
    /// Guards everything below.
    let lock = NSLock()
    let senders: [Int]
    let receivers: [Int]
    /// Intended send time (0: not sent yet), the time it was written, the answer's time.
    var stamp: [UInt64]
    var written: [UInt64]
    var answered: [UInt64]
    var refusal: [String?]
    /// When the recipient's socket read the push, and the stamp found in the pushed content.
    var pushed: [UInt64]
    var pushedStamp: [UInt64]
    var duplicates: [Int]
    /// Sends written and not answered yet, per sender.
    var inFlightBySender: [Int: Int] = [:]
    var echoes = 0
    var closeCodes: [Int: [UInt16]] = [:]

    init(senders: [Int], receivers: [Int]) {
        self.senders = senders
        self.receivers = receivers
        let n = senders.count
        stamp = .init(repeating: 0, count: n)
        written = .init(repeating: 0, count: n)
        answered = .init(repeating: 0, count: n)
        refusal = .init(repeating: nil, count: n)
        pushed = .init(repeating: 0, count: n)
        pushedStamp = .init(repeating: 0, count: n)
        duplicates = .init(repeating: 0, count: n)
    }

    func sending(_ k: Int, stamp s: UInt64) {
        let now = DispatchTime.now().uptimeNanoseconds
        lock.withLock {
            stamp[k] = s
            written[k] = now
            inFlightBySender[senders[k], default: 0] += 1
        }
    }

    func answered(_ k: Int, refusal why: String?, at t: UInt64) {
        lock.withLock {
            guard k >= 0, k < answered.count, answered[k] == 0 else { return }
            answered[k] = t
            refusal[k] = why
            if written[k] != 0 { inFlightBySender[senders[k], default: 1] -= 1 }
        }
    }

    // DeviceObserver

    func event(device: Int, frame: [UInt8], at t: UInt64) {
        guard let (k, s) = FrameScan.marker(in: frame) else { return }  // contact events of the catch-up
        lock.withLock {
            guard k < pushed.count else { return }
            if device == receivers[k] {
                if pushed[k] == 0 {
                    pushed[k] = t
                    pushedStamp[k] = s
                } else {
                    duplicates[k] += 1
                }
            } else if device == senders[k] {
                echoes += 1
            }
        }
    }

    func answer(requestID: Int, refusal why: String?, at t: UInt64) { answered(requestID, refusal: why, at: t) }

    func closed(device: Int, code: UInt16?) {
        lock.withLock { closeCodes[device, default: []].append(code ?? 0) }
    }

    var closes: [Int: [UInt16]] { lock.withLock { closeCodes } }

    func inFlight(_ sender: Int) -> Int { lock.withLock { inFlightBySender[sender] ?? 0 } }

    /// Messages of `range` still waiting: sent and not answered, or acknowledged and not pushed.
    func pending(_ range: Range<Int>) -> Int {
        lock.withLock {
            range.reduce(0) { n, k in
                n + ((written[k] != 0 && answered[k] == 0) || (answered[k] != 0 && refusal[k] == nil && pushed[k] == 0) ? 1 : 0)
            }
        }
    }

    /// Messages of `range` never answered, and acknowledged but never pushed, so far.
    func neverAnsweredOrPushed(_ range: Range<Int>) -> (Int, Int) {
        lock.withLock {
            let unanswered = range.filter { written[$0] != 0 && answered[$0] == 0 }.count
            let unpushed = range.filter { answered[$0] != 0 && refusal[$0] == nil && pushed[$0] == 0 }.count
            return (unanswered, unpushed)
        }
    }

    /// Histogram bucket edges (µs): 10 per decade from 10 µs to 100 s.
    static let histogramEdges: [Double] = (0...70).map { (10.0 * pow(10, Double($0) / 10) * 1000).rounded() / 1000 }

    func step(_ range: Range<Int>, targetRate: Double, origin: UInt64, sweepStart: UInt64) -> ClusterBench.PushStep {
        lock.withLock {
            var push: [Duration] = []
            var ack: [Duration] = []
            var lag: [Duration] = []
            var acked = 0
            var refused = 0
            var firstRefusal: String?
            var unanswered = 0
            var lost = 0
            var dups = 0
            var lastWrite = origin
            var lastAck = origin
            var hist = [Int](repeating: 0, count: Self.histogramEdges.count)
            // Per 100 ms of intended send time: latencies (µs), sent, lost.
            var windows: [Int: (lat: [Double], sent: Int, lost: Int)] = [:]
            for k in range where written[k] != 0 {
                let w = Int((stamp[k] - min(stamp[k], origin)) / 100_000_000)
                windows[w, default: ([], 0, 0)].sent += 1
                lag.append(.nanoseconds(Int64(written[k] - min(written[k], stamp[k]))))
                lastWrite = max(lastWrite, written[k])
                dups += duplicates[k]
                guard answered[k] != 0 else {
                    unanswered += 1
                    continue
                }
                if let why = refusal[k] {
                    refused += 1
                    if firstRefusal == nil { firstRefusal = why }
                    continue
                }
                acked += 1
                lastAck = max(lastAck, answered[k])
                ack.append(.nanoseconds(Int64(answered[k] - min(answered[k], stamp[k]))))
                guard pushed[k] != 0 else {
                    lost += 1
                    windows[w, default: ([], 0, 0)].lost += 1
                    continue
                }
                let ns = pushed[k] - min(pushed[k], pushedStamp[k])
                push.append(.nanoseconds(Int64(ns)))
                let us = Double(ns) / 1000
                windows[w, default: ([], 0, 0)].lat.append(us)
                hist[Self.histogramEdges.firstIndex { us <= $0 } ?? (hist.count - 1)] += 1
            }
            let offset = Double(origin - min(origin, sweepStart)) / 1e6
            let series = windows.keys.sorted().map { w -> ClusterBench.SeriesPoint in
                let v = windows[w] ?? ([], 0, 0)
                let sorted = v.lat.sorted()
                func q(_ p: Double) -> Double { sorted.isEmpty ? 0 : sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))] }
                return .init(t_ms: offset + Double(w) * 100, sent: v.sent, pushed: v.lat.count, lost: v.lost, p50_us: q(0.5), p99_us: q(0.99), max_us: sorted.last ?? 0)
            }
            return ClusterBench.PushStep(
                target_rate: targetRate, messages: range.count, sent_rate: Double(lag.count) / max(1e-9, Double(lastWrite - origin) / 1e9),
                achieved_rate: Double(acked) / max(1e-9, Double(lastAck - origin) / 1e9), acked: acked, refused: refused, first_refusal: firstRefusal,
                unanswered: unanswered, lost_pushes: lost, duplicate_pushes: dups, never_answered: nil, never_pushed: nil, push_latency_us: .init(push), ack_latency_us: .init(ack),
                send_lag_us: .init(lag), server_cores_busy: nil, client_cores_busy: 0, series: series, histogram_counts: hist)
        }
    }
}

/// Counts what happens to idle sessions.
final class IdleObserver: DeviceObserver, @unchecked Sendable {
    let lock = NSLock()
    var openedCount = 0
    var closedCount = 0
    var closeCodes: [String: Int] = [:]

    func opened() -> Int {
        lock.withLock {
            openedCount += 1
            return openedCount
        }
    }

    func event(device: Int, frame: [UInt8], at t: UInt64) {}
    func answer(requestID: Int, refusal: String?, at t: UInt64) {}
    func closed(device: Int, code: UInt16?) {
        lock.withLock {
            closedCount += 1
            closeCodes[code.map(String.init) ?? "none", default: 0] += 1
        }
    }

    /// Sessions closed so far (connect failures included), and their close codes.
    var snapshot: (closed: Int, codes: [String: Int]) { lock.withLock { (closedCount, closeCodes) } }
}

/// Where idle sessions connect: a node's API address, and how a failure names it.
struct IdleTarget: Sendable {
    let host: String
    let port: Int
    let label: String
}

fileprivate func gcd(_ a: Int, _ b: Int) -> Int { b == 0 ? max(1, a) : gcd(b, a % b) }

// MARK: Idle clients: idle sessions held by child processes

/// One line (JSON) of an idle client's stdout.
struct IdleClientReport: Codable, Sendable {
    /// `progress` (every 1 000 ready), `connected` (every session tried), `held` (asked: `report`), `closed` (the end).
    var event: String
    /// Sessions ready so far (`progress`), or all those that became ready.
    var ready: Int
    var failed: Int?
    var first_failure: String?
    var connect_seconds: Double?
    /// The client's VmRSS before it opened any session (KiB).
    var rss_start_kib: Int?
    var open_file_limit: Int?
    /// Sessions closed by the servers since `connected`, and the close codes of every close (failed connects included).
    var closed_while_held: Int?
    var close_codes: [String: Int]?
}

/// An idle client's stdout: whole lines, from any thread.
final class IdleReportWriter: Sendable {
    let lock = NSLock()

    func emit(_ r: IdleClientReport) {
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        guard let data = try? enc.encode(r) else { return }
        let bytes = Array(data) + [UInt8(ascii: "\n")]
        lock.withLock {
            bytes.withUnsafeBytes { buf in
                guard let base = buf.baseAddress else { return }
                var done = 0
                while done < buf.count {
                    let n = write(STDOUT_FILENO, base + done, buf.count - done)
                    if n > 0 {
                        done += n
                    } else if n < 0 && errno == EINTR {
                        continue
                    } else {
                        return  // the bench is gone (EPIPE): its stdin ends too
                    }
                }
            }
        }
    }
}

/// The end of an idle client's hold: its stdin closed, or SIGTERM, whichever comes first.
final class IdleClientEnd: @unchecked Sendable {
    let lock = NSLock()
    var fired = false
    var waiter: CheckedContinuation<Void, Never>?

    func fire() {
        let w: CheckedContinuation<Void, Never>? = lock.withLock {
            guard !fired else { return nil }
            fired = true
            defer { waiter = nil }
            return waiter
        }
        w?.resume()
    }

    func wait() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now: Bool = lock.withLock {
                if fired { return true }
                waiter = c
                return false
            }
            if now { c.resume() }
        }
    }
}

/// A child's stdout, read into lines on a thread of its own (to its end).
final class LineReader: @unchecked Sendable {
    /// Guards everything below.
    let lock = NSLock()
    var lines: [String] = []
    var partial: [UInt8] = []
    var ended = false
    let handle: FileHandle

    init(_ handle: FileHandle) {
        self.handle = handle
        let t = Thread { [self] in loop() }
        t.start()
    }

    func loop() {
        let fd = handle.fileDescriptor
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { break }
            lock.withLock {
                for b in buffer[0..<n] {
                    if b == UInt8(ascii: "\n") {
                        lines.append(String(decoding: partial, as: UTF8.self))
                        partial = []
                    } else {
                        partial.append(b)
                    }
                }
            }
        }
        lock.withLock {
            if !partial.isEmpty { lines.append(String(decoding: partial, as: UTF8.self)) }
            partial = []
            ended = true
        }
    }

    /// The lines read since the last call, and whether the output has ended (no line after these).
    func take() -> (lines: [String], ended: Bool) {
        lock.withLock {
            defer { lines = [] }
            return (lines, ended)
        }
    }
}

/// `weft bench push --idle-clients K`, the bench's side: the K `weft bench idle-client` processes that
/// hold the idle sessions, one range each. They print JSON lines (`IdleClientReport`); a line `report`
/// on a child's stdin asks for its closes so far, and the end of its stdin ends it. Every wait is
/// bounded; a child that does not end in time is killed.
final class IdleClientGroup: @unchecked Sendable {
    struct Child {
        let index: Int
        let range: Range<Int>
        let process: Process
        let input: FileHandle
        let output: LineReader
    }

    let children: [Child]
    /// Guards `inputsClosed`.
    let lock = NSLock()
    var inputsClosed = false

    init(executable: String, ranges: [Range<Int>], arguments: (Range<Int>) -> [String]) throws {
        // A child gone: a write to its stdin fails (EPIPE) instead of killing the bench; the children
        // inherit it, so one whose bench is gone fails its writes the same way, then sees its stdin end.
        signal(SIGPIPE, SIG_IGN)
        var started: [Child] = []
        do {
            for (c, r) in ranges.enumerated() {
                let p = Process()
                p.executableURL = URL(fileURLWithPath: executable)
                p.arguments = arguments(r)
                let input = Pipe()
                let output = Pipe()
                p.standardInput = input
                p.standardOutput = output
                try p.run()
                started.append(Child(index: c, range: r, process: p, input: input.fileHandleForWriting, output: LineReader(output.fileHandleForReading)))
            }
        } catch {
            for c in started { try? c.input.close() }
            Self.reap(started.map(\.process), grace: 5)
            throw error
        }
        children = started
    }

    var pids: [Int32] { children.map(\.process.processIdentifier) }

    /// The children's VmRSS, summed (KiB).
    func residentKiB() -> Int { children.reduce(0) { $0 + (ClusterBench.processResidentKiB(pid: $1.process.processIdentifier) ?? 0) } }

    /// A child's new lines, decoded (others printed as they are), and whether its output has ended.
    func take(_ c: Child, print: (String) -> Void) -> (reports: [IdleClientReport], ended: Bool) {
        let (lines, ended) = c.output.take()
        var reports: [IdleClientReport] = []
        for line in lines where !line.isEmpty {
            if let r = try? JSONDecoder().decode(IdleClientReport.self, from: Data(line.utf8)) {
                reports.append(r)
            } else {
                print("idle client \(c.index): \(line)")
            }
        }
        return (reports, ended)
    }

    /// Every child's `connected` line, printing the sessions ready over all children at each 10 000;
    /// throws when a child ends first, or when they are not all connected within a bound.
    func waitConnected(since start: ContinuousClock.Instant, print: @Sendable (String) -> Void) async throws -> [IdleClientReport] {
        let clock = ContinuousClock()
        var connected = [IdleClientReport?](repeating: nil, count: children.count)
        var ready = [Int](repeating: 0, count: children.count)
        var printed = 0
        // Generous: a failing session takes up to 30 s, and a lane gives up after 50 failures in a row.
        let limit = max(300, Double(children.map(\.range.count).max() ?? 0) / 20)
        while true {
            for c in children where connected[c.index] == nil {
                let (reports, ended) = take(c, print: print)
                for r in reports where r.event == "progress" || r.event == "connected" {
                    ready[c.index] = max(ready[c.index], r.ready)
                    if r.event == "connected" { connected[c.index] = r }
                }
                if connected[c.index] == nil && ended {
                    throw BenchFailure(
                        description: "idle client \(c.index) (sessions \(c.range.lowerBound)..<\(c.range.upperBound), pid \(c.process.processIdentifier)) "
                            + "ended before it had tried every session")
                }
            }
            let total = ready.reduce(0, +)
            if total / 10_000 > printed / 10_000 { print("\(total / 10_000 * 10_000) sessions ready after \(f2(seconds(clock.now - start))) s") }
            printed = max(printed, total)
            let done = connected.compactMap { $0 }
            if done.count == children.count { return done }
            if seconds(clock.now - start) > limit {
                throw BenchFailure(description: "\(children.count - done.count) of \(children.count) idle clients not done connecting after \(Int(limit)) s")
            }
            try await Task.sleep(for: .milliseconds(100))
        }
    }

    /// The sessions the servers closed since the children were connected, and the close codes, over
    /// all children (each asked with `report`; 30 s at most).
    func report(print: @Sendable (String) -> Void) async -> (closed: Int, codes: [String: Int]) {
        lock.withLock {
            guard !inputsClosed else { return }
            let line = Array("report\n".utf8)
            for c in children {
                _ = line.withUnsafeBytes { write(c.input.fileDescriptor, $0.baseAddress, $0.count) }
            }
        }
        let answers = await collect("held", within: 30, print: print)
        let missing = answers.filter { $0 == nil }.count
        if missing > 0 { print("\(missing) idle clients did not report their closes within 30 s") }
        return Self.sum(answers)
    }

    /// Ends the children: their stdin closed, their last closes collected (30 s at most), their exit
    /// awaited (10 s, then SIGKILL).
    func finish(print: @Sendable (String) -> Void) async {
        closeInputs()
        let answers = await collect("closed", within: 30, print: print)
        let (closed, codes) = Self.sum(answers)
        let missing = answers.filter { $0 == nil }.count
        print(
            "idle clients ending: \(closed) sessions closed by the servers while held, in all \(codes)"
                + (missing > 0 ? "; \(missing) clients did not answer within 30 s" : ""))
        let clock = ContinuousClock()
        let t0 = clock.now
        while children.contains(where: { $0.process.isRunning }), seconds(clock.now - t0) < 10 {
            try? await Task.sleep(for: .milliseconds(50))
        }
        let left = children.filter { $0.process.isRunning }
        if !left.isEmpty {
            print("killing \(left.count) idle clients still running 10 s after their stdin closed")
            Self.reap(left.map(\.process), grace: 0)
        }
    }

    /// Ends the children at once (stdin closed, 5 s, then SIGKILL), if still running: for errors and defers.
    func stop() {
        closeInputs()
        Self.reap(children.map(\.process), grace: 5)
    }

    func closeInputs() {
        lock.withLock {
            guard !inputsClosed else { return }
            inputsClosed = true
            for c in children { try? c.input.close() }
        }
    }

    /// Waits up to `grace` seconds for the processes to exit, then SIGKILLs the rest and waits up to 5 s more.
    static func reap(_ processes: [Process], grace: Double) {
        func wait(_ limit: Double) {
            let t0 = DispatchTime.now().uptimeNanoseconds
            while processes.contains(where: { $0.isRunning }), Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9 < limit { usleep(20_000) }
        }
        wait(grace)
        for p in processes where p.isRunning { kill(p.processIdentifier, SIGKILL) }
        wait(5)
    }

    /// Each child's `event` line (nil where none came before its output ended or `limit` seconds passed).
    func collect(_ event: String, within limit: Double, print: @Sendable (String) -> Void) async -> [IdleClientReport?] {
        let clock = ContinuousClock()
        let t0 = clock.now
        var got = [IdleClientReport?](repeating: nil, count: children.count)
        var ended = [Bool](repeating: false, count: children.count)
        while seconds(clock.now - t0) < limit {
            for c in children where got[c.index] == nil && !ended[c.index] {
                let t = take(c, print: print)
                got[c.index] = t.reports.last { $0.event == event }
                ended[c.index] = t.ended
            }
            if zip(got, ended).allSatisfy({ $0 != nil || $1 }) { break }
            try? await Task.sleep(for: .milliseconds(50))
        }
        return got
    }

    static func sum(_ reports: [IdleClientReport?]) -> (closed: Int, codes: [String: Int]) {
        var closed = 0
        var codes: [String: Int] = [:]
        for case let r? in reports {
            closed += r.closed_while_held ?? 0
            for (code, count) in r.close_codes ?? [:] { codes[code, default: 0] += count }
        }
        return (closed, codes)
    }
}

// MARK: The device: a WebSocket client of /api/v1/ws on a NIO channel

/// What a device socket reports, from its event loop (hand off, never block).
protocol DeviceObserver: AnyObject, Sendable {
    /// An inbox event (`{"type":"event",…}`), its bytes, read at `t` (DispatchTime nanoseconds).
    func event(device: Int, frame: [UInt8], at t: UInt64)
    /// The answer to send frame `requestID`: `sent` (refusal nil) or `error`.
    func answer(requestID: Int, refusal: String?, at t: UInt64)
    /// The connection ended (`code`: the server's close code, if it sent one).
    func closed(device: Int, code: UInt16?)
}

/// One device's session over `GET /api/v1/ws`, on a plain NIO channel: no task per connection, so a
/// bench process holds 100 000 of them. It authenticates and resumes from 0 at once, answers the
/// server's pings, and keeps the session alive (`KeepAlive`).
struct DeviceSocket: Sendable {
    let device: Int
    let channel: any Channel
    /// Succeeds at the server's `ready` (resumed, live); fails if the connection ends first or 30 s pass.
    let ready: EventLoopFuture<Void>

    /// When the device speaks: every `tick` it acknowledges new events, or pings when it has sent nothing
    /// for `pingAfter` (the server closes sessions silent for 90 s).
    struct KeepAlive: Sendable {
        var firstTick: TimeAmount
        var tick: TimeAmount
        var pingAfter: TimeAmount
        /// A device in use: acks every second.
        static let live = KeepAlive(firstTick: .seconds(1), tick: .seconds(1), pingAfter: .seconds(20))
        /// An idle device: a ping every 60 s, the first after 20-60 s so that pings spread out.
        static var idle: KeepAlive { KeepAlive(firstTick: .milliseconds(Int64.random(in: 20_000...60_000)), tick: .seconds(60), pingAfter: .zero) }
    }

    enum Upgrade: Sendable {
        case upgraded(any Channel, EventLoopFuture<Void>)
        case refused
    }

    /// Connects (from `local`, a source address, if given), upgrades, sends auth and resume.
    static func open(
        device: Int, host: String, port: Int, from local: String?, token: String, keepAlive: KeepAlive, observer: any DeviceObserver,
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    ) async throws -> DeviceSocket {
        var bootstrap = ClientBootstrap(group: group)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelOption(.socketOption(.so_reuseaddr), value: 1)
        if let local { bootstrap = bootstrap.bind(to: try SocketAddress(ipAddress: local, port: 0)) }
        let upgrade: EventLoopFuture<Upgrade> = try await bootstrap.connect(host: host, port: port) { channel in
            channel.eventLoop.makeCompletedFuture {
                let upgrader = NIOTypedWebSocketClientUpgrader<Upgrade>(maxFrameSize: 1 << 20) { channel, _ in
                    channel.eventLoop.makeCompletedFuture {
                        let ready = channel.eventLoop.makePromise(of: Void.self)
                        let handler = DeviceHandler(device: device, keepAlive: keepAlive, observer: observer, ready: ready)
                        try channel.pipeline.syncOperations.addHandler(handler)
                        return Upgrade.upgraded(channel, ready.futureResult)
                    }
                }
                var head = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/api/v1/ws")
                head.headers.add(name: "Host", value: "\(host):\(port)")
                let config = NIOTypedHTTPClientUpgradeConfiguration<Upgrade>(
                    upgradeRequestHead: head, upgraders: [upgrader],
                    notUpgradingCompletionHandler: { ch in ch.eventLoop.makeCompletedFuture { Upgrade.refused } })
                return try channel.pipeline.syncOperations.configureUpgradableHTTPClientPipeline(configuration: .init(upgradeConfiguration: config))
            }
        }
        switch try await upgrade.get() {
        case .upgraded(let channel, let ready):
            // Only now: until the upgrade completes, the HTTP handlers are still in the pipeline. Both
            // frames at once: the server handles a session's frames in order.
            let socket = DeviceSocket(device: device, channel: channel, ready: ready)
            socket.send(Array(#"{"type":"auth","token":\#(DeviceHandler.jsonString(token))}"#.utf8))
            socket.send(Array(#"{"type":"resume","cursor":"0"}"#.utf8))
            return socket
        case .refused: throw BenchFailure(description: "\(host):\(port) did not upgrade /api/v1/ws to a WebSocket")
        }
    }

    /// Writes a text frame (masked, as from any client), from any thread.
    func send(_ bytes: [UInt8]) {
        let frame = WebSocketFrame(fin: true, opcode: .text, maskKey: .random(), data: channel.allocator.buffer(bytes: bytes))
        channel.writeAndFlush(frame, promise: nil)
    }

    func close() { channel.close(promise: nil) }
}

/// The channel handler behind a `DeviceSocket`: on its event loop only.
final class DeviceHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = WebSocketFrame
    typealias OutboundOut = WebSocketFrame

    let device: Int
    let keepAlive: DeviceSocket.KeepAlive
    let observer: any DeviceObserver
    let ready: EventLoopPromise<Void>
    var context: ChannelHandlerContext?
    var isReady = false
    var settled = false
    /// The last event's cursor, and the last one acknowledged.
    var cursor: UInt64 = 0
    var acked: UInt64 = 0
    var lastSent = NIODeadline.now()
    /// A text message split over frames, until its last frame.
    var partial: [UInt8] = []
    var closeCode: UInt16?
    var timer: RepeatedTask?
    var deadline: Scheduled<Void>?

    init(device: Int, keepAlive: DeviceSocket.KeepAlive, observer: any DeviceObserver, ready: EventLoopPromise<Void>) {
        self.device = device
        self.keepAlive = keepAlive
        self.observer = observer
        self.ready = ready
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        timer = context.eventLoop.scheduleRepeatedTask(initialDelay: keepAlive.firstTick, delay: keepAlive.tick) { _ in bound.value.tick() }
        deadline = context.eventLoop.scheduleTask(in: .seconds(30)) {
            let h = bound.value
            guard !h.isReady else { return }
            h.settle(BenchFailure(description: "no ready within 30 s"))
            h.context?.close(promise: nil)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
        deadline?.cancel()
        self.context = nil
    }

    func write(_ text: String) {
        guard let context else { return }
        let frame = WebSocketFrame(fin: true, opcode: .text, maskKey: .random(), data: context.channel.allocator.buffer(string: text))
        context.writeAndFlush(wrapOutboundOut(frame), promise: nil)
        lastSent = .now()
    }

    func tick() {
        if cursor > acked {
            acked = cursor
            write(#"{"type":"ack","cursor":"\#(cursor)"}"#)
        } else if NIODeadline.now() - lastSent >= keepAlive.pingAfter {
            write(#"{"type":"ping"}"#)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let now = DispatchTime.now().uptimeNanoseconds
        let frame = unwrapInboundIn(data)
        switch frame.opcode {
        case .text, .continuation:
            var data = frame.unmaskedData
            partial += data.readBytes(length: data.readableBytes) ?? []
            guard frame.fin else { return }
            let bytes = partial
            partial = []
            received(bytes, at: now)
        case .ping:
            let pong = WebSocketFrame(fin: true, opcode: .pong, maskKey: .random(), data: frame.unmaskedData)
            context.writeAndFlush(wrapOutboundOut(pong), promise: nil)
        case .connectionClose:
            var data = frame.unmaskedData
            closeCode = data.readInteger(as: UInt16.self)
            let reply = WebSocketFrame(fin: true, opcode: .connectionClose, maskKey: .random(), data: context.channel.allocator.buffer(integer: closeCode ?? 1000))
            context.writeAndFlush(wrapOutboundOut(reply), promise: nil)
            context.close(promise: nil)
        default:
            break
        }
    }

    /// One server message: an event, `ready`, a send's answer, or `pong`.
    func received(_ bytes: [UInt8], at now: UInt64) {
        switch FrameScan.outerType(bytes) {
        case "event":
            if let c = FrameScan.stringNumber(after: FrameScan.cursorKey, in: bytes) { cursor = max(cursor, c) }
            observer.event(device: device, frame: bytes, at: now)
        case "ready":
            if let c = FrameScan.stringNumber(after: FrameScan.cursorKey, in: bytes) { cursor = max(cursor, c) }
            acked = cursor
            settle(nil)
        case "sent":
            if let r = FrameScan.stringNumber(after: FrameScan.requestKey, in: bytes) { observer.answer(requestID: Int(r), refusal: nil, at: now) }
        case "error":
            let code = FrameScan.string(after: FrameScan.codeKey, in: bytes) ?? "?"
            if let r = FrameScan.stringNumber(after: FrameScan.requestKey, in: bytes) { observer.answer(requestID: Int(r), refusal: code, at: now) }
        default:
            break
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        deadline?.cancel()
        settle(BenchFailure(description: "closed before ready (close code \(closeCode.map(String.init) ?? "none"))"))
        observer.closed(device: device, code: closeCode)
        context.fireChannelInactive()
    }

    /// Completes `ready` once: success at the server's `ready` (nil), else the failure.
    func settle(_ failure: BenchFailure?) {
        guard !isReady, !settled else { return }
        settled = true
        if let failure { ready.fail(failure) } else {
            isReady = true
            ready.succeed(())
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    static func jsonString(_ s: String) -> String {
        (try? String(decoding: JSONEncoder().encode(s), as: UTF8.self)) ?? "\"\""
    }
}

/// Byte scans of the server's frames: the bench reads a few fields of thousands of frames a second,
/// and a JSON decoder per frame would cost the load generator more CPU than it measures. Keys are found
/// wherever they are in the object (no order assumed); the values read are digits or escape-free codes.
enum FrameScan {
    static let typeKey = Array(#""type":""#.utf8)
    static let cursorKey = Array(#""cursor":""#.utf8)
    static let requestKey = Array(#""request_id":""#.utf8)
    static let codeKey = Array(#""code":""#.utf8)
    static let contentMarker = Array(#""content":"wb "#.utf8)
    /// The frame types of the protocol's outer object (an event's own `type` is message, recall, …).
    static let outerTypes: Set<String> = ["event", "ready", "sent", "error", "pong"]

    /// Index of the first `needle` in `bytes`, or nil.
    static func find(_ needle: [UInt8], in bytes: ArraySlice<UInt8>) -> Int? {
        guard !needle.isEmpty, bytes.count >= needle.count else { return nil }
        var i = bytes.startIndex
        let last = bytes.endIndex - needle.count
        while i <= last {
            if bytes[i] == needle[0] {
                var j = 1
                while j < needle.count, bytes[i + j] == needle[j] { j += 1 }
                if j == needle.count { return i }
            }
            i += 1
        }
        return nil
    }

    /// The outer object's `type`: the first `"type":"…"` whose value is one of `outerTypes`.
    static func outerType(_ bytes: [UInt8]) -> String? {
        var from = 0
        while let i = find(typeKey, in: bytes[from...]) {
            from = i + typeKey.count
            if let v = string(at: from, in: bytes), outerTypes.contains(v) { return v }
        }
        return nil
    }

    /// The string value up to the next quote after `key` (no escapes expected).
    static func string(after key: [UInt8], in bytes: [UInt8]) -> String? {
        guard let i = find(key, in: bytes[...]) else { return nil }
        return string(at: i + key.count, in: bytes)
    }

    static func string(at start: Int, in bytes: [UInt8]) -> String? {
        guard let end = bytes[start...].firstIndex(of: UInt8(ascii: "\"")) else { return nil }
        return String(decoding: bytes[start..<end], as: UTF8.self)
    }

    /// A decimal number in a string value after `key` (`"cursor":"15"`).
    static func stringNumber(after key: [UInt8], in bytes: [UInt8]) -> UInt64? {
        guard let i = find(key, in: bytes[...]) else { return nil }
        return number(at: i + key.count, in: bytes)?.value
    }

    static func number(at start: Int, in bytes: [UInt8]) -> (value: UInt64, end: Int)? {
        var v: UInt64 = 0
        var i = start
        while i < bytes.count, bytes[i] >= UInt8(ascii: "0"), bytes[i] <= UInt8(ascii: "9") {
            v = v &* 10 &+ UInt64(bytes[i] - UInt8(ascii: "0"))
            i += 1
        }
        return i > start ? (v, i) : nil
    }

    /// The bench's marker in a pushed message's content, `"content":"wb <k> <stamp>`.
    static func marker(in bytes: [UInt8]) -> (k: Int, stamp: UInt64)? {
        guard let i = find(contentMarker, in: bytes[...]), let (k, end) = number(at: i + contentMarker.count, in: bytes), end < bytes.count,
            bytes[end] == UInt8(ascii: " "), let (stamp, _) = number(at: end + 1, in: bytes)
        else { return nil }
        return (Int(k), stamp)
    }
}
