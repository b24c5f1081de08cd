import Foundation

/// Jepsen's queue checker over the final logs: every replica's committed log of every shard is read
/// back after healing and compared with what clients were told.
struct Checker {
    struct Entry: Equatable {
        var index: UInt64
        var term: UInt64
        var type: Int
        var stream: UInt64
        var seq: UInt64
        var payload: String
        /// The payload's bytes, kept for binary records only: request keys (4), relay batch headers (5),
        /// fan-out records (6) and the records relays derive from them (streams from `derivedStreamBase`).
        var bytes: [UInt8] = []
    }

    /// Streams the relay workload's fan-out records name in their destination shard (Workload.swift).
    static let derivedStreamBase: UInt64 = 100

    /// A fan-out record as the workload writes it: `u16 1 | u64 shard | u64 stream | body`.
    static func parseFanout(_ b: [UInt8]) -> (shard: UInt64, stream: UInt64, body: String)? {
        guard b.count > 18, b[0] == 1, b[1] == 0 else { return nil }
        return (le(b[2..<10]), le(b[10..<18]), String(decoding: b[18...], as: UTF8.self))
    }

    /// A derived record: `u64 source shard | u64 source index | body` (FanoutRule).
    static func parseDerived(_ b: [UInt8]) -> (shard: UInt64, index: UInt64, body: String)? {
        guard b.count > 16 else { return nil }
        return (le(b[0..<8]), le(b[8..<16]), String(decoding: b[16...], as: UTF8.self))
    }

    static func le(_ b: ArraySlice<UInt8>) -> UInt64 {
        b.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
    }

    /// A burst batch that a node acknowledged: its `count` records are at `firstIndex + i`, stream seq
    /// `firstSeq + i` (i = the record's position in the batch, also written in its payload).
    struct BurstAck: Sendable, Equatable {
        var shard: Int
        var stream: UInt64
        var firstIndex: UInt64
        var firstSeq: UInt64
        var count: Int
        /// False when the answer's indexes were not one contiguous range (then only presence is checked).
        var regular = true
    }

    /// Every burst batch by key, by outcome (History).
    struct Bursts: Sendable {
        var acked: [String: BurstAck] = [:]
        /// Definitely not written (4xx, or no connection): key -> records in it.
        var failed: [String: Int] = [:]
        /// Outcome unknown: each record may be in the logs at most once.
        var indeterminate: [String: Int] = [:]
        /// Acknowledgements whose indexes were not one range (each is a finding).
        var irregular: [String] = []
        var ackedRecords: Int { acked.values.reduce(0) { $0 + $1.count } }
    }

    /// What one replica's log holds of one burst batch (only counts and where, not the records).
    struct BatchHits: Equatable {
        var counts: [UInt8] = []
        /// `index - i` and `seq - i` of its records: one value each when they are where the ack said.
        var baseIndexes: Set<UInt64> = []
        var baseSeqs: Set<UInt64> = []
        var shards: Set<Int> = []
        var streams: Set<UInt64> = []
    }

    /// One replica's log of one shard, reduced as it is read, so that hundreds of thousands of burst
    /// records cost 16 bytes each (an index and a digest for the cross-replica comparison) and a counter.
    struct ReplicaLog {
        struct Slot: Equatable {
            var index: UInt64
            var digest: Int
        }
        let shard: Int
        /// Every record, in order: index and a digest of (index, term, type, stream, seq, payload).
        private(set) var slots: [Slot] = []
        /// Every record that is not a burst record, whole.
        private(set) var entries: [Entry] = []
        private(set) var batches: [String: BatchHits] = [:]
        /// Payloads that look like burst records but are not exactly what a burst wrote.
        private(set) var corrupt: [String] = []
        /// Streams whose seqs are not dense, in log order.
        private(set) var seqGaps: [String] = []
        private var lastSeq: [UInt64: UInt64] = [:]

        init(shard: Int) { self.shard = shard }
        init(shard: Int, _ entries: [Entry]) {
            self.shard = shard
            for e in entries { add(e, payload: Array(e.payload.utf8)) }
        }
        var count: Int { slots.count }

