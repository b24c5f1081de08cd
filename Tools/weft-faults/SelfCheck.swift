import Foundation

/// `weft-faults --self-check`: the checker against histories whose anomalies are known, so a checker
/// that cannot see a lost, duplicated, misplaced or divergent write (single or in a burst batch), a
/// hostile request's record in a log, a changed group, a chat message lost, doubled, reordered or
/// never sent in a history or a sync, an acknowledged chat message missing from the sender's next
/// history page, a group message lost, doubled, reordered, shown outside its reader's membership or
/// never sent, a wrong membership timeline, or a WebSocket device with a gap, a reordered or changed event, a missing acknowledged
/// message or a phantom, or writes that stopped during a one-node fault, fails the test suite (Tests/ToolTests).
/// Needs no root and starts nothing.
enum SelfCheck {
    static func entry(_ i: UInt64, _ p: String, seq: UInt64) -> Checker.Entry {
        Checker.Entry(index: i, term: 1, type: 1, stream: 1, seq: seq, payload: p)
    }

    /// Runs every case; returns one line per case and whether all came out as expected.
    static func run() -> (lines: [String], ok: Bool) {
        let good = [entry(1, "a", seq: 1), entry(2, "b", seq: 2), entry(3, "c", seq: 3)]
        let acked: [String: History.Ack] = [
            "a": .init(shard: 0, index: 1, seq: 1), "b": .init(shard: 0, index: 2, seq: 2), "c": .init(shard: 0, index: 3, seq: 3),
        ]
        func logs(_ n2: [Checker.Entry]) -> [Int: [Int: [Checker.Entry]]] { [1: [0: good], 2: [0: n2], 3: [0: good]] }
        let cases: [(String, Checker.Result, (Checker.Result) -> Bool)] = [
            ("clean", Checker.check(logs: logs(good), acked: acked, failed: [], indeterminate: [], shards: 1), { $0.ok }),
            (
                // 4 nodes, shard 0 on nodes 1-3 (`--replication 3`): node 4 holds none of it and is not
                // missing anything, but a write missing on node 2 still is.
                "placement: a node without the shard",
                Checker.check(logs: [1: [0: good], 2: [0: good], 3: [0: good], 4: [:]], acked: acked, failed: [], indeterminate: [], shards: 1, placement: [0: [1, 2, 3]]),
                { $0.ok }
            ),
            (
                "placement: lost on a replica",
                Checker.check(
                    logs: [1: [0: good], 2: [0: Array(good.prefix(2))], 3: [0: good], 4: [:]], acked: acked, failed: [], indeterminate: [], shards: 1,
                    placement: [0: [1, 2, 3]]),
                { $0.lost.count == 1 && !$0.divergent.isEmpty }
            ),
            (
                "lost on one replica",
                Checker.check(logs: logs(Array(good.prefix(2))), acked: acked, failed: [], indeterminate: [], shards: 1),
                { $0.lost.count == 1 && !$0.divergent.isEmpty }
            ),
            (
                "duplicated",
                Checker.check(logs: logs(good + [entry(4, "c", seq: 4)]), acked: acked, failed: [], indeterminate: [], shards: 1),
                { !$0.duplicated.isEmpty }
            ),
            (
                "divergent payload",
                Checker.check(logs: logs([good[0], entry(2, "x", seq: 2), good[2]]), acked: acked, failed: [], indeterminate: ["x"], shards: 1),
                { !$0.divergent.isEmpty && $0.lost.count == 1 }
            ),
            (
                "misplaced",
                Checker.check(logs: logs([good[1], good[0], good[2]].enumerated().map { entry(UInt64($0 + 1), $1.payload, seq: UInt64($0 + 1)) }), acked: acked, failed: [], indeterminate: [], shards: 1),
                { !$0.misplaced.isEmpty }
            ),
            (
                "refused but written",
                Checker.check(logs: [1: [0: good], 2: [0: good], 3: [0: good]], acked: acked.filter { $0.key != "c" }, failed: ["c"], indeterminate: [], shards: 1),
                { !$0.unexpected.isEmpty }
            ),
            (
                "indeterminate that landed is fine",
                Checker.check(logs: logs(good), acked: acked.filter { $0.key != "c" }, failed: [], indeterminate: ["c"], shards: 1),
                { $0.ok }
            ),
            (
                "read back but missing",
                Checker.check(logs: logs(good), acked: acked, failed: [], indeterminate: [], shards: 1, readBack: ["0/1/4": "d"]),
                { $0.lost.count == 3 }
            ),
            (
                "read back differently",
                Checker.check(logs: logs(good), acked: acked, failed: [], indeterminate: [], shards: 1, readBack: ["0/1/2": "z"]),
                { $0.divergent.count == 3 }
            ),
            (
                "stream seq gap",
                Checker.check(logs: [1: [0: [good[0], entry(2, "b", seq: 3)]], 2: [0: [good[0], entry(2, "b", seq: 3)]], 3: [0: [good[0], entry(2, "b", seq: 3)]]], acked: [:], failed: [], indeterminate: ["a", "b"], shards: 1),
                { !$0.divergent.isEmpty }
            ),
        ] + burstCases() + hostileCases(good: good, acked: acked) + groupCases(good: good, acked: acked) + relayCases(good: good, acked: acked) + messagingLogCases(good: good, acked: acked) + chatCases() + groupChatCases()
        var lines: [String] = []
        var ok = true
        for (name, result, expected) in cases {
            let pass = expected(result)
            ok = ok && pass
            lines.append("\(pass ? "ok" : "WRONG") \(name): lost \(result.lost.count), duplicated \(result.duplicated.count), divergent \(result.divergent.count), misplaced \(result.misplaced.count), unexpected \(result.unexpected.count), hostile \(result.hostile.count), membership \(result.membership.count), stale \(result.stale.count)")
        }
        for (name, pass) in Availability.selfCheck() + partitionPushCases() {
            ok = ok && pass
            lines.append("\(pass ? "ok" : "WRONG") \(name)")
        }
        return (lines, ok)
    }

