import Foundation
import Raft
import SegmentStore
import WeftCore

/// Catch-up from files (Docs/replication.md, "Catch-up"): a follower that shares nothing with the
/// leader's log, or needs entries the leader's log no longer has, gets the leader's sealed segment and
/// index files instead of appends.
///
/// ```
/// leader (shard thread)          CatchUpShipper (own thread)            follower (shard thread)
/// Raft: snapshot(to, index, T) ─▶ chunks of transfer T, window-bound ──▶ stage(T, name, offset, bytes)
///                                 ◀───────────────── ack(T, name, received) ─┘
/// reportCatchUp(progress) ◀──────  every ack restarts the leader's timeout
///                                  all acknowledged: the snapshot message ─▶ Raft: install request
///                                                                            install(T) if this node
///                                                                            follows the sender in its
///                                                                            term; answer index/term
/// ```
///
/// Rules: a transfer id is `leader term << 32 | sequence`; the follower stages one transfer at a time in
/// `catchup/` (a newer id empties it first; an older id, or one from a term below the follower's, is
/// ignored), empties it at open, and installs only the transfer the snapshot message names, only when
/// Raft asks (the sender is the leader of the follower's current term), only if the staged files are
/// intact, reach the message's index and hold the message's term there. The answer names that index and
/// term, and the leader raises the follower's match only if its own log has that term there.
extension ShardReplica {
    var stagingDirectory: String { store.directory + "/catchup" }
    /// The staging directory's record of which transfer its files belong to.
    var stagingTransferPath: String { stagingDirectory + "/transfer" }

    /// File names a catch-up may carry: segment and index files, the stream high-water file and a
    /// snapshot file, no paths.
    static func isShippable(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 255 && name != "transfer" && name != ".." && name != "."
            && (SegmentStore.isCatchUpFile(name) || SnapshotFiles.index(ofName: name) != nil)
    }

    /// Leader: hands the sealed files and the `snapshot` message to the shipper.
    /// With nothing sealed, the file list is empty and the message goes alone: the follower answers
    /// from its own log (log matching) or rejects, and the leader probes.
    ///
    /// When retention dropped the log's start, the follower cannot rebuild its state from the files: a
    /// snapshot goes with them, at or after the entry before the first file, and the files must reach it
    /// (the active segment is sealed first when the snapshot is newer than every sealed one). The
    /// message then names the end of the files, which the follower installs up to.
    func beginCatchUp(_ m: Message) {
        guard store.firstIndex > 1 else { return startCatchUp(m.to, m.context, store.sealedFiles(), m) }
        var m = m
        let from = store.firstIndex - 1
        let all = ((try? snapshots.indexes()) ?? []).filter { $0 >= from && $0 <= raft.applied }
        // Prefer one inside the sealed files; ship only one that reads back whole (a damaged one would be
        // refused by the follower on every attempt).
        var snap: LogIndex?
        for i in all.filter({ $0 <= store.sealedLastIndex }) + all.filter({ $0 > store.sealedLastIndex }) {
            // Pinned first, so a snapshot written meanwhile cannot remove it between the check and the pin.
            snapshots.pin(i)
            do {
                try snapshots.verify(i)
                snap = i
                break
            } catch {
                snapshots.unpin(i)
                record("catch-up of node \(m.to): snapshot at \(i) not shipped: \(error)")
            }
        }
        guard let snap else {
            record("catch-up of node \(m.to): no snapshot reaches back to index \(from), where this log now starts; trying again later")
            return raft.reportCatchUp(to: m.to, transfer: m.context, failed: true)
        }
        if snap > store.sealedLastIndex {
            do {
                try store.sealActive()
            } catch {
                record("catch-up of node \(m.to): could not seal the active segment: \(error)")
                return raft.reportCatchUp(to: m.to, transfer: m.context, failed: true)
            }
        }
        m.index = store.sealedLastIndex
        m.logTerm = (try? store.term(at: m.index)) ?? 0
        let name = SnapshotFiles.name(snap)
        // The snapshot stays pinned until the transfer ends (newer snapshots would otherwise remove it),
        // and goes first; retention drops no segment on this replica while a transfer is under way.
        outgoingSnapshots[m.context] = snap
        startCatchUp(m.to, m.context, [(name, snapshots.directory + "/" + name)] + store.sealedFiles(), m)
    }

    /// Unpins the snapshots of transfers that ended (answered, failed, given up, or leadership lost).
    func releaseEndedTransfers() {
        guard !outgoingSnapshots.isEmpty else { return }
        let live = raft.catchUpTransfers
        for (t, snap) in outgoingSnapshots where !live.contains(t) {
            snapshots.unpin(snap)
            outgoingSnapshots[t] = nil
        }
    }

