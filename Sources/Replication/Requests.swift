import Raft
import ShardState
import WeftCore

/// A keyed request's result (Docs/state.md, "Idempotent writes").
public struct KeyedResult: Sendable, Equatable {
    /// Where its records landed, with their apply outcomes, in order.
    public var landed: [RequestWindow.Landed]
    /// How many records the request had.
    public var count: Int
    /// A retry of a request already written: these are the first attempt's records; nothing was written.
    public var replayed: Bool
    /// False when a leader change cut the first attempt short: only `landed` committed, and a retry with
    /// the same key writes nothing more.
    public var complete: Bool { landed.count == count }
}

extension ShardReplica {
    /// Proposes a request under a client's key: written once, whatever the retries. The first attempt is
    /// a `requestKey` record followed by the request's records, proposed together; a later request with
    /// the same key gets the first one's result (from the window once applied; waiting for it while it
    /// is in the log and not applied yet) and writes nothing.
    ///
    /// `deadline`: the caller stops waiting then; a retry that had to wait for an earlier attempt does not
    /// propose after it (the caller has been told the outcome is unknown, and may retry with the key).
    public func proposeKeyed(
        _ key: [UInt8], _ proposals: [Proposal], deadline: ContinuousClock.Instant? = nil,
        done: @escaping (Result<KeyedResult, ReplicationError>) -> Void
    ) {
        guard !key.isEmpty, key.count <= RequestWindow.keyBytesMax else {
            return done(.failure(.invalid("a request key has 1...\(RequestWindow.keyBytesMax) bytes")))
        }
        guard !proposals.isEmpty else { return done(.success(KeyedResult(landed: [], count: 0, replayed: false))) }
        guard proposals.count <= RequestWindow.keyedRecordsMax else {
            return done(.failure(.invalid("a keyed request has at most \(RequestWindow.keyedRecordsMax) records")))
        }
        if let bad = proposals.first(where: { $0.type == .config || $0.type == .noop || ShardReplica.isReplicaType($0.type) }) {
            return done(.failure(.invalid("record type \(bad.type.rawValue) is reserved for the system")))
        }
        guard raft.role == .leader else { return done(.failure(.notLeader(raft.leader))) }
        // A leader of a newer term than the keys were gathered in (it may have won its election in this
        // very turn, before `process` ran): gather them from its unapplied tail first.
        if pendingKeysTerm != raft.term { rebuildPendingKeys() }
        if let e = requests.lookup(key) {
            return done(.success(KeyedResult(landed: e.landed, count: e.count, replayed: true)))
        }
        let inLog: (index: LogIndex, count: Int)? =
            pendingKeys[key] ?? requests.openRequest.flatMap { $0.key == key ? ($0.keyIndex, $0.count) : nil }
        if let first = inLog {
            // The first attempt is in the log and not applied, or applied but its request not closed yet
            // (a leader change can close it early, at the next term's first entry): look again after the
            // next applied entry, until the window has it or it turned out to write nothing.
            return again(after: first.index, failed: { done(.failure($0)) }) { $0.proposeKeyed(key, proposals, deadline: deadline, done: done) }
        }
        if let deadline, ContinuousClock.now >= deadline {
            return done(.failure(.unavailable("the request waited for an earlier attempt past its deadline; nothing was written")))
        }
        // After the key lookups: a retry of a written request gets its first answer, even if the state
        // would refuse it now.
        if let refusal = admission(proposals) { return done(.failure(refusal)) }
        stats.requests += 1
        stats.recordsProposed += UInt64(proposals.count)
        let stampedAll = stamped([Proposal(stream: .none, type: .requestKey, payload: RequestWindow.keyPayload(key, count: proposals.count))] + proposals)
        do {
            let all = withInline([Array(stampedAll.dropFirst())], prefix: [stampedAll[0]]).all
            guard let range = try raft.propose(all) else { return done(.success(KeyedResult(landed: [], count: 0, replayed: false))) }
            pendingKeys[key] = (range.lowerBound, proposals.count)
            let count = proposals.count
            // The request's own records; its inline records follow them, outside the key's window.
            awaitCommit((range.lowerBound + 1)...(range.lowerBound + LogIndex(count)), term: raft.term) { r in
                done(
                    r.map { applied in
                        KeyedResult(
                            landed: applied.map {
                                RequestWindow.Landed(index: $0.record.index, term: $0.record.term, stream: $0.record.stream, seq: $0.record.seq, outcome: $0.outcome)
                            }, count: count, replayed: false)
                    })
            }
        } catch {
            done(.failure(Self.map(error)))
        }
    }