    typealias Case = (String, Checker.Result, (Checker.Result) -> Bool)

    /// `ChatChecker.partitionPushes`: a cut between nodes 1 and 2 from 10 s to 20 s; user 2 gets message
    /// 7 (acknowledged at 12 s) on a device on node 1 (cut) at 13.5 s, and on one on node 3 only after
    /// the heal; a connection that closed inside the cut, and a message acknowledged in its last second,
    /// are not counted.
    static func partitionPushCases() -> [(String, Bool)] {
        typealias C = ChatChecker
        let fault = Availability.Fault(kind: "partition-two-way", victim: 1, start: 10, end: 20, peer: 2)
        var send = C.Send(key: "k", writer: 0, from: 1, to: 2, content: "m")
        send.messageID = 7
        send.ackedAt = 12
        var late = C.Send(key: "l", writer: 0, from: 1, to: 2, content: "n")
        late.messageID = 8
        late.ackedAt = 19.5
        func conn(_ node: Int, opened: Double, seconds: Double, at: Double) -> C.Connection {
            var c = C.Connection(node: node, resume: 0)
            c.opened = opened
            c.closed = opened + seconds
            c.events = [C.Event(cursor: "1", type: "message", messageID: 7)]
            c.arrivals = [at]
            return c
        }
        let devices = [
            C.Device(user: 2, index: 0, connections: [conn(1, opened: 5, seconds: 30, at: 13.5)]),
            C.Device(user: 2, index: 1, connections: [conn(3, opened: 5, seconds: 30, at: 21), conn(2, opened: 1, seconds: 12, at: 12.1)]),
        ]
        let r = C.partitionPushes(devices, sends: ["k": send, "l": late], faults: [fault])
        let none = C.partitionPushes(devices, sends: ["k": send], faults: [Availability.Fault(kind: "pause", victim: 1, start: 10, end: 20)])
        return [
            (
                "partition pushes: one before the heal on a cut node, one after it elsewhere",
                r.messages == 1 && r.deliveries == 2 && r.beforeHeal == 1 && abs(r.slowest - 1.5) < 1e-9 && r.onCutNodes == 1 && r.onCutNodesBeforeHeal == 1
            ),
            ("partition pushes: other faults are not counted", none == C.PartitionPushes()),
        ]
    }

    static func burstEntry(_ index: UInt64, batch: String, i: Int, seq: UInt64, stream: UInt64 = 100) -> Checker.Entry {
        Checker.Entry(index: index, term: 1, type: 1, stream: stream, seq: seq, payload: String(decoding: BurstPayload.make(batch: batch, i: i), as: UTF8.self))
    }

    /// A log of one single write ("a", index 1) then burst batch 1.0.1 (4 records, indexes 2-5, stream 100 seqs 1-4).
    static func burstCases() -> [Case] {
        let single = entry(1, "a", seq: 1)
        let batch = (0..<4).map { burstEntry(UInt64(2 + $0), batch: "1.0.1", i: $0, seq: UInt64(1 + $0)) }
        let good = [single] + batch
        let acked: [String: History.Ack] = ["a": .init(shard: 0, index: 1, seq: 1)]
        var bursts = Checker.Bursts()
        bursts.acked["1.0.1"] = Checker.BurstAck(shard: 0, stream: 100, firstIndex: 2, firstSeq: 1, count: 4)
        func run(_ n1: [Checker.Entry], _ n2: [Checker.Entry], _ n3: [Checker.Entry], _ b: Checker.Bursts) -> Checker.Result {
            Checker.check(logs: [1: [0: n1], 2: [0: n2], 3: [0: n3]], acked: acked, failed: [], indeterminate: [], shards: 1, bursts: b)
        }
        func all(_ l: [Checker.Entry], _ b: Checker.Bursts = bursts) -> Checker.Result { run(l, l, l, b) }
        var shifted = bursts
        shifted.acked["1.0.1"]?.firstIndex = 3
        var refused = Checker.Bursts()
        refused.failed["1.0.1"] = 4
        var unknown = Checker.Bursts()
        unknown.indeterminate["1.0.1"] = 4
        var irregular = bursts
        irregular.irregular = ["batch 1.0.1: refs not one range"]
        let dup = good + [burstEntry(6, batch: "1.0.1", i: 2, seq: 5)]
        var corrupt = batch
        corrupt[1].payload = String(corrupt[1].payload.dropLast()) + (corrupt[1].payload.hasSuffix("A") ? "B" : "A")
        return [
            ("burst: clean", all(good), { $0.ok }),
            ("burst: a record lost on one replica", run(good, [single] + batch.filter { $0.index != 4 }, good, bursts), { $0.lost.count == 1 }),
            ("burst: a whole acknowledged batch lost everywhere", all([single]), { $0.lost.count == 3 }),
            ("burst: a record twice", all(dup), { $0.duplicated.count == 3 }),
            ("burst: at other indexes than acknowledged", all(good, shifted), { $0.misplaced.count == 3 }),
            ("burst: refused batch in the log", all(good, refused), { $0.unexpected.count == 3 }),
            ("burst: indeterminate batch that landed is fine", all(good, unknown), { $0.ok }),
            ("burst: indeterminate batch partly landed is fine", all(Array(good.prefix(3)), unknown), { $0.ok }),
            ("burst: batch never sent", all(good, Checker.Bursts()), { $0.unexpected.count == 3 }),
            ("burst: a record's bytes changed", all([single] + corrupt), { !$0.unexpected.isEmpty && !$0.lost.isEmpty }),
            ("burst: acknowledgement not one range", all(good, irregular), { !$0.misplaced.isEmpty }),
        ]
    }

