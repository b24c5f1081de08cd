import Raft
import WeftCore

/// Inline relay records (Docs/state.md, "Inline relay records"): what a record derives for its own shard,
/// written by the leader right after it in the same proposal, so it commits in the record's Raft round
/// instead of one round later through the shard's own relay lane. The lane leaves out what it finds
/// written right after its source (`RelayRunner.inlineRun`), so each derived record is written once.
extension ShardReplica {
    /// `requests`, stamped, in order, each followed by its inline records; `prefix` (a request key) goes
    /// first. Returns what to propose and, per request, how many inline records follow its own.
    ///
    /// Inline records follow only:
    /// - a request of one record (a keyed request's window counts the request's own records: the inline
    ///   ones come after them, outside it);
    /// - on a leader whose admission runs (`appliedTerm == raft.term`: the state it admitted the record
    ///   against holds every entry of earlier terms);
    /// - when no stream the rule names has a record in the log that is not applied yet, counting the
    ///   requests before it in this proposal. So apply sees the state admission saw, and accepts the record:
    ///   an inline record never stands for one whose source apply rejects;
    /// - when the own relay lane owes nothing of the same order key (`inlineOwed`, `inlineFloor`): the
    ///   entries of one conversation reach an inbox in the conversation's order.
    func withInline(_ requests: [[Proposal]], prefix: [Proposal] = []) -> (all: [Proposal], inline: [Int]) {
        var all = prefix
        all.reserveCapacity(prefix.count + requests.reduce(0) { $0 + $1.count } + 2)
        var inline = [Int](repeating: 0, count: requests.count)
        guard let rule = inlineRule else {
            for r in requests { all += r }
            return (all, inline)
        }
        // A mark only the leader sets, here: one that came with a request is dropped (as each record is
        // taken, with no copy of the requests on this path every proposal takes).
        guard raft.role == .leader, appliedTerm == raft.term else {
            for r in requests { for p in r { all.append(rule.marked(p, inline: false)) } }
            return (all, inline)
        }
        // Order: what the own lane still owes must land first. Records of earlier terms may be owed: none
        // is written inline until the lane's applied mark passes the log's end as this term found it;
        // after that, per key, until it passes the key's last record left to the lane.
        if inlineFloor.term != raft.term {
            inlineFloor = (raft.term, raft.lastIndex)
            inlineOwed = [:]
        }
        let mark = relayMarks.mark(of: shard)
        if inlineOwed.count > 65_536 { inlineOwed = inlineOwed.filter { $0.value > mark } }
        let inOrder = mark >= inlineFloor.index
        // The index and seqs `raft.propose` will give each record: the same rule, on the same thread.
        let first = raft.lastIndex + 1
        var seqs: [StreamID: StreamSeq] = [:]
        func lastSeq(_ s: StreamID) -> StreamSeq { seqs[s] ?? raft.lastSeq(of: s) }
        func take(_ p: Proposal) -> StreamSeq {
            guard p.stream != .none else { return 0 }
            let seq = lastSeq(p.stream) &+ 1
            seqs[p.stream] = seq
            return seq
        }
        /// `p`, at `index`, goes to the relay.
        func owed(_ p: Proposal, at index: LogIndex) {
            if let key = rule.inlineOrderKey(p) { inlineOwed[key] = index }
        }
        for p in prefix { _ = take(p) }
        for (k, request) in requests.enumerated() {
            guard request.count == 1, let asked = request.first else {
                for asked in request {
                    let p = rule.marked(asked, inline: false)
                    owed(p, at: first + LogIndex(all.count))
                    _ = take(p)
                    all.append(p)
                }
                continue
            }
            let p = rule.marked(asked, inline: false)
            let index = first + LogIndex(all.count)
            let seq = take(p)
            guard inOrder, rule.inlineOrderKey(p).map({ (inlineOwed[$0] ?? 0) <= mark }) ?? true,
                let deps = rule.inlineDependencies(p), deps.allSatisfy({ lastSeq($0) <= (appliedSeqs[$0.rawValue] ?? 0) })
            else {
                owed(p, at: index)
                all.append(p)
                continue
            }
            let marked = rule.marked(p, inline: true)
            let record = Record(
                index: index, term: raft.term, stream: marked.stream, seq: seq, type: marked.type, timestampMicros: marked.timestampMicros,
                payload: marked.payload)
            let derived = rule.derive(record, source: shard, for: shard).map(\.proposal)
            // None, or more than the relay looks for, or a stream near its last seq (it would fail the whole
            // proposal): the source goes unmarked and the relay writes them.
            guard !derived.isEmpty, derived.count <= RelayRunner.inlineRecordsMax,
                derived.allSatisfy({ $0.stream == .none || lastSeq($0.stream) < StreamSeq.max - 2 })
            else {
                owed(p, at: index)
                all.append(p)
                continue
            }
            all.append(marked)
            for q in derived { _ = take(q) }
            all += derived
            inline[k] = derived.count
        }
        return (all, inline)
    }
}