    /// Runs `retry` once `index` (and at least one more entry than now) is applied, or `failed` if the
    /// replica stops first: a request that found an earlier attempt in the log looks again then.
    func again(after index: LogIndex, failed: @escaping (ReplicationError) -> Void, _ retry: @escaping (ShardReplica) -> Void) {
        whenApplied(max(index, raft.applied + 1)) { [weak self] r in
            switch r {
            case .failure(let e): failed(e)
            case .success:
                guard let self else { return failed(.stopped) }
                retry(self)
            }
        }
    }

    /// A new leader learns which request keys its log holds past the applied index (entries of earlier
    /// terms it will commit): a retry of one of them must wait for it, not write it again.
    func rebuildPendingKeys() {
        pendingKeys = [:]
        pendingRelays = [:]
        pendingKeysTerm = raft.term
        var from = raft.applied + 1
        let last = raft.lastIndex
        while from <= last {
            guard let batch = reader.entries(from: from, to: last + 1, maxBytes: 8 << 20), let end = batch.last?.index else {
                log("could not read the log's unapplied tail (\(from)...\(last)) for request keys; retries of those requests may be written twice")
                return
            }
            for r in batch {
                if r.type == .requestKey, let (key, count) = RequestWindow.parseKey(r.payload) { pendingKeys[key] = (r.index, count) }
                if r.type == .relayBatch, let h = RelayMarks.Header.decode(r.payload) {
                    pendingRelays[h.source.rawValue] = (h.last, r.index + LogIndex(h.sourceIndexes.count))
                }
            }
            from = end + 1
        }
    }
}

/// What a relay batch did at its destination (Docs/state.md, "Relays").
public enum RelayResult: Sendable, Equatable {
    /// Written; the source's mark is now the batch's last source index.
    case written(mark: LogIndex)
    /// Everything in the batch was applied before (a replay): nothing written.
    case alreadyApplied(mark: LogIndex)
    /// The batch starts at or below the mark but goes past it: the relay's position is stale. Nothing
    /// written; resume from `mark + 1`.
    case stale(mark: LogIndex)
}

extension ShardReplica {
    /// Proposes a relay batch from `header.source` as a destination shard's leader: written once, in
    /// source order. The batch is checked against the source's mark as applied and as it will be once the
    /// relay batches already in this leader's log are applied (they wait for that first).
    public func proposeRelayBatch(
        _ header: RelayMarks.Header, _ proposals: [Proposal], deadline: ContinuousClock.Instant? = nil,
        done: @escaping (Result<RelayResult, ReplicationError>) -> Void
    ) {
        guard header.sourceIndexes.count == proposals.count, proposals.count <= Limits.appendBatchCountMax else {
            return done(.failure(.invalid("a relay batch lists \(header.sourceIndexes.count) source indexes for \(proposals.count) records")))
        }
        if let bad = proposals.first(where: { !$0.type.isRelayWritable }) {
            return done(.failure(.invalid("record type \(bad.type.rawValue) is reserved for the system")))
        }
        guard raft.role == .leader else { return done(.failure(.notLeader(raft.leader))) }
        if pendingKeysTerm != raft.term { rebuildPendingKeys() }
        let source = header.source.rawValue
        let inLog: LogIndex? =
            pendingRelays[source]?.end ?? relayMarks.openBatch.flatMap { $0.source == header.source ? raft.applied + 1 : nil }
        if let end = inLog {
            // An earlier batch of this source is in the log and not applied: decide once it is.
            return again(after: end, failed: { done(.failure($0)) }) { $0.proposeRelayBatch(header, proposals, deadline: deadline, done: done) }
        }
        let mark = relayMarks.mark(of: header.source)
        if header.last <= mark { return done(.success(.alreadyApplied(mark: mark))) }
        if header.first <= mark { return done(.success(.stale(mark: mark))) }
        if let deadline, ContinuousClock.now >= deadline {
            return done(.failure(.unavailable("the relay batch waited past its deadline; nothing was written")))
        }
        let all = [Proposal(stream: .none, type: .relayBatch, payload: header.encode())] + proposals
        do {
            guard let range = try raft.propose(stamped(all)) else { return done(.success(.written(mark: mark))) }
            pendingRelays[source] = (header.last, range.upperBound)
            stats.requests += 1
            stats.recordsProposed += UInt64(proposals.count)
            awaitCommit(range, term: raft.term) { r in done(r.map { _ in .written(mark: header.last) }) }
        } catch {
            done(.failure(Self.map(error)))
        }
    }
}