    static func hostileCases(good: [Checker.Entry], acked: [String: History.Ack]) -> [Case] {
        let marked = good + [entry(4, "\(Checker.hostileMarker)7-no-token", seq: 4)]
        let reserved = good + [Checker.Entry(index: 4, term: 1, type: 100, stream: 7, seq: 1, payload: "x")]
        let config = good + [Checker.Entry(index: 4, term: 1, type: 3, stream: 0, seq: 0, payload: "\(Checker.hostileMarker)9-reserved-type-3")]
        func all(_ l: [Checker.Entry], accepted: [String] = []) -> Checker.Result {
            Checker.check(logs: [1: [0: l], 2: [0: l], 3: [0: l]], acked: acked, failed: [], indeterminate: [], shards: 1, hostileAccepted: accepted)
        }
        // An empty relay batch header from shard 1 (`u64 1 | u64 first | u64 last | u32 0`), and a malformed one.
        var header: [UInt8] = []
        for v in [UInt64(1), 5, 9] { withUnsafeBytes(of: v.littleEndian) { header.append(contentsOf: $0) } }
        header += [0, 0, 0, 0]
        let relay = good + [Checker.Entry(index: 4, term: 1, type: 5, stream: 0, seq: 0, payload: String(decoding: header, as: UTF8.self))]
        let badRelay = good + [Checker.Entry(index: 4, term: 1, type: 5, stream: 0, seq: 0, payload: "not a header")]
        func two(_ l: [Checker.Entry]) -> Checker.Result {
            Checker.check(logs: [1: [0: l, 1: []], 2: [0: l, 1: []], 3: [0: l, 1: []]], acked: acked, failed: [], indeterminate: [], shards: 2)
        }
        return [
            ("relay: an empty relay batch from another shard", two(relay), { $0.ok }),
            ("relay: a malformed relay batch header", two(badRelay), { $0.unexpected.count == 3 }),
            ("hostile: marker of a data record in the logs", all(marked), { $0.hostile.count == 3 && !$0.ok }),
            ("hostile: marker on one replica only", Checker.check(logs: [1: [0: good], 2: [0: marked], 3: [0: good]], acked: acked, failed: [], indeterminate: [], shards: 1), { $0.hostile.count == 1 }),
            ("hostile: a record of a reserved type", all(reserved), { $0.hostile.count == 3 }),
            ("hostile: a membership record with a marker", all(config), { $0.hostile.count == 3 }),
            ("hostile: a request answered 2xx", all(good, accepted: ["reserved-type-3 HOSTILE-1: 200"]), { $0.hostile.count == 1 && !$0.ok }),
            ("hostile: none", all(good), { $0.ok }),
        ]
    }

    /// The relay workload: a fan-out record in shard 0 and the record the relay derived in shard 1.
    static func relayCases(good: [Checker.Entry], acked: [String: History.Ack]) -> [Case] {
        func bytes(_ values: [UInt64], _ tail: String) -> String {
            var b: [UInt8] = []
            for v in values { withUnsafeBytes(of: v.littleEndian) { b.append(contentsOf: $0) } }
            return String(decoding: b + Array(tail.utf8), as: UTF8.self)
        }
        let fanout = Checker.Entry(index: 4, term: 1, type: 6, stream: 1, seq: 4, payload: "\u{1}\u{0}" + bytes([1, 101], "r3-1"))
        func derived(_ seq: UInt64, source index: UInt64 = 4) -> Checker.Entry {
            Checker.Entry(index: 1 + seq, term: 1, type: 1, stream: 101, seq: seq, payload: bytes([0, index], "r3-1"))
        }
        // The relay batch header in shard 1 before the derived record: source 0, range 4...4, one record.
        let header = Checker.Entry(index: 1, term: 1, type: 5, stream: 0, seq: 0, payload: bytes([0, 4, 4], "") + "\u{1}\u{0}\u{0}\u{0}" + bytes([4], ""))
        var withFanout = acked
        withFanout["r3-1"] = .init(shard: 0, index: 4, seq: 4)
        func run(_ destination: [Checker.Entry]) -> Checker.Result {
            let l = [0: good + [fanout], 1: [header] + destination]
            return Checker.check(logs: [1: l, 2: l, 3: l], acked: withFanout, failed: [], indeterminate: [], shards: 2)
        }
        // Fewer replicas than nodes: shard 0 on nodes 1 and 2, shard 1 on nodes 3 and 4, no node holding
        // both: the destination's replicas are checked against the source's fan-out records.
        func apart(_ destination: [Checker.Entry]) -> Checker.Result {
            let src = [0: good + [fanout]]
            let dst = [1: [header] + destination]
            return Checker.check(
                logs: [1: src, 2: src, 3: dst, 4: dst], acked: withFanout, failed: [], indeterminate: [], shards: 2,
                placement: [0: [1, 2], 1: [3, 4]])
        }
        return [
            ("relay: every fan-out record derived once", run([derived(1)]), { $0.ok }),
            ("relay, shards on different nodes: derived once", apart([derived(1)]), { $0.ok }),
            ("relay, shards on different nodes: a derived record missing", apart([]), { $0.lost.count == 2 }),
            ("relay, shards on different nodes: derived from another source index", apart([derived(1, source: 3)]), { $0.lost.count == 2 && $0.unexpected.count == 2 }),
            ("relay: a derived record missing", run([]), { $0.lost.count == 3 }),
            ("relay: derived twice", run([derived(1), derived(2)]), { $0.duplicated.count == 3 }),
            ("relay: derived from another source index", run([derived(1, source: 3)]), { $0.lost.count == 3 && $0.unexpected.count == 3 }),
        ]
    }

