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

    /// File names a catch-up may carry: segment and index files and the stream high-water file, no paths.
    static func isShippable(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 255 && name != "transfer" && name != ".." && name != "."
            && SegmentStore.isCatchUpFile(name)
    }

    /// Leader: hands the sealed files and the `snapshot` message to the shipper.
    /// With nothing sealed, the file list is empty and the message goes alone: the follower answers
    /// from its own log (log matching) or rejects, and the leader probes.
    func beginCatchUp(_ m: Message) {
        startCatchUp(m.to, m.context, store.sealedFiles(), m)
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
    /// group are kept. Raft asks only when this log ends below `request.index`, so the leader's copy of
    /// every entry this replica holds replaces it.
    func installStaged(_ request: InstallRequest) throws {
        let disk = store.fileSystem
        guard currentTransfer == request.transfer, disk.exists(stagingTransferPath) else {
            throw StoreError.invalidBatch("no files of transfer \(request.transfer) are staged")
        }
        // Raft asks only while this log ends below the index; never replace entries past it.
        guard store.lastIndex < request.index else {
            throw StoreError.invalidBatch("the log already reaches \(store.lastIndex), the catch-up ends at \(request.index)")
        }
        let staged = try SegmentStore(directory: stagingDirectory, options: store.options, disk: disk)
        // Every block of the shipped files is checked before they replace anything.
        while !staged.scrub(maxBytes: 64 << 20) {}
        let stagedLast = staged.lastIndex
        let stagedDamage = staged.damagedFrom
        let stagedTerm = try? staged.term(at: request.index)
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
        do {
            failAll(.outcomeUnknown("replica \(id) of shard \(shard) replaced its log with the leader's files"))
            store.close()
            try SegmentStore.removeLog(in: dir, disk: disk)
            for n in names { try disk.rename(stagingDirectory + "/" + n, to: dir + "/" + n) }
            try disk.syncDirectory(dir)
            store = try SegmentStore(directory: dir, options: options, disk: disk, log: log)
            // The shipped log is verified and in place: its fence describes it.
            try store.acceptFindings()
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
        // A snapshot still being written from the old state finishes first (its files are not shared).
        if !snapshotJob.waitIdle(until: Date(timeIntervalSinceNow: 10)) { log("a snapshot was still being written at catch-up install") }
        do {
            try restoreFromSnapshot(context: "after catch-up \(request.transfer)")
        } catch {
            // The log is already replaced: this replica cannot go back to its old state.
            throw ReplaceFailure(underlying: error)
        }
        log("caught up from the leader's files (transfer \(request.transfer)): log now ends at \(store.lastIndex)")
    }
}