        /// `payload` is the record's payload; `e.payload` may be left empty (it is filled in for every record
        /// that is not a burst record).
        mutating func add(_ e: Entry, payload: [UInt8]) {
            var h = Hasher()
            h.combine(e.index)
            h.combine(e.term)
            h.combine(e.type)
            h.combine(e.stream)
            h.combine(e.seq)
            h.combine(payload)
            slots.append(Slot(index: e.index, digest: h.finalize()))
            if e.stream != 0 {
                if let prev = lastSeq[e.stream], e.seq != prev + 1 {
                    seqGaps.append("shard \(shard): stream \(e.stream) seq \(e.seq) follows \(prev)")
                }
                lastSeq[e.stream] = e.seq
            }
            guard e.type == 1, let (batch, i) = BurstPayload.parse(payload) else {
                var e = e
                if e.payload.isEmpty && !payload.isEmpty { e.payload = String(decoding: payload, as: UTF8.self) }
                if e.type == 4 || e.type == 5 || e.type == 6 || (e.type == 1 && e.stream >= Checker.derivedStreamBase) { e.bytes = payload }
                entries.append(e)
                return
            }
            guard payload == BurstPayload.make(batch: batch, i: i) else {
                corrupt.append("shard \(shard) index \(e.index): payload \(String(decoding: payload.prefix(40), as: UTF8.self))… is not what batch \(batch) wrote as record \(i)")
                return
            }
            var b = batches[batch] ?? BatchHits()
            if i >= b.counts.count { b.counts += [UInt8](repeating: 0, count: i + 1 - b.counts.count) }
            b.counts[i] = b.counts[i] &+ (b.counts[i] == 255 ? 0 : 1)
            b.baseIndexes.insert(e.index &- UInt64(i))
            b.baseSeqs.insert(e.seq &- UInt64(i))
            b.shards.insert(shard)
            b.streams.insert(e.stream)
            batches[batch] = b
        }
    }

    /// One node's view of a shard's group (`replicas` of `GET /api/v1/cluster/status`).
    struct GroupView: Equatable {
        var voters: Set<Int>
        var learners: Set<Int>
    }

    struct Result {
        var lost: [String] = []
        var duplicated: [String] = []
        var divergent: [String] = []
        var unexpected: [String] = []
        var misplaced: [String] = []
        /// Hostile requests that were taken, or their markers (or records of reserved types) in a log.
        var hostile: [String] = []
        /// A shard whose final group, as some node reports it, is not the initial one.
        var membership: [String] = []
        /// A read that missed a write acknowledged before it began (the chat workload's read-your-writes reads).
        var stale: [String] = []
        var notes: [String] = []
        var ok: Bool {
            lost.isEmpty && duplicated.isEmpty && divergent.isEmpty && unexpected.isEmpty && misplaced.isEmpty && hostile.isEmpty
                && membership.isEmpty && stale.isEmpty
        }
    }

    /// The marker every hostile payload starts with (Hostile.swift).
    static let hostileMarker = "HOSTILE-"

    /// The record type of messaging records (Docs/messaging.md, "Records"), written only by the nodes.
    static let messagingType = 16

    /// Whole logs (the self-check's histories): reduced, then checked.
    static func check(
        logs: [Int: [Int: [Entry]]], acked: [String: History.Ack], failed: Set<String>, indeterminate: Set<String>, shards: Int,
        readBack: [String: String] = [:], bursts: Bursts = Bursts(), groups: [Int: [Int: GroupView]]? = nil, initialGroup: Set<Int> = [],
        hostileAccepted: [String] = [], placement: [Int: Set<Int>]? = nil
    ) -> Result {
        check(
            logs: logs.mapValues { $0.map { ReplicaLog(shard: $0.key, $0.value) }.reduce(into: [:]) { $0[$1.shard] = $1 } },
            acked: acked, failed: failed, indeterminate: indeterminate, shards: shards, readBack: readBack, bursts: bursts, groups: groups,
            initialGroup: initialGroup, hostileAccepted: hostileAccepted, placement: placement)
    }