    static func groupCases(good: [Checker.Entry], acked: [String: History.Ack]) -> [Case] {
        let same = Checker.GroupView(voters: [1, 2, 3], learners: [])
        func run(_ g: [Int: [Int: Checker.GroupView]]) -> Checker.Result {
            Checker.check(
                logs: [1: [0: good], 2: [0: good], 3: [0: good]], acked: acked, failed: [], indeterminate: [], shards: 1, groups: g, initialGroup: [1, 2, 3])
        }
        return [
            ("groups: unchanged", run([1: [0: same], 2: [0: same], 3: [0: same]]), { $0.ok }),
            ("groups: a voter removed", run([1: [0: same], 2: [0: same], 3: [0: .init(voters: [1, 2], learners: [])]]), { $0.membership.count == 1 }),
            ("groups: a learner added", run([1: [0: .init(voters: [1, 2, 3], learners: [4])], 2: [0: same], 3: [0: same]]), { $0.membership.count == 1 }),
            ("groups: a node reports none", run([1: [0: same], 2: [:], 3: [0: same]]), { $0.membership.count == 1 }),
        ]
    }

    /// What the messaging API writes into the logs (messaging records, chat request keys, relay batches
    /// a shard writes to itself) is not a finding of the raw log's checker; a key no writer sent still is.
    static func messagingLogCases(good: [Checker.Entry], acked: [String: History.Ack]) -> [Case] {
        func u32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
        func u64(_ v: UInt64) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
        func key(_ k: [UInt8]) -> String { String(decoding: [UInt8(k.count)] + k + u32(1), as: UTF8.self) }
        let chatKey = Array("m".utf8) + u32(2) + u32(5) + Array("w0-17".utf8)
        let header = u64(0) + u64(4) + u64(5) + u32(1) + u64(5)
        let messaging = good + [
            Checker.Entry(index: 4, term: 1, type: 4, stream: 0, seq: 0, payload: key(chatKey)),
            Checker.Entry(index: 5, term: 1, type: Checker.messagingType, stream: 1 << 63 | 9, seq: 1, payload: "\u{0E}chat0-17"),
            Checker.Entry(index: 6, term: 1, type: 5, stream: 0, seq: 0, payload: String(decoding: header, as: UTF8.self)),
            Checker.Entry(index: 7, term: 1, type: Checker.messagingType, stream: 1 << 62 | 2, seq: 1, payload: "\u{14}inbox"),
        ]
        var foreign = messaging
        foreign[3].payload = key(Array("m".utf8) + u32(2) + u32(5) + Array("x-1".utf8))
        func all(_ l: [Checker.Entry]) -> Checker.Result {
            Checker.check(logs: [1: [0: l], 2: [0: l], 3: [0: l]], acked: acked, failed: [], indeterminate: [], shards: 1)
        }
        return [
            ("messaging: messaging records, a chat key and a relay batch from the shard itself", all(messaging), { $0.ok }),
            ("messaging: a request key no writer sent", all(foreign), { $0.unexpected.count == 3 }),
        ]
    }

