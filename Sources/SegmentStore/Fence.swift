import SegmentFormat
import WeftCore

/// Where the log began and ended the last time this store changed it, kept beside the segments in
/// `tail.fence` (Docs/faults.md). It lets a reopened store tell a log that simply ends here from one that
/// lost records: a segment truncated (even exactly at a block boundary), a whole segment deleted.
///
/// After an append it is rewritten in place with one pwrite into the page cache, no fsync (the data was
/// synced first, so after a power loss the fence can only be behind it). Before a truncation or a
/// retention run shortens the log, the fence for the shorter log is written *and synced* first, so it is
/// never ahead of the log either. At open it is synced when the log checks out against it, and left alone
/// when it does not (the loss stays detectable until the owner calls `acceptFindings`).
///
/// ```
/// "WEFTFNC\0" | u64 firstIndex | u64 lastIndex | u64 lastTerm | u32 crc32c of the 32 bytes before
/// ```
struct Fence: Equatable {
    static let magic: [UInt8] = Array("WEFTFNC\0".utf8)
    static let bytes = 36
    var firstIndex: LogIndex
    var lastIndex: LogIndex
    var lastTerm: Term

    func encode() -> [UInt8] {
        var b = Fence.magic
        b.appendLE(firstIndex)
        b.appendLE(lastIndex)
        b.appendLE(lastTerm)
        b.appendLE(CRC32C.checksum(b))
        return b
    }

    static func decode(_ b: [UInt8]) -> Fence? {
        guard b.count == bytes, Array(b[0..<8]) == magic, b.loadLE(UInt32.self, at: 32) == CRC32C.checksum(b[0..<32]) else { return nil }
        return Fence(firstIndex: b.loadLE(at: 8), lastIndex: b.loadLE(at: 16), lastTerm: b.loadLE(at: 24))
    }
}

/// What opening the store found missing or damaged, for the replica to repair and report.
public struct OpenFindings: Sendable, Equatable {
    /// Lowest index that is lost or unreadable (nil: the log is intact as far as the checks can tell).
    public var damagedFrom: LogIndex?
    /// The fence was missing or damaged while the log was not empty: whether records were lost at the
    /// tail cannot be told.
    public var tailUnverified = false
    /// The log begins after index 1 (retention dropped segments, or it was installed from such a log) but
    /// the last seqs of the streams in the dropped records (`streams.hwm`) are missing, damaged, or marked
    /// incomplete: `lastSeq(of:)` of a stream whose records were all dropped answers from what is left
    /// (possibly 0), so a leader numbering it could reuse seqs. The records in the log are intact.
    public var highWaterUnknown = false
    /// One line per finding.
    public var notes: [String] = []
}

extension SegmentStore {
    var fencePath: String { path(FileNames.fence) }

    /// Moves a closed log's files (segments, indexes, `streams.hwm`, the fence) into `directory/name/`,
    /// kept for an operator: the replica cannot use them (Replication: no snapshot reaches their start).
    /// Refuses a directory that already holds files (never overwrites an earlier set-aside copy). All or
    /// nothing across a crash: an intent naming the directory is synced first, and opening the store
    /// finishes a move it finds (so no half-moved log is ever repaired, and so deleted, in place).
    public static func setAside(in directory: String, into name: String, disk: any Disk) throws {
        let aside = directory + "/" + name
        if let existing = try? disk.list(aside), !existing.isEmpty {
            throw StoreError.invalidBatch("\(aside) already holds files; not moving the log over them")
        }
        try disk.makeDirectory(aside)
        let intent = directory + "/" + FileNames.asideIntent
        let f = try disk.open(intent, create: true)
        try f.truncate(to: 0)
        try f.write(Array(name.utf8), at: 0)
        try f.sync()
        f.close()
        try disk.syncDirectory(directory)
        try finishSetAside(in: directory, disk: disk)
    }

    /// Moves the log files into the directory the set-aside intent names, then removes the intent.
    static func finishSetAside(in directory: String, disk: any Disk) throws {
        let intent = directory + "/" + FileNames.asideIntent
        let f = try disk.open(intent, create: false)
        let size = try f.size()
        let bytes = try f.read(at: 0, count: Int(min(size, 255)))
        f.close()
        let name = String(decoding: bytes, as: UTF8.self)
        guard !name.isEmpty, !name.contains("/"), name != ".", name != ".." else {
            throw StoreError.corrupt(FormatError(.mismatch, file: intent, offset: 0, "names no directory to move the log into"))
        }
        let aside = directory + "/" + name
        try disk.makeDirectory(aside)
        let names = try disk.list(directory).filter { isLogData($0) || $0 == FileNames.highWater || $0 == FileNames.fence }
        for n in names { try disk.rename(directory + "/" + n, to: aside + "/" + n) }
        try disk.syncDirectory(aside)
        try disk.remove(intent)
        try disk.syncDirectory(directory)
    }

