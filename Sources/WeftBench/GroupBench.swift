import ClusterConfig
import Dispatch
import Foundation

/// `weft bench groups`: group fan-out over `GET /api/v1/ws` (Docs/benchmarks.md).
///
/// For each group size in turn, in one cluster: sign up that many fresh users, make every one a contact
/// of the first (the creator), create the group with all of them (`POST /api/v1/groups`), connect every
/// member's one device over a WebSocket to a random node (the push bench's `DeviceSocket`: authenticated,
/// resumed from 0, live), then send group messages at a fixed rate, open loop, from a few members over
/// their own sockets (`{"type":"send"}` with `group_id`), each message's content carrying its intended
/// send time (`wb <k> <stamp>`: nanoseconds of this process's monotonic clock, as in the push bench).
/// Every member's socket reading the `group_message` event is one push (the sender's own devices get it
/// too); per message, the last member's push gives the send → push latency of the whole fan-out.
extension ClusterBench {
    public struct GroupOptions: Sendable {
        /// Group sizes (members, creator included), one phase each, in this order.
        public var sizes = [50, 500, 2000]
        /// Group messages per second (all senders together), open loop.
        public var rate = 10.0
        /// Seconds of sending per group.
        public var seconds = 20.0
        /// Members that send (spread over the group; the creator is the first).
        public var senders = 4
        /// A message acknowledged but not pushed to every member this long after the last send is lost.
        public var pushTimeout = 10.0
        /// Devices being connected at a time.
        public var connectConcurrency = 64
        public var jsonOut: String?
        public var htmlOut: String?
        public init() {}
    }

    /// One group size. Latencies in microseconds, from each message's intended send time.
    public struct GroupStep: Codable, Sendable {
        public var size: Int
        /// Devices connected (one per member) and ready when the sends began.
        public var devices: Int
        public var senders: Int
        public var target_rate: Double
        public var seconds: Double
        public var messages: Int
        /// Sends written / (last send − start).
        public var sent_rate: Double
        public var acked: Int
        public var refused: Int
        public var first_refusal: String?
        public var unanswered: Int
        /// Acknowledged messages × members: the pushes that must happen.
        public var expected_pushes: Int
        public var pushes: Int
        /// Fan-out throughput: pushes read by the members' sockets / (last push − first intended send).
        public var pushes_per_second: Double
        /// What the rate asks for: members × target rate.
        public var offered_pushes_per_second: Double
        /// Acknowledged messages that reached every member, per second over the same span.
        public var delivered_messages_per_second: Double
        /// (message, member) pairs acknowledged but not pushed within `push_timeout_s` of the last send: must be 0.
        public var lost_pushes: Int
        /// Acknowledged messages that did not reach every member in that time.
        public var incomplete_messages: Int
        /// The same message pushed twice to one member's socket: must be 0.
        public var duplicate_pushes: Int
        /// Pairs still missing one more `push_timeout_s` later (only measured when some were lost).
        public var never_pushed: Int?
        /// Send → the last member's push, per message that reached every member.
        public var last_member_latency_us: Percentiles
        /// Send → the first member's push, per message.
        public var first_member_latency_us: Percentiles
        /// Send → push, every (message, member) pair: the latency of any one member.
        public var push_latency_us: Percentiles
        /// Send → the server's `sent` answer.
        public var ack_latency_us: Percentiles
        /// Intended send time → the bench writing the send (generator lag, and waits for one of the sender's 8 slots).
        public var send_lag_us: Percentiles
        public var server_cores_busy: Double?
        public var client_cores_busy: Double
        /// Servers' CPU per push and per group message (all nodes), µs.
        public var server_cpu_us_per_push: Double?
        public var server_cpu_us_per_message: Double?
        /// Setup: signing up the members, making them the creator's contacts, creating the group (one
        /// request), connecting every device to `ready`.
        public var signup_seconds: Double
        public var contacts_seconds: Double
        public var create_group_ms: Double
        public var connect_seconds: Double
        /// Device sockets the servers closed during the phase (close code → count).
        public var closes: [String: Int]
        /// Last-member latency per 100 ms of send time (one message per window at 10 msgs/s).
        public var series: [SeriesPoint]
        /// Last-member latencies counted in the buckets `GroupResult.histogram_edges_us`.
        public var histogram_counts: [Int]
    }