    /// The chat workload: users 1, 2, 3 in a ring of contacts. Acknowledged: chat0-1 (1->2, message 101),
    /// chat0-2 (2->1, 102), chat1-1 (2->3, 201); of unknown outcome: chat1-2 (3->2, landed as 202) and
    /// chat1-3 (3->1, never landed); refused: chat0-3 (1->3).
    static func chatCases() -> [Case] {
        typealias C = ChatChecker
        func send(_ key: String, _ w: Int, _ from: UInt64, _ to: UInt64, id: UInt64? = nil, unknown: Bool = false, refused: Bool = false) -> (String, C.Send) {
            let content = "chat" + key.dropFirst()
            var s = C.Send(key: key, writer: w, from: from, to: to, content: content, attempts: unknown ? 3 : 1, unknown: unknown)
            s.messageID = id
            s.seq = id.map { $0 % 100 }
            if refused { s.refusal = "403 not_allowed" }
            return (key, s)
        }
        let sends = Dictionary(uniqueKeysWithValues: [
            send("w0-1", 0, 1, 2, id: 101), send("w0-2", 0, 2, 1, id: 102), send("w1-1", 1, 2, 3, id: 201),
            send("w1-2", 1, 3, 2, unknown: true), send("w1-3", 1, 3, 1, unknown: true), send("w0-3", 0, 1, 3, refused: true),
        ])
        func m(_ id: UInt64, _ from: UInt64, _ to: UInt64, _ content: String, seq: UInt64? = nil) -> C.Message {
            C.Message(id: id, seq: seq ?? id % 100, sender: from, receiver: to, content: content)
        }
        let m101 = m(101, 1, 2, "chat0-1")
        let m102 = m(102, 2, 1, "chat0-2")
        let m201 = m(201, 2, 3, "chat1-1")
        let m202 = m(202, 3, 2, "chat1-2")
        let pairs = [C.Pair(a: 1, b: 2), C.Pair(a: 2, b: 3), C.Pair(a: 3, b: 1)]
        // Newest first.
        let h12 = [m102, m101]
        let h23 = [m202, m201]
        func histories(_ h12a: [C.Message] = h12, _ h12b: [C.Message] = h12, _ h23: [C.Message] = h23, _ h31: [C.Message] = []) -> [C.Side: [C.Message]] {
            [
                C.Side(viewer: 1, peer: 2): h12a, C.Side(viewer: 2, peer: 1): h12b, C.Side(viewer: 2, peer: 3): h23, C.Side(viewer: 3, peer: 2): h23,
                C.Side(viewer: 3, peer: 1): h31, C.Side(viewer: 1, peer: 3): h31,
            ]
        }
        /// Two contact events, then the messages, cursors 1...n.
        func events(_ user: UInt64, _ msgs: [C.Message], cursors: [String]? = nil) -> [C.Event] {
            let list = [C.Event(cursor: "", type: "contact_request"), C.Event(cursor: "", type: "contact_accepted")]
                + msgs.map { C.Event(cursor: "", type: "message", messageID: $0.id, peer: $0.sender == user ? $0.receiver : $0.sender, message: $0) }
            return list.enumerated().map { k, e in
                var e = e
                e.cursor = cursors?[k] ?? "\(k + 1)"
                return e
            }
        }
        let syncs: [UInt64: [C.Event]] = [1: events(1, [m101, m102]), 2: events(2, [m101, m201, m102, m202]), 3: events(3, [m201, m202])]
        func run(_ h: [C.Side: [C.Message]] = histories(), _ s: [UInt64: [C.Event]] = syncs, sends: [String: C.Send] = sends, reads: [C.Read] = []) -> Checker.Result {
            C.check(sends: sends, pairs: pairs, histories: h, syncs: s, reads: reads)
        }
        let copy = m(103, 1, 2, "chat0-1", seq: 3)
        var withCopy = syncs
        withCopy[1] = events(1, [m101, m102, copy])
        withCopy[2] = events(2, [m101, m201, m102, m202, copy])
        let phantom = m(104, 2, 1, "chat7-7", seq: 3)
        var withPhantom = syncs
        withPhantom[1] = events(1, [m101, m102, phantom])
        withPhantom[2] = events(2, [m101, m201, m102, m202, phantom])
        var doubled = syncs
        doubled[2] = events(2, [m101, m201, m102, m101, m202])
        var syncLost = syncs
        syncLost[3] = events(3, [m202])
        var gap = syncs
        gap[1] = events(1, [m101, m102], cursors: ["1", "2", "4", "5"])
        var outOfOrder = syncs
        outOfOrder[1] = events(1, [m102, m101])
        let refused = m(301, 1, 3, "chat0-3", seq: 1)
        var withRefused = syncs
        withRefused[1] = events(1, [m101, m102, refused])
        withRefused[3] = events(3, [m201, m202, refused])
        let landedTwice = m(203, 3, 2, "chat1-2", seq: 3)
        var withLandedTwice = syncs
        withLandedTwice[2] = events(2, [m101, m201, m102, m202, landedTwice])
        withLandedTwice[3] = events(3, [m201, m202, landedTwice])
        let wrongPair = m(302, 1, 3, "chat0-1", seq: 1)
        var withWrongPair = syncs
        withWrongPair[1] = events(1, [m101, m102, wrongPair])
        withWrongPair[3] = events(3, [m201, m202, wrongPair])
        var replayedElsewhere = sends
        replayedElsewhere["w0-1"]?.replays = [101, 105]
        var changed = m101
        changed.content = "chat1-3"

        // Read your writes: the sender's newest page right after each acknowledgement.
        func read(_ key: String, _ viewer: UInt64, _ peer: UInt64, _ id: UInt64, seq: UInt64, status: UInt = 200, page: [C.Message]?, more: Bool = false) -> C.Read {
            C.Read(key: key, viewer: viewer, peer: peer, node: 2, messageID: id, seq: seq, status: status, page: page, more: more, error: page == nil ? "failed" : nil)
        }
        let goodReads = [
            read("w0-1", 1, 2, 101, seq: 1, page: [m101]), read("w0-2", 2, 1, 102, seq: 2, page: [m102, m101]), read("w1-1", 2, 3, 201, seq: 1, page: [m201]),
        ]
        let failedReads = [read("w0-2", 2, 1, 102, seq: 2, status: 503, page: nil), read("w1-1", 2, 3, 201, seq: 1, status: 0, page: nil)]
        // The other writer's 20 messages 2->1 (chat1-10 ... chat1-29, ids 110...129, seqs 3...22) after
        // chat0-1 and chat0-2: the read right after chat0-1's acknowledgement sees only them.
        let newer = (10...29).map { send("w1-\($0)", 1, 2, 1, id: UInt64(100 + $0)) }
        var manySends = sends
        for (k, v) in newer { manySends[k] = v }
        let newerMessages = (10...29).reversed().map { m(UInt64(100 + $0), 2, 1, "chat1-\($0)", seq: UInt64($0 - 7)) }
        let manyH12 = newerMessages + h12
        var manySyncs = syncs
        manySyncs[1] = events(1, [m101, m102] + newerMessages.reversed())
        manySyncs[2] = events(2, [m101, m201, m102, m202] + newerMessages.reversed())
        let fullOfNewer = read("w0-1", 1, 2, 101, seq: 1, page: Array(manyH12.prefix(20)), more: true)
        // chat1-12 (seq 5) missing from a full page that reaches back to seq 2.
        let skipped = read("w1-12", 2, 1, 112, seq: 5, page: Array(manyH12.filter { $0.id != 112 }.prefix(20)), more: true)
        var movedSeq = m101
        movedSeq.seq = 7
        return [
            ("chat: read your writes: every acknowledged message on the next page, failed reads no finding", run(reads: goodReads + failedReads), { $0.ok }),
            ("chat: read your writes: an acknowledged message missing from the next page", run(reads: [read("w0-2", 2, 1, 102, seq: 2, page: [m101])]), { $0.stale.count == 1 && $0.lost.isEmpty && !$0.ok }),
            ("chat: read your writes: missing from a page of newer messages that is the whole history", run(reads: [read("w0-1", 1, 2, 101, seq: 1, page: [m102])]), { $0.stale.count == 1 }),
            ("chat: read your writes: not on a page full of 20 newer messages", run(histories(manyH12, manyH12), manySyncs, sends: manySends, reads: [fullOfNewer]), { $0.ok }),
            ("chat: read your writes: missing from a full page that reaches back past it", run(histories(manyH12, manyH12), manySyncs, sends: manySends, reads: [skipped]), { $0.stale.count == 1 }),
            ("chat: read your writes: a 200 without a readable page", run(reads: [read("w0-1", 1, 2, 101, seq: 1, page: nil)]), { $0.stale.count == 1 }),
            ("chat: read your writes: the message at another seq than acknowledged", run(reads: [read("w0-1", 1, 2, 101, seq: 1, page: [movedSeq])]), { $0.divergent.count == 1 && $0.stale.isEmpty }),
            ("chat: clean (an unknown outcome landed once, another not at all)", run(), { $0.ok }),
            ("chat: an acknowledged message twice in one history", run(histories([m102, m101, m101])), { $0.duplicated.count == 1 && $0.divergent.count == 1 }),
            ("chat: one client_msg_id landed as two messages", run(histories([copy, m102, m101], [copy, m102, m101]), withCopy), { $0.duplicated.count == 2 && $0.lost.isEmpty }),
            ("chat: an unknown outcome landed twice", run(histories(h12, h12, [landedTwice, m202, m201]), withLandedTwice), { $0.duplicated.count == 2 }),
            ("chat: an acknowledged message lost from both histories", run(histories([m102], [m102])), { $0.lost.count == 2 && $0.unexpected.isEmpty }),
            ("chat: an acknowledged message lost from one history", run(histories(h12, [m102])), { $0.lost.count == 1 && $0.divergent.count == 1 }),
            ("chat: the two histories in different orders", run(histories(h12, [m101, m102])), { $0.divergent.count == 1 && $0.misplaced.count == 1 }),
            ("chat: a message with content never sent", run(histories([phantom, m102, m101], [phantom, m102, m101]), withPhantom), { $0.unexpected.count == 4 && $0.lost.isEmpty }),
            ("chat: a refused message in the histories", run(histories(h12, h12, h23, [refused]), withRefused), { $0.unexpected.count == 2 }),
            ("chat: a message in another conversation than it was sent to", run(histories(h12, h12, h23, [wrongPair]), withWrongPair), { $0.misplaced.count == 4 }),
            ("chat: an acknowledged message with other content", run(histories([m102, changed], [m102, changed])), { $0.divergent.count == 2 }),
            ("chat: sent again, answered with the same message", run(sends: sends.mapValues { var s = $0; if let id = s.messageID { s.replays = [id] }; return s }), { $0.ok }),
            ("chat: sent again, answered with another message", run(sends: replayedElsewhere), { $0.divergent.count == 1 }),
            ("chat: a message twice in a sync", run(histories(), doubled), { $0.duplicated.count == 1 && $0.lost.isEmpty }),
            ("chat: an acknowledged message missing from a sync", run(histories(), syncLost), { $0.lost.count == 1 }),
            ("chat: sync cursors with a gap", run(histories(), gap), { $0.divergent.count == 1 }),
            ("chat: a conversation out of order in a sync", run(histories(), outOfOrder), { $0.misplaced.count == 1 }),
        ] + deviceCases(sends: sends, pairs: pairs, histories: histories(), syncs: syncs)
    }