    /// logs[node][shard] = that replica's log from index 1 (or the first retained) to the commit index.
    /// `groups[node][shard]`: the group each node reports at the end (nil: not checked).
    static func check(
        logs: [Int: [Int: ReplicaLog]], acked: [String: History.Ack], failed: Set<String>, indeterminate: Set<String>, shards: Int,
        readBack: [String: String] = [:], bursts: Bursts = Bursts(), groups: [Int: [Int: GroupView]]? = nil, initialGroup: Set<Int> = [],
        hostileAccepted: [String] = [], placement: [Int: Set<Int>]? = nil
    ) -> Result {
        var res = Result()
        // `placement[shard]`: the nodes a shard is on (nil: every node holds every shard). A node is
        // checked only for what its shards hold.
        func hosts(_ n: Int, _ shard: Int) -> Bool { placement?[shard]?.contains(n) ?? true }
        func hosts(_ n: Int, key: String, component: Int) -> Bool {
            let parts = key.split(separator: "/", omittingEmptySubsequences: false)
            return parts.count > component ? Int(parts[component]).map { hosts(n, $0) } ?? true : true
        }
        // What cursor reads returned was committed: it must be in every final log, at the same seq.
        for n in logs.keys.sorted() {
            var at: [String: String] = [:]
            for (shard, log) in logs[n] ?? [:] {
                // Readers see data and fan-out records (the latter as their raw bytes).
                for e in log.entries where e.type == 1 || e.type == 6 { at["\(shard)/\(e.stream)/\(e.seq)"] = e.payload }
            }
            for (key, payload) in readBack where at[key] != payload && hosts(n, key: key, component: 0) {
                if let other = at[key] {
                    res.divergent.append("node \(n): \(key) holds \(other), a cursor read returned \(payload)")
                } else {
                    res.lost.append("node \(n): \(payload) (read back at \(key)) is missing")
                }
            }
            for (key, payload) in readBack where failed.contains(payload) {
                res.unexpected.append("\(payload) was refused but a cursor read returned it at \(key)")
            }
        }
        let nodes = logs.keys.sorted()
        for shard in 0..<shards {
            // Divergence: every replica's log must be the same, record for record.
            let replicas = nodes.filter { hosts($0, shard) }
            guard let first = replicas.first, let ref = logs[first]?[shard] else { continue }
            for n in replicas.dropFirst() {
                let other = logs[n]?[shard] ?? ReplicaLog(shard: shard)
                if other.count != ref.count {
                    res.divergent.append("shard \(shard): node \(first) has \(ref.count) records, node \(n) has \(other.count)")
                }
                if let k = (0..<min(ref.count, other.count)).first(where: { ref.slots[$0] != other.slots[$0] }) {
                    res.divergent.append("shard \(shard): nodes \(first) and \(n) differ at index \(ref.slots[k].index)")
                }
            }
        }
        // Each node's fan-out records (by "destination shard/stream/source shard/source index/body") and
        // derived records, checked after the loop: with fewer replicas than nodes a node may hold a
        // destination shard without the source shard, and is checked against the sources the others hold.
        var relays: [Int: (sources: [String], derived: [String: Int])] = [:]
        for n in nodes {
            var count: [String: Int] = [:]
            var at: [String: (shard: Int, entry: Entry)] = [:]
            var batches: [String: BatchHits] = [:]
            // Relays: fan-out records (source) and what the relays derived (destination), by
            // "destination shard/stream/source shard/source index/body".
            var sources: [String] = []
            var derived: [String: Int] = [:]
            var messaging = 0
            for shard in 0..<shards {
                guard let log = logs[n]?[shard] else { continue }
                for g in log.seqGaps { res.divergent.append("node \(n) \(g)") }
                for c in log.corrupt { res.unexpected.append("node \(n) \(c)") }
                for e in log.entries {
                    if e.payload.contains(hostileMarker) {
                        res.hostile.append("node \(n) shard \(shard) index \(e.index): a hostile request's record (type \(e.type)) is in the log: \(e.payload.prefix(60))")
                    } else if e.type == 4 {
                        // A request key the node writes before a keyed request's records:
                        // u8 length | key | u32 count, the key a keyed writer's payload, one record each;
                        // or a chat send's: "m" | u32 sender | u32 receiver | client_msg_id ("w<writer>-<n>");
                        let b = e.bytes
                        let raw = b.count >= 6 && (b[1] == UInt8(ascii: "k") || b[1] == UInt8(ascii: "r"))
                        let chat = b.count >= 16 && b[1] == UInt8(ascii: "m") && b[10] == UInt8(ascii: "w")
                        // A group send's: "g" | u32 sender | u64 group | client_msg_id ("g<writer>-<n>", then 0x00 n for the n-th key of a request a membership change raced).
                        let group = b.count >= 20 && b[1] == UInt8(ascii: "g") && b[14] == UInt8(ascii: "g")
                        let ok = Int(b.first ?? 0) == b.count - 5 && (raw || chat || group) && Array(b.suffix(4)) == [1, 0, 0, 0]
                        if !ok { res.unexpected.append("node \(n) shard \(shard) index \(e.index): a request-key record no keyed writer sent") }
                    } else if e.type == 5 {
                        // A relay batch header the node writes (Docs/state.md, "Relays"): u64 source shard |
                        // u64 first | u64 last | u32 n | n × u64, from another shard or (messaging's inbox
                        // records of users homed there) from this one.
                        let b = e.bytes
                        let source = b.count >= 28 ? Checker.le(b[0..<8]) : UInt64.max
                        let count = b.count >= 28 ? Int(Checker.le(b[24..<28])) : -1
                        if b.count != 28 + 8 * max(0, count) || source >= UInt64(shards) {
                            res.unexpected.append("node \(n) shard \(shard) index \(e.index): a relay batch header that is not a relay batch of a shard")
                        }
                    } else if e.type == Checker.messagingType {
                        // Messaging records (the chat workload's and the relays' inbox records): ChatChecker
                        // checks what they mean through the API.
                        messaging += 1
                        continue
                    } else if e.type == 6 {
                        guard let f = Checker.parseFanout(e.bytes), f.stream >= Checker.derivedStreamBase, f.shard < UInt64(shards), f.shard != UInt64(shard) else {
                            res.unexpected.append("node \(n) shard \(shard) index \(e.index): a fan-out record the workload did not write")
                            continue
                        }
                        sources.append("\(f.shard)/\(f.stream)/\(shard)/\(e.index)/\(f.body)")
                        count[f.body, default: 0] += 1
                        at[f.body] = (shard, e)
                        continue
                    } else if e.type == 1 && e.stream >= Checker.derivedStreamBase {
                        guard let d = Checker.parseDerived(e.bytes) else {
                            res.unexpected.append("node \(n) shard \(shard) index \(e.index): a record in relay stream \(e.stream) that is not a derived record")
                            continue
                        }
                        derived["\(shard)/\(e.stream)/\(d.shard)/\(d.index)/\(d.body)", default: 0] += 1
                        continue
                    } else if e.type == 0 || (6..<0x8000).contains(e.type) {
                        res.hostile.append("node \(n) shard \(shard) index \(e.index): a record of reserved type \(e.type) is in the log")
                    } else if e.type >= 0x8000 {
                        res.unexpected.append("node \(n) shard \(shard) index \(e.index): a record of type \(e.type), which nothing wrote")
                    }
                    guard e.type == 1 else { continue }
                    count[e.payload, default: 0] += 1
                    at[e.payload] = (shard, e)
                }
                for (key, b) in log.batches {
                    // A batch is written to one shard: hits in two shards are merged here and reported below.
                    var m = batches[key] ?? BatchHits()
                    if b.counts.count > m.counts.count { m.counts += [UInt8](repeating: 0, count: b.counts.count - m.counts.count) }
                    for (i, c) in b.counts.enumerated() { m.counts[i] = UInt8(min(255, Int(m.counts[i]) + Int(c))) }
                    m.baseIndexes.formUnion(b.baseIndexes)
                    m.baseSeqs.formUnion(b.baseSeqs)
                    m.shards.formUnion(b.shards)
                    m.streams.formUnion(b.streams)
                    batches[key] = m
                }
            }
            for (p, c) in count where c > 1 { res.duplicated.append("node \(n): \(p) appears \(c) times") }
            relays[n] = (sources, derived)
            res.notes.append("node \(n): \(sources.count) fan-out records, \(derived.values.reduce(0, +)) derived records, \(messaging) messaging records")
            for (p, a) in acked where hosts(n, a.shard) {
                guard let found = at[p] else {
                    res.lost.append("node \(n): acknowledged \(p) (shard \(a.shard) index \(a.index)) is missing")
                    continue
                }
                if found.shard != a.shard || found.entry.index != a.index || found.entry.seq != a.seq {
                    res.misplaced.append("node \(n): \(p) acknowledged at shard \(a.shard) index \(a.index) seq \(a.seq), found at shard \(found.shard) index \(found.entry.index) seq \(found.entry.seq)")
                }
            }
            for p in count.keys where failed.contains(p) { res.unexpected.append("node \(n): \(p) was refused (4xx) but is in the log") }
            for p in count.keys where acked[p] == nil && !failed.contains(p) && !indeterminate.contains(p) && !p.contains(hostileMarker) {
                res.unexpected.append("node \(n): \(p) was never sent")
            }
            let landed = indeterminate.filter { count[$0] != nil }.count
            res.notes.append("node \(n): \(count.count) payloads, \(landed) of \(indeterminate.count) indeterminate writes landed")
            checkBursts(node: n, batches, bursts, &res) { hosts(n, $0) }
        }
        let allSources = Set(relays.values.flatMap(\.sources))
        for n in nodes {
            guard let (own, derived) = relays[n] else { continue }
            // Every fan-out record's derived record exactly once in its destination, none without a source.
            let sources = placement == nil ? Set(own) : allSources
            for key in sources.sorted() where hosts(n, key: key, component: 0) {
                switch derived[key] ?? 0 {
                case 1: break
                case 0: res.lost.append("node \(n): the relay never derived \(key) (destination shard/stream/source shard/index/body)")
                case let c: res.duplicated.append("node \(n): \(key) was derived \(c) times")
                }
            }
            for key in derived.keys.sorted() where !sources.contains(key) {
                res.unexpected.append("node \(n): derived record \(key) has no fan-out record at that source index")
            }
        }
        res.misplaced += bursts.irregular
        res.hostile += hostileAccepted.map { "hostile request not refused: \($0)" }
        if let groups {
            for n in groups.keys.sorted() {
                for shard in (groups[n] ?? [:]).keys.sorted() where !hosts(n, shard) {
                    res.membership.append("node \(n) reports a group for shard \(shard), which is not placed on it")
                }
                for shard in 0..<shards where hosts(n, shard) {
                    guard let g = groups[n]?[shard] else {
                        res.membership.append("node \(n) shard \(shard): no group reported")
                        continue
                    }
                    let initial = placement?[shard] ?? initialGroup
                    if g.voters != initial || !g.learners.isEmpty {
                        res.membership.append("node \(n) shard \(shard): voters \(g.voters.sorted()), learners \(g.learners.sorted()); the group was voters \(initial.sorted())")
                    }
                }
            }
        }
        return res
    }