    public struct GroupResult: Codable, Sendable {
        public var command: String?
        public var date: String
        public var nodes: Int
        public var shards: Int
        public var replication: Int
        public var fsync: String
        public var rate: Double
        public var seconds: Double
        public var senders: Int
        public var push_timeout_s: Double
        public var steps: [GroupStep]
        public var histogram_edges_us: [Double]
    }

    /// Runs one phase per group size, in one cluster.
    @discardableResult
    public mutating func runGroups(_ o: GroupOptions, print: @escaping @Sendable (String) -> Void) async throws -> GroupResult {
        let biggest = o.sizes.max() ?? 0
        let messages = max(1, Int(o.rate * o.seconds))
        let perSender = (messages + o.senders - 1) / max(1, o.senders)
        let m = config.messaging
        guard m.bcryptCost <= 4, m.actionsPerMinute >= biggest + 10, m.sendsPerMinute >= perSender, m.groupMembersMax >= biggest else {
            throw BenchFailure(
                description: "\(configPath): the groups bench makes \(biggest - 1) users contacts of one creator and sends \(perSender) messages from one member: "
                    + "set [messaging] group_members_max >= \(biggest), actions_per_minute >= \(biggest + 10), sends_per_minute >= \(perSender) "
                    + "and bcrypt_cost = 4 (Docs/benchmarks.md)")
        }
        // Descriptors: one per device, and ~1 000 for everything else (URLSession, segment files, peers).
        let fileLimit = try raiseOpenFileLimit(to: biggest + 1024)
        try startAll()
        defer { stopAll() }
        try await waitForLeaders()
        print(
            "weft bench groups: \(config.nodes.count) nodes, \(config.shards) shards, replication \(config.replication), fsync \(config.storage.fsync); "
                + "groups of \(o.sizes.map(String.init).joined(separator: ", ")); \(fmtRate(o.rate)) group msgs/s for \(fmtRate(o.seconds)) s from \(o.senders) senders; "
                + "open files limit \(fileLimit)")
        var result = GroupResult(
            command: CommandLine.arguments.joined(separator: " "), date: ISO8601DateFormatter().string(from: Date()), nodes: config.nodes.count,
            shards: config.shards, replication: config.replication, fsync: config.storage.fsync.description, rate: o.rate, seconds: o.seconds,
            senders: o.senders, push_timeout_s: o.pushTimeout, steps: [], histogram_edges_us: PushRecorder.histogramEdges)
        let nonce = String(UInt32.random(in: 0...UInt32.max), radix: 36)
        var chartOffsetMs = 0.0
        for (i, size) in o.sizes.enumerated() {
            let step = try await runGroupPhase(size: size, index: i, nonce: nonce, chartOffsetMs: chartOffsetMs, o, print: print)
            chartOffsetMs += (o.seconds + 1) * 1000
            result.steps.append(step)
            print(Self.describe(step))
        }
        print(Self.groupTable(result))
        if let jsonOut = o.jsonOut {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            try enc.encode(result).write(to: URL(fileURLWithPath: jsonOut))
            print("result written to \(jsonOut)")
        }
        if let htmlOut = o.htmlOut {
            try Data(BenchReport.groupsHTML(result).utf8).write(to: URL(fileURLWithPath: htmlOut))
            print("report written to \(htmlOut)")
        }
        return result
    }