    /// Deletes a closed store's log files in `directory` (segments, indexes, a truncate intent, the
    /// stream high-water marks, the fence), the fence last: a crash half way leaves it to report the
    /// records that are gone (and a log that begins after index 1 without its marks is reported too).
    public static func removeLog(in directory: String, disk: any Disk) throws {
        let names = try disk.list(directory).filter(isLogData)
        for n in names { try disk.remove(directory + "/" + n) }
        for n in [FileNames.highWater + ".tmp", FileNames.highWater] where disk.exists(directory + "/" + n) {
            try disk.remove(directory + "/" + n)
        }
        if disk.exists(directory + "/" + FileNames.fence) { try disk.remove(directory + "/" + FileNames.fence) }
        try disk.syncDirectory(directory)
    }

    /// A segment, an index or a truncate intent (the files a log's records live in).
    static func isLogData(_ name: String) -> Bool {
        FileNames.segmentBase(name) != nil || name.hasSuffix(".idx") || name == FileNames.intent
    }

    func readFence() -> Fence? {
        guard disk.exists(fencePath), let f = try? disk.open(fencePath, create: false) else { return nil }
        defer { f.close() }
        guard let b = try? f.read(at: 0, count: Fence.bytes) else { return nil }
        return Fence.decode(b)
    }

    /// Writes the fence for the log as it is now. With `sync`, also fdatasyncs it.
    func writeFence(sync: Bool = false) throws {
        try writeFence(Fence(firstIndex: firstIndex, lastIndex: lastIndex, lastTerm: lastTerm), sync: sync)
    }

    func writeFence(_ fence: Fence, sync: Bool) throws {
        if fenceFile == nil {
            fenceFile = try disk.open(fencePath, create: true)
        }
        guard let f = fenceFile else { return }
        try f.write(fence.encode(), at: 0)
        if sync { try f.sync() }
    }

    /// After open found records lost or could not tell (`findings`), the fence is left as it was, so a
    /// restart before the loss is recorded elsewhere finds it again. The owner calls this once it has
    /// recorded the loss durably (the replica's `recovering` marker): the fence then describes the log
    /// as it is.
    public func acceptFindings() throws {
        try finishDeferredSync()
        try guardDisk { try writeFence(sync: true) }
    }

    /// Records that the record at `index` (and so the log from there) is lost or unreadable.
    func noteDamage(at index: LogIndex) {
        if damagedFrom.map({ index < $0 }) ?? true { damagedFrom = index }
    }

    /// Verifies the next sealed blocks after the scrub cursor, reading about `maxBytes`: each block's
    /// checksum is checked and its records decoded, as a read would. Damage found is recorded in
    /// `damagedFrom` and `damage`. Returns true when the cursor wrapped around (a full pass is done).
    @discardableResult
    public func scrub(maxBytes: Int) -> Bool {
        var budget = maxBytes
        // The segment at or after the cursor, by binary search on base indexes (sealed ones come first).
        var k = lowerBound(segments.count) { segments[$0].base < scrubCursor.base }
        while budget > 0 {
            guard k < segments.count, segments[k].sealed != nil else {
                scrubCursor = (0, 0)
                return true
            }
            let seg = segments[k]
            if seg.base != scrubCursor.base { scrubCursor = (seg.base, 0) }
            let blocks = seg.blocks
            guard scrubCursor.block < blocks.count else {
                k += 1
                scrubCursor = (seg.base + 1, 0)
                continue
            }
            let e = blocks[scrubCursor.block]
            budget -= Layout.blockHeaderBytes + Int(e.storedBytes)
            scrubCursor.block += 1
            if damagedFrom.map({ e.firstIndex >= $0 }) ?? false { continue }
            // A failed read records the damage (`damagedFrom`, `damage`); nothing more to do here.
            _ = try? readBlock(seg, scrubCursor.block - 1)
        }
        return false
    }
}
