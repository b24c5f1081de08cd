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
    }

    struct Result {
        var lost: [String] = []
        var duplicated: [String] = []
        var divergent: [String] = []
        var unexpected: [String] = []
        var misplaced: [String] = []
        var notes: [String] = []
        var ok: Bool { lost.isEmpty && duplicated.isEmpty && divergent.isEmpty && unexpected.isEmpty && misplaced.isEmpty }
    }

    /// logs[node][shard] = entries from index 1 (or the first retained) to the commit index.
    static func check(
        logs: [Int: [Int: [Entry]]], acked: [String: History.Ack], failed: Set<String>, indeterminate: Set<String>, shards: Int,
        readBack: [String: String] = [:]
    ) -> Result {
        var res = Result()
        // What cursor reads returned was committed: it must be in every final log, at the same seq.
        for n in logs.keys.sorted() {
            var at: [String: String] = [:]
            for (shard, entries) in logs[n] ?? [:] {
                for e in entries where e.type == 1 { at["\(shard)/\(e.stream)/\(e.seq)"] = e.payload }
            }
            for (key, payload) in readBack where at[key] != payload {
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
            guard let ref = nodes.first.flatMap({ logs[$0]?[shard] }) else { continue }
            for n in nodes.dropFirst() {
                let other = logs[n]?[shard] ?? []
                if other.count != ref.count {
                    res.divergent.append("shard \(shard): node \(nodes[0]) has \(ref.count) records, node \(n) has \(other.count)")
                }
                if let k = (0..<min(ref.count, other.count)).first(where: { ref[$0] != other[$0] }) {
                    res.divergent.append("shard \(shard): nodes \(nodes[0]) and \(n) differ at index \(ref[k].index)")
                }
            }
        }
        for n in nodes {
            var count: [String: Int] = [:]
            var at: [String: (shard: Int, entry: Entry)] = [:]
            for shard in 0..<shards {
                var lastSeq: [UInt64: UInt64] = [:]
                for e in logs[n]?[shard] ?? [] where e.type == 1 {
                    count[e.payload, default: 0] += 1
                    at[e.payload] = (shard, e)
                    if let prev = lastSeq[e.stream], e.seq != prev + 1 {
                        res.divergent.append("node \(n) shard \(shard): stream \(e.stream) seq \(e.seq) follows \(prev)")
                    }
                    lastSeq[e.stream] = e.seq
                }
            }
            for (p, c) in count where c > 1 { res.duplicated.append("node \(n): \(p) appears \(c) times") }
            for (p, a) in acked {
                guard let found = at[p] else {
                    res.lost.append("node \(n): acknowledged \(p) (shard \(a.shard) index \(a.index)) is missing")
                    continue
                }
                if found.shard != a.shard || found.entry.index != a.index || found.entry.seq != a.seq {
                    res.misplaced.append("node \(n): \(p) acknowledged at shard \(a.shard) index \(a.index) seq \(a.seq), found at shard \(found.shard) index \(found.entry.index) seq \(found.entry.seq)")
                }
            }
            for p in count.keys where failed.contains(p) { res.unexpected.append("node \(n): \(p) was refused (4xx) but is in the log") }
            for p in count.keys where acked[p] == nil && !failed.contains(p) && !indeterminate.contains(p) {
                res.unexpected.append("node \(n): \(p) was never sent")
            }
            let landed = indeterminate.filter { count[$0] != nil }.count
            res.notes.append("node \(n): \(count.count) payloads, \(landed) of \(indeterminate.count) indeterminate writes landed")
        }
        return res
    }
}