    /// One group: members, contacts, the group, the devices, the sends, the drain, the figures.
    func runGroupPhase(size: Int, index: Int, nonce: String, chartOffsetMs: Double, _ o: GroupOptions, print: @escaping @Sendable (String) -> Void)
        async throws -> GroupStep
    {
        let clock = ContinuousClock()
        var t = clock.now
        let (ids, tokens) = try await signUp(size, prefix: "g\(index)s\(size)u", concurrency: 16)
        let signupSeconds = seconds(clock.now - t)
        t = clock.now
        try await makeCreatorsContacts(ids: ids, tokens: tokens, concurrency: 16)
        let contactsSeconds = seconds(clock.now - t)
        print("group of \(size): \(size) users signed up in \(f2(signupSeconds)) s, \(size - 1) of them contacts of the creator in \(f2(contactsSeconds)) s")
        let nodes = config.nodes
        t = clock.now
        let created = try await call(
            nodes[index % nodes.count].id.rawValue, "POST", "/api/v1/groups", token: tokens[0],
            body: ["name": "bench \(size)", "member_ids": Array(ids.dropFirst())], expect: [201])
        let createMs = seconds(clock.now - t) * 1000
        guard let group = (created["group_id"] as? NSNumber)?.uint64Value else { throw BenchFailure(description: "POST /api/v1/groups gave no group_id") }
        try await waitForRelays()
        print("group \(group) of \(size) members created in \(f2(createMs)) ms")

        let messages = max(1, Int(o.rate * o.seconds))
        let senderCount = max(1, min(o.senders, size))
        // Sender s is member s × size / senders (the creator first); message k goes from sender k % senders.
        let senderDevices = (0..<senderCount).map { $0 * size / senderCount }
        let senderOf = (0..<messages).map { senderDevices[$0 % senderCount] }
        let recorder = GroupRecorder(members: size, senders: senderOf)
        t = clock.now
        let sockets = try await connectDevices(tokens: tokens, observer: recorder, concurrency: o.connectConcurrency, seed: UInt64(11 + index))
        let connectSeconds = seconds(clock.now - t)
        print("group of \(size): \(sockets.count) devices connected over /api/v1/ws (random nodes), resumed and live in \(f2(connectSeconds)) s")
        defer { for s in sockets { s.close() } }
        try await Task.sleep(for: .seconds(1))

        // The push bench's ~150-byte chat texts (its plan with no sends).
        let texts = PushPlan(users: 1, rates: [], stepSeconds: 0, seed: 5)
        let templates = (0..<messages).map { k in
            MessageTemplate(k: k, to: "group_id", id: group, nonce: "\(nonce).\(index)", text: texts.text(k), frame: true)
        }
        let serverCPU0 = serverCPUSeconds()
        let clientCPU0 = Self.ownCPUSeconds()
        let origin = DispatchTime.now().uptimeNanoseconds + 20_000_000
        let period = 1e9 / o.rate
        try await Self.paceOverSockets(count: messages, origin: origin, period: period, sender: { senderOf[$0] }, inFlight: { recorder.inFlight($0) }) {
            k, stamp in
            recorder.sending(k, stamp: stamp)
            sockets[senderOf[k]].send(templates[k].bytes(stamp: stamp))
        }
        let lastSend = DispatchTime.now().uptimeNanoseconds
        while recorder.pending() > 0, DispatchTime.now().uptimeNanoseconds - lastSend < UInt64(o.pushTimeout * 1e9) {
            try await Task.sleep(for: .milliseconds(50))
        }
        let wall = Double(DispatchTime.now().uptimeNanoseconds - origin) / 1e9
        let serverCPU = serverCPUSeconds().flatMap { end in serverCPU0.map { end - $0 } }
        let clientCPU = Self.ownCPUSeconds() - clientCPU0
        var step = recorder.step(
            size: size, devices: sockets.count, targetRate: o.rate, seconds: o.seconds, origin: origin, chartOffsetMs: chartOffsetMs)
        step.server_cores_busy = serverCPU.map { $0 / wall }
        step.client_cores_busy = clientCPU / wall
        step.server_cpu_us_per_push = serverCPU.map { $0 * 1e6 / Double(max(1, step.pushes)) }
        step.server_cpu_us_per_message = serverCPU.map { $0 * 1e6 / Double(max(1, step.acked)) }
        step.signup_seconds = signupSeconds
        step.contacts_seconds = contactsSeconds
        step.create_group_ms = createMs
        step.connect_seconds = connectSeconds
        if step.lost_pushes > 0 || step.unanswered > 0 {
            print("group of \(size): \(step.lost_pushes) pushes missing; waiting \(Int(o.pushTimeout)) s more for late ones")
            try await Task.sleep(for: .seconds(o.pushTimeout))
            step.never_pushed = recorder.missingPushes()
        }
        step.closes = recorder.closeCounts
        try await Task.sleep(for: .milliseconds(500))
        return step
    }