    /// Leader: the shipper's news about a transfer to `to`.
    public func reportCatchUp(to: NodeID, transfer: UInt64, failed: Bool) {
        raft.reportCatchUp(to: to, transfer: transfer, failed: failed)
    }

    /// Follower: writes part of a file of catch-up `transfer` into the staging directory. Returns false
    /// (and writes nothing) for a transfer older than the one being staged or from a term below this
    /// replica's; a newer transfer first empties the directory, so leftovers are never installed.
    public func stage(transfer: UInt64, name: String, offset: UInt64, bytes: [UInt8]) throws -> Bool {
        guard Self.isShippable(name) else { throw StoreError.invalidBatch("catch-up file name \"\(name.prefix(64))\" refused") }
        guard transfer >> 32 >= raft.term else { return false }
        if let current = currentTransfer, transfer < current { return false }
        let disk = store.fileSystem
        let path = stagingDirectory + "/" + name
        if currentTransfer != transfer {
            try clearStaging()
            try disk.makeDirectory(stagingDirectory)
            let f = try disk.open(stagingTransferPath, create: true)
            defer { f.close() }
            try f.truncate(to: 0)
            try f.write(Array(String(transfer).utf8), at: 0)
            currentTransfer = transfer
        }
        // Chunks arrive in order on one connection; one that does not continue its file (this replica
        // restarted mid-transfer, or a chunk was lost) fails the transfer rather than leave a hole.
        let have = stagedBytes[name] ?? 0
        guard offset == have else {
            throw StoreError.invalidBatch("catch-up \(transfer): \(name) continues at \(have), got a chunk at \(offset)")
        }
        let f = try disk.open(path, create: true)
        defer { f.close() }
        if offset == 0 { try f.truncate(to: 0) }
        try f.write(bytes, at: offset)
        stagedBytes[name] = offset + UInt64(bytes.count)
        return true
    }

    /// Empties the staging directory, including a `quarantine/` directory that opening a damaged staged
    /// log creates (left behind, it would make every later clear, and the next open, fail).
    func clearStaging() throws {
        let disk = store.fileSystem
        currentTransfer = nil
        stagedBytes = [:]
        for n in (try? disk.list(stagingDirectory)) ?? [] {
            let path = stagingDirectory + "/" + n
            if let inner = try? disk.list(path) {
                for m in inner { try disk.remove(path + "/" + m) }
                try disk.removeDirectory(path)
            } else {
                try disk.remove(path)
            }
        }
    }

    /// Follower: Raft asks to install `request`. Answers Raft (`installDone`) either way; throws only
    /// when this replica's own storage failed while replacing its log.
    func install(_ request: InstallRequest) throws {
        do {
            try installStaged(request)
        } catch let e as ReplaceFailure {
            throw e.underlying
        } catch {
            log("catch-up \(request.transfer) to \(request.index) not installed: \(error)")
            try? clearStaging()
            raft.installDone(request, ok: false)
            return
        }
        try clearStaging()
        raft.installDone(request, ok: true)
    }

    /// An error while this replica's own log was being replaced (not a problem with the shipped files).
    struct ReplaceFailure: Error {
        var underlying: any Error
    }