    /// Burst records on one node: every record of an acknowledged batch exactly once, where the ack
    /// said; a record of an indeterminate batch at most once; none of a failed or never-sent batch.
    static func checkBursts(node n: Int, _ batches: [String: BatchHits], _ bursts: Bursts, _ res: inout Result, hosts: (Int) -> Bool = { _ in true }) {
        var landed = 0
        var records = 0
        for (key, a) in bursts.acked where hosts(a.shard) {
            let b = batches[key] ?? BatchHits()
            let missing = (0..<a.count).filter { $0 >= b.counts.count || b.counts[$0] == 0 }
            if !missing.isEmpty {
                res.lost.append("node \(n): \(missing.count) of \(a.count) records of acknowledged burst batch \(key) (shard \(a.shard) from index \(a.firstIndex)) are missing, first record \(missing[0])")
            }
            let twice = b.counts.indices.filter { b.counts[$0] > 1 }
            if !twice.isEmpty { res.duplicated.append("node \(n): \(twice.count) records of burst batch \(key) appear more than once, first record \(twice[0])") }
            if b.counts.count > a.count { res.unexpected.append("node \(n): burst batch \(key) had \(a.count) records, the log has record \(b.counts.count - 1)") }
            if b.counts.contains(where: { $0 > 0 }) {
                if b.shards != [a.shard] || b.streams != [a.stream] {
                    res.misplaced.append("node \(n): burst batch \(key) acknowledged on shard \(a.shard) stream \(a.stream), found on shards \(b.shards.sorted()) streams \(b.streams.sorted())")
                } else if a.regular && (b.baseIndexes != [a.firstIndex] || b.baseSeqs != [a.firstSeq]) {
                    res.misplaced.append("node \(n): burst batch \(key) acknowledged at index \(a.firstIndex) seq \(a.firstSeq), its records are at base indexes \(b.baseIndexes.sorted().prefix(4)) seqs \(b.baseSeqs.sorted().prefix(4))")
                }
            }
        }
        for (key, b) in batches where bursts.acked[key] == nil {
            if bursts.failed[key] != nil {
                res.unexpected.append("node \(n): burst batch \(key) was refused (4xx or no connection) but \(b.counts.filter { $0 > 0 }.count) of its records are in the log")
            } else if let c = bursts.indeterminate[key] {
                landed += 1
                records += b.counts.reduce(0) { $0 + Int($1) }
                let twice = b.counts.indices.filter { b.counts[$0] > 1 }
                if !twice.isEmpty { res.duplicated.append("node \(n): \(twice.count) records of indeterminate burst batch \(key) appear more than once") }
                if b.counts.count > c { res.unexpected.append("node \(n): indeterminate burst batch \(key) had \(c) records, the log has record \(b.counts.count - 1)") }
                if b.shards.count != 1 || b.streams.count != 1 || b.baseIndexes.count != 1 || b.baseSeqs.count != 1 {
                    res.misplaced.append("node \(n): the records of indeterminate burst batch \(key) are not one range (shards \(b.shards.sorted()), \(b.baseIndexes.count) base indexes)")
                }
            } else {
                res.unexpected.append("node \(n): burst batch \(key) was never sent")
            }
        }
        res.notes.append("node \(n): \(bursts.acked.count) acknowledged burst batches (\(bursts.ackedRecords) records); \(landed) of \(bursts.indeterminate.count) indeterminate batches landed (\(records) records)")
    }
}