    /// Makes users 1… contacts of user 0 (0 asks, each accepts), `concurrency` pairs at a time, then waits
    /// until the relays have copied every inbox entry.
    func makeCreatorsContacts(ids: [UInt64], tokens: [String], concurrency: Int) async throws {
        let client = apiClient
        let nodes = config.nodes.map(\.id.rawValue)
        let count = ids.count
        let lanes = max(1, min(concurrency, count - 1))
        try await withThrowingTaskGroup(of: Void.self) { group in
            for lane in 0..<lanes {
                group.addTask {
                    for u in stride(from: 1 + lane, to: count, by: lanes) {
                        let via = nodes[u % nodes.count]
                        _ = try await client.call(
                            via, "POST", "/api/v1/contacts/requests", token: tokens[0], body: ["user_id": ids[u]], expect: [200, 202, 409])
                        _ = try await client.call(via, "POST", "/api/v1/contacts/requests/\(ids[0])/accept", token: tokens[u], body: nil, expect: [200, 404])
                    }
                }
            }
            try await group.waitForAll()
        }
        try await waitForRelays()
    }

    /// One device per token, each on a random node, `concurrency` being opened at a time; in token order.
    func connectDevices(tokens: [String], observer: any DeviceObserver, concurrency: Int, seed: UInt64) async throws -> [DeviceSocket] {
        var rng = BenchRNG(seed: seed)
        let nodes = config.nodes
        let homes = tokens.indices.map { _ in nodes[Int(rng.next() % UInt64(nodes.count))].apiAddress }
        let lanes = max(1, min(concurrency, tokens.count))
        return try await withThrowingTaskGroup(of: [DeviceSocket].self) { group in
            for lane in 0..<lanes {
                group.addTask {
                    var mine: [DeviceSocket] = []
                    for u in stride(from: lane, to: tokens.count, by: lanes) {
                        let s = try await DeviceSocket.open(
                            device: u, host: homes[u].host, port: homes[u].port, from: nil, token: tokens[u], keepAlive: .live, observer: observer)
                        do {
                            try await s.ready.get()
                        } catch {
                            for other in mine + [s] { other.close() }
                            throw error
                        }
                        mine.append(s)
                    }
                    return mine
                }
            }
            var all: [DeviceSocket] = []
            do {
                for try await part in group { all += part }
            } catch {
                for s in all { s.close() }
                throw error
            }
            return all.sorted { $0.device < $1.device }
        }
    }

    static func describe(_ s: GroupStep) -> String {
        let l = s.last_member_latency_us
        return "group of \(s.size): \(s.acked) of \(s.messages) messages acknowledged (\(s.refused) refused, \(s.unanswered) unanswered), sent \(f2(s.sent_rate))/s; "
            + "fan-out \(Int(s.pushes_per_second)) pushes/s (offered \(Int(s.offered_pushes_per_second))), \(s.pushes) of \(s.expected_pushes) pushes; "
            + "last member: \(l.text); any member p50 \(l.ms(s.push_latency_us.p50)) p99 \(l.ms(s.push_latency_us.p99)) ms; "
            + "first member p50 \(l.ms(s.first_member_latency_us.p50)) p99 \(l.ms(s.first_member_latency_us.p99)) ms; ack p99 \(l.ms(s.ack_latency_us.p99)) ms; "
            + "lost \(s.lost_pushes) (\(s.incomplete_messages) messages incomplete), duplicates \(s.duplicate_pushes); "
            + "cores busy: servers \(s.server_cores_busy.map { f2($0) } ?? "?"), client \(f2(s.client_cores_busy)); "
            + "server CPU \(s.server_cpu_us_per_push.map { "\(Int($0)) µs" } ?? "?") per push"
            + (s.first_refusal.map { "; first refusal: \($0)" } ?? "")
    }