    /// Replaces this replica's log with the staged files of `request.transfer`, which must hold the
    /// leader's log up to `request.index` with term `request.logTerm` there: opened as a store of their
    /// own first (full recovery, every block checked), synced, then renamed into place; term, vote and
    /// group are kept. Raft asks only when this log ends below `request.index` or differs there (so the
    /// entries it holds past its commit index are not committed), and the leader's copy replaces them.
    func installStaged(_ request: InstallRequest) throws {
        let disk = store.fileSystem
        guard currentTransfer == request.transfer, disk.exists(stagingTransferPath) else {
            throw StoreError.invalidBatch("no files of transfer \(request.transfer) are staged")
        }
        // Raft asks while this log ends below the index, or differs from the leader's there (then every
        // entry from the difference on is above the commit index: not committed, replaceable). Never
        // replace a log that already holds the leader's entry there, nor committed entries.
        if store.lastIndex >= request.index, (try? store.term(at: request.index)) == request.logTerm {
            throw StoreError.invalidBatch("the log already holds entry \(request.index) of term \(request.logTerm)")
        }
        guard request.index > raft.commit else {
            throw StoreError.invalidBatch("the catch-up ends at \(request.index), at or below this replica's commit index \(raft.commit)")
        }
        let staged = try SegmentStore(directory: stagingDirectory, options: store.options, disk: disk)
        // Every block of the shipped files is checked before they replace anything.
        while !staged.scrub(maxBytes: 64 << 20) {}
        let stagedLast = staged.lastIndex
        let stagedFirst = staged.firstIndex
        let stagedDamage = staged.damagedFrom
        let stagedTerm = try? staged.term(at: request.index)
        // A shipped snapshot (the leader's log no longer starts at 1): checked whole, inside the files or
        // right before them, of the files' term at its index, and readable by the state machine.
        let snapshotNames = try disk.list(stagingDirectory).filter { SnapshotFiles.index(ofName: $0) != nil }.sorted()
        var shipped: StateSnapshot?
        if let name = snapshotNames.last {
            let s: StateSnapshot
            do {
                s = try SnapshotFiles.read(stagingDirectory + "/" + name, index: SnapshotFiles.index(ofName: name) ?? 0, disk: disk)
            } catch {
                staged.close()
                throw StoreError.invalidBatch("shipped snapshot: \(error)")
            }
            let termThere = s.index >= stagedFirst ? try? staged.term(at: s.index) : s.term
            guard s.index <= request.index, s.index + 1 >= stagedFirst, termThere == s.term else {
                staged.close()
                throw StoreError.invalidBatch("shipped snapshot at \(s.index) (term \(s.term)) does not fit files \(stagedFirst)...\(request.index)")
            }
            do {
                _ = try machineType.init(snapshot: s.state)
            } catch {
                staged.close()
                throw StoreError.invalidBatch("shipped snapshot at \(s.index): the state machine cannot read it: \(error)")
            }
            shipped = s
        }
        if stagedFirst > 1 && shipped == nil {
            staged.close()
            throw StoreError.invalidBatch("shipped files start at \(stagedFirst) and no snapshot came with them")
        }
        if stagedDamage == nil, stagedLast > request.index, stagedTerm == request.logTerm {
            // Files read after the sender's log changed (it stepped down and a segment was cut and
            // rewritten) may hold more than the message vouches for: keep exactly the prefix it names.
            try staged.truncateSuffix(from: request.index + 1)
        }
        let keptLast = staged.lastIndex
        staged.close()
        if let d = stagedDamage { throw StoreError.invalidBatch("shipped files are damaged from index \(d)") }
        guard stagedLast >= request.index, keptLast == request.index else {
            throw StoreError.invalidBatch("staged files end at \(stagedLast), not at \(request.index)")
        }
        guard stagedTerm == request.logTerm else {
            throw StoreError.invalidBatch("staged entry \(request.index) has term \(stagedTerm.map(String.init) ?? "?"), the leader said \(request.logTerm)")
        }
        let names = try disk.list(stagingDirectory).filter { SegmentStore.isCatchUpFile($0) }
        for n in names {
            let f = try disk.open(stagingDirectory + "/" + n, create: false)
            try f.sync()
            f.close()
        }
        let dir = store.directory
        let options = store.options
        // A snapshot still being written from the old state finishes first (its files are not shared).
        if !snapshotJob.waitIdle(until: Date(timeIntervalSinceNow: 10)) { log("a snapshot was still being written at catch-up install") }
        _ = snapshotJob.take()
        // The shipped snapshot goes in first: it is the state at a committed index, valid with the old log
        // as with the new one, so a crash at any point from here leaves a log and a snapshot that reaches
        // it (the old log with its old snapshots, or the new log with this one). The older ones are
        // removed only once the new log is in place.
        if let s = shipped, let name = snapshotNames.last {
            do {
                try snapshots.adopt(stagingDirectory + "/" + name, index: s.index)
            } catch {
                throw ReplaceFailure(underlying: error)
            }
        }
        do {
            failAll(.outcomeUnknown("replica \(id) of shard \(shard) replaced its log with the leader's files"))
            store.close()
            try SegmentStore.removeLog(in: dir, disk: disk)
            for n in names { try disk.rename(stagingDirectory + "/" + n, to: dir + "/" + n) }
            try disk.syncDirectory(dir)
            store = try SegmentStore(directory: dir, options: options, disk: disk, log: log)
            // The shipped log is verified and in place: its fence describes it.
            try store.acceptFindings()
            if let s = shipped { try snapshots.prune(olderThan: s.index) }
        } catch {
            throw ReplaceFailure(underlying: error)
        }
        reader = StoreLogReader(store)
        raft = Raft(
            config: raftConfig, log: reader, hardState: hardState.state, membership: raft.membership, applied: 0,
            membershipIndex: raft.membershipIndex, recovering: raft.recovering)
        // Applied starts again from 0 over the new log: so does the state, from the newest snapshot that
        // matches the new log (log matching: same index and term, same history), else from empty.
        resetState()
        lastSnapshotIndex = 0
        do {
            try restoreFromSnapshot(context: "after catch-up \(request.transfer)")
        } catch {
            // The log is already replaced: this replica cannot go back to its old state.
            throw ReplaceFailure(underlying: error)
        }
        stats.catchUpsInstalled += 1
        if shipped != nil { stats.snapshotsInstalled += 1 }
        log("caught up from the leader's files (transfer \(request.transfer)\(shipped.map { ", snapshot at \($0.index)" } ?? "")): log now ends at \(store.lastIndex)")
    }
}