    /// The group workload: group 9 of owner 1, created with users 2 and 3 (seq 1); user 4 added at seq 3,
    /// user 3 left at seq 5; user 5 never a member. Acknowledged: group0-1 (from 1, message 901, seq 2),
    /// group0-2 (from 2, 902, seq 4), group1-1 (from 4, 903, seq 6); of unknown outcome: group1-2 (from
    /// 1, landed as 904 at seq 7) and group1-3 (from 2, never landed); refused: group0-3 (from 2).
    static func groupChatCases() -> [Case] {
        typealias G = GroupChatChecker
        let g: UInt64 = 9
        let setup = G.Setup(group: g, owner: 1, initial: [1, 2, 3], users: [1, 2, 3, 4, 5])
        func send(_ key: String, _ from: UInt64, id: UInt64? = nil, seq: UInt64? = nil, unknown: Bool = false, refused: Bool = false) -> (String, G.Send) {
            var s = G.Send(key: key, writer: 0, from: from, content: "group" + key.dropFirst(), attempts: unknown ? 3 : 1, unknown: unknown)
            s.messageID = id
            s.seq = seq
            if refused { s.refusal = "400 invalid_content" }
            return (key, s)
        }
        let sends = Dictionary(uniqueKeysWithValues: [
            send("g0-1", 1, id: 901, seq: 2), send("g0-2", 2, id: 902, seq: 4), send("g1-1", 4, id: 903, seq: 6),
            send("g1-2", 1, unknown: true), send("g1-3", 2, unknown: true), send("g0-3", 2, refused: true),
        ])
        func m(_ id: UInt64, _ seq: UInt64, _ from: UInt64, _ content: String) -> G.Message { G.Message(id: id, seq: seq, sender: from, group: g, content: content) }
        let a = m(901, 2, 1, "group0-1")
        let b = m(902, 4, 2, "group0-2")
        let c = m(903, 6, 4, "group1-1")
        let d = m(904, 7, 1, "group1-2")
        func change(_ type: String, _ seq: UInt64, users: [UInt64] = [], user: UInt64? = nil) -> G.Event {
            G.Event(cursor: "", type: type, group: g, seq: seq, by: user ?? 1, userIDs: users, userID: user)
        }
        func events(_ list: [G.Event]) -> [G.Event] {
            list.enumerated().map { k, e in
                var e = e
                e.cursor = "\(k + 1)"
                return e
            }
        }
        func msg(_ x: G.Message) -> G.Event { G.Event(cursor: "", type: "group_message", group: g, messageID: x.id, seq: x.seq, by: x.sender, message: x) }
        let created = change("group_created", 1)
        let added = change("group_members_added", 3, users: [4])
        let left = change("group_member_removed", 5, user: 3)
        let ownerSync = events([created, msg(a), added, msg(b), left, msg(c), msg(d)])
        let histories: [UInt64: [G.Message]] = [1: [d, c, b, a], 2: [d, c, b, a], 4: [d, c, b]]
        let syncs: [UInt64: [G.Event]] = [
            1: ownerSync, 2: events([created, msg(a), added, msg(b), left, msg(c), msg(d)]), 3: events([created, msg(a), added, msg(b), left]),
            4: events([added, msg(b), msg(c), msg(d)]), 5: [],
        ]
        let changes = [G.Change(kind: .add, user: 4, attempts: 1, landed: true), G.Change(kind: .leave, user: 3, attempts: 2, unknown: true, landed: true)]
        func run(
            histories h: [UInt64: [G.Message]] = histories, syncs s: [UInt64: [G.Event]] = syncs, owner: [G.Event] = ownerSync, sends: [String: G.Send] = sends,
            outsiders: [UInt64: UInt] = [3: 404, 5: 404], members: Set<UInt64> = [1, 2, 4]
        ) -> Checker.Result {
            var s2 = s
            s2[1] = owner
            let o = G.Observed(ownerSync: owner, histories: h, syncs: s2, outsiderReads: outsiders, finalMembers: members)
            return G.check(setup: setup, sends: sends, changes: changes, observed: o)
        }
        func with(_ u: UInt64, _ list: [G.Message]) -> [UInt64: [G.Message]] {
            var h = histories
            h[u] = list
            return h
        }
        func sync(_ u: UInt64, _ list: [G.Event]) -> [UInt64: [G.Event]] {
            var s = syncs
            s[u] = events(list)
            return s
        }
        var bAt6 = b
        bAt6.seq = 6
        var cAt4 = c
        cAt4.seq = 4
        let phantom = m(905, 8, 2, "group9-9")
        let refused = m(906, 8, 2, "group0-3")
        let second = m(907, 8, 1, "group0-1")
        var fromOutsider = sends
        fromOutsider["g1-1"]?.from = 5
        var outsiderC = c
        outsiderC.sender = 5
        var replayed = sends
        replayed["g0-1"]?.replays = [999]
        let all3 = { (x: G.Message) in [1: [x, d, c, b, a], 2: [x, d, c, b, a], 4: [x, d, c, b]] as [UInt64: [G.Message]] }
        return [
            ("group: clean (an unknown outcome landed once, another not at all; a refused send nowhere)", run(), { $0.ok }),
            ("group: an acknowledged message missing from a member's history", run(histories: with(2, [d, c, a])), { !$0.lost.isEmpty && !$0.ok }),
            ("group: an acknowledged message twice in a member's history", run(histories: with(2, [d, c, b, b, a])), { !$0.duplicated.isEmpty }),
            ("group: a message in the history of a member who joined after it", run(histories: with(4, [d, c, b, a])), { !$0.unexpected.isEmpty && $0.lost.isEmpty }),
            ("group: an ex-member's sync with a message ordered after they left", run(syncs: sync(3, [created, msg(a), msg(b), left, msg(c)])), { $0.unexpected.count == 1 }),
            ("group: a new member's sync with a message ordered before they joined", run(syncs: sync(4, [msg(a), added, msg(b), msg(c), msg(d)])), { $0.unexpected.count == 1 }),
            ("group: a member's sync without an acknowledged message of their period", run(syncs: sync(4, [added, msg(c), msg(d)])), { $0.lost.count == 1 }),
            ("group: a member's sync without a message of unknown outcome that landed", run(syncs: sync(2, [created, msg(a), msg(b), msg(c)])), { $0.lost.count == 1 }),
            ("group: a message twice in a sync", run(syncs: sync(2, [msg(a), msg(b), msg(c), msg(d), msg(d)])), { $0.duplicated.count == 1 }),
            ("group: two members' histories in different orders", run(histories: with(2, [d, bAt6, cAt4, a])), { !$0.divergent.isEmpty }),
            ("group: a message with content never sent", run(histories: all3(phantom)), { !$0.unexpected.isEmpty && $0.lost.isEmpty }),
            ("group: a refused send in the histories", run(histories: all3(refused)), { !$0.unexpected.isEmpty }),
            ("group: one client_msg_id landed as two messages", run(histories: all3(second)), { !$0.duplicated.isEmpty }),
            ("group: an acknowledged leave missing from the owner's sync", run(owner: events([created, msg(a), added, msg(b), msg(c), msg(d)])), { !$0.lost.isEmpty }),
            ("group: a membership change nobody made in the owner's sync", run(owner: ownerSync + events([change("group_member_removed", 8, user: 2)]).map { var e = $0; e.cursor = "8"; return e }), { !$0.unexpected.isEmpty }),
            ("group: an acknowledged message from a user who was not a member", run(histories: [1: [d, outsiderC, b, a], 2: [d, outsiderC, b, a], 4: [d, outsiderC, b]], sends: fromOutsider), { $0.unexpected.count == 1 }),
            ("group: a user who left reads the group's history", run(outsiders: [3: 200, 5: 404]), { $0.divergent.count == 1 }),
            ("group: sent again, answered with another message", run(sends: replayed), { $0.divergent.count == 1 }),
            ("group: the group lists other members than its change events", run(members: [1, 2]), { $0.divergent.count == 1 }),
        ]
    }