    /// The figures as a plain-text table (ms).
    static func groupTable(_ r: GroupResult) -> String {
        let head = [
            "members", "msgs acked", "pushes/s (offered)", "last p50", "last p99", "last p99.9", "last max", "any p50", "any p99", "first p50", "first p99",
            "ack p99", "lost", "dup", "server cores", "µs CPU/push",
        ]
        func ms(_ us: UInt64) -> String { f2(Double(us) / 1000) }
        var rows = [head]
        for s in r.steps {
            rows.append([
                "\(s.size)", "\(s.acked)/\(s.messages)", "\(Int(s.pushes_per_second)) (\(Int(s.offered_pushes_per_second)))",
                ms(s.last_member_latency_us.p50), ms(s.last_member_latency_us.p99), ms(s.last_member_latency_us.p999), ms(s.last_member_latency_us.max),
                ms(s.push_latency_us.p50), ms(s.push_latency_us.p99), ms(s.first_member_latency_us.p50), ms(s.first_member_latency_us.p99),
                ms(s.ack_latency_us.p99), "\(s.lost_pushes)", "\(s.duplicate_pushes)", s.server_cores_busy.map { f2($0) } ?? "?",
                s.server_cpu_us_per_push.map { String(Int($0)) } ?? "?",
            ])
        }
        let widths = head.indices.map { c in rows.map { $0[c].count }.max() ?? 0 }
        let lines = rows.map { row in
            row.enumerated().map { c, v in String(repeating: " ", count: widths[c] - v.count) + v }.joined(separator: " | ")
        }
        return (["latencies in ms; last = send → the last member's push, any = every push, first = the first member's push"] + lines)
            .joined(separator: "\n")
    }

    func fmtRate(_ v: Double) -> String { v == v.rounded() ? String(Int(v)) : f2(v) }
}

/// Send, answer and push times of every message of one group phase (nanoseconds of `DispatchTime`),
/// written from the pacer and the sockets' event loops.
final class GroupRecorder: DeviceObserver, @unchecked Sendable {
    /// Guards everything below.
    let lock = NSLock()
    let members: Int
    let senders: [Int]
    var stamp: [UInt64]
    var written: [UInt64]
    var answered: [UInt64]
    var refusal: [String?]
    /// Push read time of message k by member d at `k × members + d` (0: not yet).
    var pushAt: [UInt64]
    /// The stamp found in message k's pushed content, and its pushes so far.
    var pushedStamp: [UInt64]
    var pushCount: [Int]
    var duplicates = 0
    var inFlightBySender: [Int: Int] = [:]
    var closeCodes: [String: Int] = [:]

    init(members: Int, senders: [Int]) {
        self.members = members
        self.senders = senders
        let n = senders.count
        stamp = .init(repeating: 0, count: n)
        written = .init(repeating: 0, count: n)
        answered = .init(repeating: 0, count: n)
        refusal = .init(repeating: nil, count: n)
        pushAt = .init(repeating: 0, count: n * members)
        pushedStamp = .init(repeating: 0, count: n)
        pushCount = .init(repeating: 0, count: n)
    }

    func sending(_ k: Int, stamp s: UInt64) {
        let now = DispatchTime.now().uptimeNanoseconds
        lock.withLock {
            stamp[k] = s
            written[k] = now
            inFlightBySender[senders[k], default: 0] += 1
        }
    }

    func inFlight(_ sender: Int) -> Int { lock.withLock { inFlightBySender[sender] ?? 0 } }

    // DeviceObserver

    func event(device: Int, frame: [UInt8], at t: UInt64) {
        guard let (k, s) = FrameScan.marker(in: frame) else { return }  // contact and group events of the catch-up
        lock.withLock {
            guard k >= 0, k < pushCount.count, device >= 0, device < members else { return }
            let i = k * members + device
            if pushAt[i] == 0 {
                pushAt[i] = t
                pushedStamp[k] = s
                pushCount[k] += 1
            } else {
                duplicates += 1
            }
        }
    }

    func answer(requestID k: Int, refusal why: String?, at t: UInt64) {
        lock.withLock {
            guard k >= 0, k < answered.count, answered[k] == 0 else { return }
            answered[k] = t
            refusal[k] = why
            if written[k] != 0 { inFlightBySender[senders[k], default: 1] -= 1 }
        }
    }

    func closed(device: Int, code: UInt16?) {
        lock.withLock { closeCodes[code.map(String.init) ?? "none", default: 0] += 1 }
    }

    var closeCounts: [String: Int] { lock.withLock { closeCodes } }

    /// Messages still waiting: sent and not answered, or acknowledged and not pushed to every member.
    func pending() -> Int {
        lock.withLock {
            answered.indices.reduce(0) { n, k in
                n + ((written[k] != 0 && answered[k] == 0) || (answered[k] != 0 && refusal[k] == nil && pushCount[k] < members) ? 1 : 0)
            }
        }
    }

    /// (message, member) pairs of acknowledged messages not pushed so far.
    func missingPushes() -> Int {
        lock.withLock { answered.indices.reduce(0) { n, k in n + (answered[k] != 0 && refusal[k] == nil ? members - pushCount[k] : 0) } }
    }

    func step(size: Int, devices: Int, targetRate: Double, seconds: Double, origin: UInt64, chartOffsetMs: Double) -> ClusterBench.GroupStep {
        lock.withLock {
            var last: [Duration] = []
            var first: [Duration] = []
            var every: [Duration] = []
            var ack: [Duration] = []
            var lag: [Duration] = []
            var acked = 0
            var refused = 0
            var firstRefusal: String?
            var unanswered = 0
            var lost = 0
            var incomplete = 0
            var pushes = 0
            var complete = 0
            var lastWrite = origin
            var lastPush = origin
            var hist = [Int](repeating: 0, count: PushRecorder.histogramEdges.count)
            var windows: [Int: (lat: [Double], sent: Int, lost: Int)] = [:]
            for k in stamp.indices where written[k] != 0 {
                let w = Int((stamp[k] - min(stamp[k], origin)) / 100_000_000)
                windows[w, default: ([], 0, 0)].sent += 1
                lag.append(.nanoseconds(Int64(written[k] - min(written[k], stamp[k]))))
                lastWrite = max(lastWrite, written[k])
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
                ack.append(.nanoseconds(Int64(answered[k] - min(answered[k], stamp[k]))))
                let s = pushedStamp[k] != 0 ? pushedStamp[k] : stamp[k]
                var lo = UInt64.max
                var hi: UInt64 = 0
                for d in 0..<members {
                    let at = pushAt[k * members + d]
                    guard at != 0 else { continue }
                    lo = min(lo, at)
                    hi = max(hi, at)
                    every.append(.nanoseconds(Int64(at - min(at, s))))
                }
                pushes += pushCount[k]
                if hi > 0 {
                    first.append(.nanoseconds(Int64(lo - min(lo, s))))
                    lastPush = max(lastPush, hi)
                }
                guard pushCount[k] == members else {
                    lost += members - pushCount[k]
                    incomplete += 1
                    windows[w, default: ([], 0, 0)].lost += 1
                    continue
                }
                complete += 1
                let ns = hi - min(hi, s)
                last.append(.nanoseconds(Int64(ns)))
                let us = Double(ns) / 1000
                windows[w, default: ([], 0, 0)].lat.append(us)
                hist[PushRecorder.histogramEdges.firstIndex { us <= $0 } ?? (hist.count - 1)] += 1
            }
            let series = windows.keys.sorted().map { w -> ClusterBench.SeriesPoint in
                let v = windows[w] ?? ([], 0, 0)
                let sorted = v.lat.sorted()
                func q(_ p: Double) -> Double { sorted.isEmpty ? 0 : sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))] }
                return .init(t_ms: chartOffsetMs + Double(w) * 100, sent: v.sent, pushed: v.lat.count, lost: v.lost, p50_us: q(0.5), p99_us: q(0.99), max_us: sorted.last ?? 0)
            }
            let span = max(1e-9, Double(lastPush - origin) / 1e9)
            return ClusterBench.GroupStep(
                size: size, devices: devices, senders: Set(senders).count, target_rate: targetRate, seconds: seconds, messages: stamp.count,
                sent_rate: Double(lag.count) / max(1e-9, Double(lastWrite - origin) / 1e9), acked: acked, refused: refused, first_refusal: firstRefusal,
                unanswered: unanswered, expected_pushes: acked * members, pushes: pushes, pushes_per_second: Double(pushes) / span,
                offered_pushes_per_second: Double(members) * targetRate, delivered_messages_per_second: Double(complete) / span, lost_pushes: lost,
                incomplete_messages: incomplete, duplicate_pushes: duplicates, never_pushed: nil, last_member_latency_us: .init(last),
                first_member_latency_us: .init(first), push_latency_us: .init(every), ack_latency_us: .init(ack), send_lag_us: .init(lag),
                server_cores_busy: nil, client_cores_busy: 0, server_cpu_us_per_push: nil, server_cpu_us_per_message: nil, signup_seconds: 0,
                contacts_seconds: 0, create_group_ms: 0, connect_seconds: 0, closes: [:], series: series, histogram_counts: hist)
        }
    }
}