    /// The chat workload's WebSocket devices (`ChatChecker.checkDevices`), on the fixture of `chatCases`:
    /// users 1, 2, 3 whose syncs have 4, 6 and 4 events (user 2's: contact request, contact accepted,
    /// 101, 201, 102, 202; message 202 is chat1-2, of unknown outcome, landed). Each user has two devices
    /// built from their sync: device 0 moved to another node after cursor 2, device 1 got everything on
    /// one connection; then each made its final catch-up.
    static func deviceCases(
        sends: [String: ChatChecker.Send], pairs: [ChatChecker.Pair], histories: [ChatChecker.Side: [ChatChecker.Message]], syncs: [UInt64: [ChatChecker.Event]]
    ) -> [Case] {
        typealias C = ChatChecker
        /// A connection that resumed from `resume` and got the sync's events at `cursors`, in that order, then `ready`.
        func conn(_ user: UInt64, _ resume: UInt64, _ cursors: [UInt64], ready: UInt64? = nil, final: Bool = false, from s: [UInt64: [C.Event]] = syncs) -> C.Connection {
            let list = s[user] ?? []
            var c = C.Connection(node: 1 + Int(resume % 3), resume: resume, final: final)
            c.events = cursors.compactMap { k in list.first { $0.cursor == "\(k)" } }
            c.ready = ready
            c.readyAfter = c.events.count
            return c
        }
        func device(_ user: UInt64, _ index: Int, _ connections: [C.Connection]) -> C.Device {
            var d = C.Device(user: user, index: index, connections: connections)
            d.finalReady = connections.last(where: \.final)?.ready
            return d
        }
        func devices(_ s: [UInt64: [C.Event]]) -> [C.Device] {
            s.keys.sorted().flatMap { u -> [C.Device] in
                let n = UInt64(s[u]?.count ?? 0)
                return [
                    device(u, 0, [conn(u, 0, [1, 2], from: s), conn(u, 2, Array(3...n), ready: n, from: s), conn(u, n, [], ready: n, final: true, from: s)]),
                    device(u, 1, [conn(u, 0, Array(1...n), ready: n, from: s), conn(u, n, [], ready: n, final: true, from: s)]),
                ]
            }
        }
        let good = devices(syncs)
        func run(_ changed: [C.Device], histories h: [C.Side: [C.Message]] = histories, syncs s: [UInt64: [C.Event]] = syncs, base: [C.Device] = good) -> Checker.Result {
            let all = base.map { d in changed.first { $0.user == d.user && $0.index == d.index } ?? d }
            return C.checkDevices(all, sends: sends, pairs: pairs, histories: h, syncs: s)
        }
        /// User 1's events after cursor 4 (the sync ends there): `event` at cursor 5.
        func extra(_ event: C.Event) -> [C.Device] {
            var c = conn(1, 0, [1, 2, 3, 4])
            var e = event
            e.cursor = "5"
            c.events.append(e)
            c.ready = 5
            c.readyAfter = 5
            return [device(1, 0, [c, conn(1, 5, [], ready: 5, final: true)])]
        }
        let message = { (user: UInt64, cursor: Int) in syncs[user]?[cursor - 1] ?? C.Event(cursor: "\(cursor)", type: "none") }
        let phantom = C.Event(
            cursor: "5", type: "message", messageID: 104, peer: 2, message: C.Message(id: 104, seq: 3, sender: 2, receiver: 1, content: "chat7-7"), fromMe: false)
        // Chat1-2 (202) never landed: in no history, no sync, on no device.
        let without202 = syncs.mapValues { $0.filter { $0.messageID != 202 } }
        let historiesWithout202 = histories.mapValues { $0.filter { $0.id != 202 } }
        // User 3's device 0 resumed from 2 and got cursor 3 again, as another event (202, which is at 4).
        var changed = conn(3, 2, [4, 4], ready: 4)
        changed.events[0].cursor = "3"
        var syncsWithout1 = syncs
        syncsWithout1[1] = nil
        return [
            ("chat ws: every device has every event once, through a move and the final catch-up (an unknown outcome that landed too)", run([]), { $0.ok }),
            (
                "chat ws: duplicates across a resume from an earlier cursor",
                run([device(2, 0, [conn(2, 0, [1, 2, 3]), conn(2, 1, [2, 3, 4, 5, 6], ready: 6), conn(2, 6, [], ready: 6, final: true)])]), { $0.ok }
            ),
            (
                "chat ws: an unknown outcome that never landed is on no device",
                run([], histories: historiesWithout202, syncs: without202, base: devices(without202)), { $0.ok }
            ),
            ("chat ws: a gap within a connection", run([device(1, 1, [conn(1, 0, [1, 3, 4], ready: 4), conn(1, 4, [], ready: 4, final: true)])]), { $0.lost.count == 1 && $0.misplaced.isEmpty }),
            ("chat ws: events out of order", run([device(1, 1, [conn(1, 0, [1, 2, 4, 3], ready: 4), conn(1, 4, [], ready: 4, final: true)])]), { $0.misplaced.count == 1 && $0.lost.isEmpty }),
            (
                "chat ws: ready at a cursor the events had not reached",
                run([device(1, 1, [conn(1, 0, [1, 2], ready: 4), conn(1, 2, [3, 4], ready: 4), conn(1, 4, [], ready: 4, final: true)])]), { $0.lost.count == 1 && $0.divergent.isEmpty }
            ),
            (
                "chat ws: an acknowledged message missing on the sender's device (its catch-up ends early)",
                run([device(2, 1, [conn(2, 0, [1, 2, 3, 4], ready: 4), conn(2, 4, [], ready: 4, final: true)])]),
                { $0.lost.count == 2 && $0.lost.contains { $0.contains("lacks acknowledged message 102 (the user sent it)") } }
            ),
            (
                "chat ws: an acknowledged message missing on the receiver's device (sync not read)",
                run([device(1, 0, [conn(1, 0, [1, 2, 3], ready: 3), conn(1, 3, [], ready: 3, final: true)])], syncs: syncsWithout1),
                { $0.lost.count == 1 && $0.lost.contains { $0.contains("lacks acknowledged message 102 (the user received it)") } }
            ),
            ("chat ws: a message never sent (phantom)", run(extra(phantom)), { $0.unexpected.count == 1 && $0.divergent.count == 1 && $0.lost.isEmpty }),
            ("chat ws: an acknowledged message at two cursors", run(extra(message(1, 3))), { $0.duplicated.count == 1 && $0.divergent.count == 1 }),
            (
                "chat ws: the same cursor with another event after a resume",
                run([device(3, 0, [conn(3, 0, [1, 2, 3, 4]), changed, conn(3, 4, [], ready: 4, final: true)])]),
                { $0.divergent.count == 1 && $0.lost.isEmpty && $0.duplicated.isEmpty }
            ),
        ]
    }
}