// MARK: The report

extension BenchReport {
    /// The groups bench's page: the target, the figures per size, last-member latency over time, histogram.
    public static func groupsHTML(_ r: ClusterBench.GroupResult) -> String {
        var body = "<h1>Weft: group fan-out benchmark</h1>\n"
        body += "<p class=\"meta\">\(esc(r.date)) · \(r.nodes) nodes, \(r.shards) shards, replication \(r.replication), fsync \(esc(r.fsync)) · "
        body += "\(fmt(r.rate)) group messages/s for \(fmt(r.seconds)) s per group from \(r.senders) senders over their WebSockets · every member "
        body += "one device on a random node · cluster and load generator on one machine</p>\n"
        if let command = r.command { body += "<pre class=\"cmd\">\(esc(command))</pre>\n" }
        if let s = r.steps.first(where: { $0.size == 500 }) {
            let l = s.last_member_latency_us
            let met = l.p99 <= 100_000 && s.lost_pushes == 0 && s.acked == s.messages && s.target_rate >= 10
            body += "<h2>Target</h2>\n<table><tr><th class=\"l\">target</th><th class=\"l\">measured</th><th class=\"l\">met?</th></tr>\n"
            body += row([
                "500-member group at 10 group msgs/s: last member pushed p99 ≤ 100 ms",
                "p99 \(ms(l.p99)) ms (p50 \(ms(l.p50)), max \(ms(l.max))) at \(fmt(s.target_rate)) msgs/s; \(s.acked) of \(s.messages) acknowledged, \(s.lost_pushes) pushes lost",
                verdict(met),
            ])
            body += "</table>\n"
        }
        body += "<h2>Fan-out per group size</h2>\n"
        body += "<p>Latencies (ms) are from each message's intended send time (open loop) to a member's socket reading the "
        body += "<code>group_message</code> event: <em>last</em> is the last member of the group to get each message (the fan-out's end), "
        body += "<em>any</em> every single push, <em>first</em> the first member. Pushes/s is every push read over the span from the first "
        body += "intended send to the last push; offered is members × rate. Lost: (message, member) pairs acknowledged but not pushed within "
        body += "\(fmt(r.push_timeout_s)) s of the last send.</p>\n"
        var t = "<table><tr><th>members</th><th>acked</th><th>pushes/s</th><th>offered</th><th>last p50</th><th>last p99</th><th>last p99.9</th>"
        t += "<th>last max</th><th>any p50</th><th>any p99</th><th>first p50</th><th>first p99</th><th>ack p99</th><th>send lag p99</th><th>lost</th>"
        t += "<th>dup</th><th>server cores</th><th>client cores</th><th>server µs/push</th><th>server ms/message</th></tr>\n"
        for (i, s) in r.steps.enumerated() {
            let swatch = "<span style=\"color:\(palette[i % palette.count])\">■</span> "
            t += "<tr><td>\(swatch)\(s.size)</td><td>\(s.acked)/\(s.messages)</td><td>\(Int(s.pushes_per_second))</td><td>\(Int(s.offered_pushes_per_second))</td>"
            t += "<td>\(ms(s.last_member_latency_us.p50))</td><td>\(ms(s.last_member_latency_us.p99))</td><td>\(ms(s.last_member_latency_us.p999))</td>"
            t += "<td>\(ms(s.last_member_latency_us.max))</td><td>\(ms(s.push_latency_us.p50))</td><td>\(ms(s.push_latency_us.p99))</td>"
            t += "<td>\(ms(s.first_member_latency_us.p50))</td><td>\(ms(s.first_member_latency_us.p99))</td><td>\(ms(s.ack_latency_us.p99))</td>"
            t += "<td>\(ms(s.send_lag_us.p99))</td><td>\(s.lost_pushes)\(s.never_pushed.map { " (never: \($0))" } ?? "")</td><td>\(s.duplicate_pushes)</td>"
            t += "<td>\(s.server_cores_busy.map { fmt($0) } ?? "?")</td><td>\(fmt(s.client_cores_busy))</td>"
            t += "<td>\(s.server_cpu_us_per_push.map { fmt($0) } ?? "?")</td><td>\(s.server_cpu_us_per_message.map { fmt($0 / 1000) } ?? "?")</td></tr>\n"
        }
        body += t + "</table>\n"
        body += "<h2>Setup</h2>\n<table><tr><th>members</th><th>sign-up (s)</th><th>contacts of the creator (s)</th><th>create group (ms)</th>"
        body += "<th>devices connected</th><th>connect to ready (s)</th><th>closed by the servers</th></tr>\n"
        for s in r.steps {
            body += "<tr><td>\(s.size)</td><td>\(fmt(s.signup_seconds))</td><td>\(fmt(s.contacts_seconds))</td><td>\(fmt(s.create_group_ms))</td>"
            body += "<td>\(s.devices)</td><td>\(fmt(s.connect_seconds))</td><td>\(s.closes.isEmpty ? "0" : esc("\(s.closes)"))</td></tr>\n"
        }
        body += "</table>\n"
        body += "<h2>Last-member latency over time</h2>\n<p>Per 100 ms of send time (one message per window at 10 msgs/s): the time "
        body += "until the last member had the message (log scale). Shaded bands are the group sizes, back to back (setup between them not shown); "
        body += "red marks are messages some member never got.</p>\n"
        body += timeChart(
            r.steps.map { ("\($0.size) members", $0.series) }, targetUS: 100_000, targetLabel: "target p99 100 ms (500 members)",
            lostLabel: "✕ message not pushed to every member")
        body += "<h2>Last-member latency histogram</h2>\n<p>Share of each group's messages per bucket of last-member latency "
        body += "(10 buckets per decade, log scale).</p>\n"
        body += histogramChart(
            edges: r.histogram_edges_us, bands: r.steps.map { ("\($0.size) members", $0.histogram_counts) }, xLabel: "last-member push latency (ms, log scale)")
        return page(title: "Weft group fan-out benchmark \(r.date)", body: body)
    }

    /// Rewrites the report of a `--json-out` result.
    public static func groupsHTML(fromJSON path: String) throws -> String {
        groupsHTML(try JSONDecoder().decode(ClusterBench.GroupResult.self, from: Data(contentsOf: URL(fileURLWithPath: path))))
    }
}
