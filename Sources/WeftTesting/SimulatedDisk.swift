import SegmentStore

/// A deterministic pseudo-random generator (SplitMix64): same seed, same sequence, on every machine.
public struct SeededRNG: RandomNumberGenerator, Sendable {
    public private(set) var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// An in-memory disk that models what a crash does to a real one (LevelDB's fault-injection Env):
/// file data not yet synced, and directory changes (create, rename, remove) not yet synced, may be lost.
///
/// `crash(rng:)` keeps every file's synced contents plus a random prefix of what was written after the
/// last sync (a torn write), and puts back the directory as of its last sync. Faults can also be armed:
/// the n-th write fails after writing a prefix (a short write), or a sync fails.
public final class SimulatedDisk: Disk {
    final class Node {
        var data: [UInt8] = []
        /// Contents as of the last sync.
        var durable: [UInt8] = []
        /// Contents handed to the device by `writeBack` since, not yet flushed from its cache: the
        /// next sync of any file (or directory) makes them durable. Only inside the durable size: a
        /// write-back writes no metadata.
        var onDevice: [UInt8]?
        /// Ranges whose write-back failed: the kernel marked those pages clean without writing them, so
        /// no later sync writes them either (the durable bytes stay).
        var lostWriteBacks: [Range<Int>] = []
    }

    /// path -> file, as the running process sees it.
    var files: [String: Node] = [:]
    /// path -> file, as it would be found after a crash (updated by syncDirectory).
    var durableNames: [String: Node] = [:]
    var directories: Set<String> = []

    /// Fails the write whose number (counting from 1 across all files) equals this, after writing
    /// `shortWritePrefix` bytes of it.
    public var failWriteNumber: Int?
    public var shortWritePrefix = 0
    /// Fails every sync while set.
    public var failSyncs = false
    /// Reads of files whose path starts with this fail with EIO while set (a disk that cannot read a
    /// sector: an I/O error, not damage the checksums would find).
    public var failReadsUnder: String?
    /// Fails the sync (of a file or a directory) whose number, counting from 1 like `syncs`, equals this.
    public var failSyncNumber: Int?
    public private(set) var writes = 0
    public private(set) var syncs = 0
    /// A crash tears unsynced writes at 512-byte sector boundaries only (a write inside one sector, such
    /// as the store's 36-byte tail fence, survives whole or not at all), as real disks do; false (the
    /// default, harsher): at any byte.
    public var atomicSectorWrites = false
    /// `writeBack` calls (the waiting half of a shared flush).
    public private(set) var writeBacks = 0
    /// Fails every `startWriteBack` and `writeBack` while set.
    public var failWriteBacks = false

    public init() {}

    public func open(_ path: String, create: Bool) throws -> any DiskFile {
        if let n = files[path] { return SimulatedFile(disk: self, node: n, path: path) }
        guard create else { throw DiskError(path: path, operation: "open", code: 2) }
        let n = Node()
        files[path] = n
        return SimulatedFile(disk: self, node: n, path: path)
    }

    public func list(_ directory: String) throws -> [String] {
        guard directories.contains(directory) else { throw DiskError(path: directory, operation: "opendir", code: 2) }
        let prefix = directory + "/"
        return files.keys.filter { $0.hasPrefix(prefix) && !$0.dropFirst(prefix.count).contains("/") }
            .map { String($0.dropFirst(prefix.count)) }
    }

    public func remove(_ path: String) throws {
        guard files.removeValue(forKey: path) != nil else { throw DiskError(path: path, operation: "unlink", code: 2) }
    }

    public func rename(_ from: String, to: String) throws {
        guard let n = files.removeValue(forKey: from) else { throw DiskError(path: from, operation: "rename", code: 2) }
        files[to] = n
    }

    public func syncDirectory(_ directory: String) throws {
        syncs += 1
        if failSyncs || syncs == failSyncNumber { throw DiskError(path: directory, operation: "fsync directory", code: 5) }
        flushDevice()
        let prefix = directory + "/"
        durableNames = durableNames.filter { !$0.key.hasPrefix(prefix) }
        for (k, v) in files where k.hasPrefix(prefix) { durableNames[k] = v }
    }

    public func makeDirectory(_ path: String) throws { directories.insert(path) }
    public func removeDirectory(_ path: String) throws {
        let prefix = path + "/"
        guard !files.keys.contains(where: { $0.hasPrefix(prefix) }) else { throw DiskError(path: path, operation: "rmdir", code: 39) }
        guard directories.remove(path) != nil else { throw DiskError(path: path, operation: "rmdir", code: 2) }
    }
    public func exists(_ path: String) -> Bool { files[path] != nil }

    /// Simulates power loss: unsynced data and directory changes are lost, the last unsynced write of
    /// each file may survive in part.
    public func crash(rng: inout SeededRNG) {
        var after: [String: Node] = [:]
        for (path, node) in durableNames {
            let fresh = Node()
            var kept = node.durable
            // Unsynced writes may partly survive: from the first byte that differs from the durable
            // contents, a random number of the new bytes reached the disk (a torn append, or a torn
            // overwrite of bytes written and synced before, as of zeros written ahead); the rest is as
            // it was. An unsynced truncation is lost.
            let data = node.data
            var first = 0
            while first < min(data.count, kept.count) && data[first] == kept[first] { first += 1 }
            if first < data.count {
                let extra = Int(rng.next() % UInt64(data.count - first + 1))
                var end = first + extra
                if atomicSectorWrites && end < data.count { end = max(first, end / 512 * 512) }
                if end > kept.count { kept += [UInt8](repeating: 0, count: end - kept.count) }
                kept.replaceSubrange(first..<end, with: data[first..<end])
            }
            fresh.data = kept
            fresh.durable = kept
            after[path] = fresh
        }
        files = after
        durableNames = after
        failWriteNumber = nil
        failSyncs = false
        failSyncNumber = nil
    }

    /// Bytes of a file (tests corrupt and inspect them).
    public func contents(_ path: String) -> [UInt8]? { files[path]?.data }

    /// Replaces a file's bytes as if they had always been on disk.
    public func setContents(_ path: String, _ bytes: [UInt8]) {
        let n = files[path] ?? Node()
        n.data = bytes
        n.durable = bytes
        files[path] = n
        durableNames[path] = n
    }

    fileprivate func write(_ node: Node, _ bytes: [UInt8], at offset: UInt64, path: String) throws {
        writes += 1
        var bytes = bytes
        var failing = false
        if writes == failWriteNumber {
            bytes = Array(bytes.prefix(shortWritePrefix))
            failing = true
        }
        let end = Int(offset) + bytes.count
        if node.data.count < Int(offset) { node.data += [UInt8](repeating: 0, count: Int(offset) - node.data.count) }
        if node.data.count < end { node.data += [UInt8](repeating: 0, count: end - node.data.count) }
        node.data.replaceSubrange(Int(offset)..<end, with: bytes)
        if failing { throw DiskError(path: path, operation: "pwrite (simulated short write)", code: 5) }
    }

    fileprivate func sync(_ node: Node, path: String) throws {
        syncs += 1
        if failSyncs || syncs == failSyncNumber { throw DiskError(path: path, operation: "fdatasync", code: 5) }
        flushDevice()
        var bytes = node.data
        for r in node.lostWriteBacks {
            for i in r where i < bytes.count { bytes[i] = i < node.durable.count ? node.durable[i] : 0 }
        }
        node.lostWriteBacks = []
        node.durable = bytes
    }

    /// A device cache flush: what every file handed over with `writeBack` becomes durable.
    func flushDevice() {
        for node in Array(files.values) + Array(durableNames.values) {
            if let d = node.onDevice {
                node.durable = d
                node.onDevice = nil
            }
        }
    }

    /// The public knob for `flushDomain`: nil models a filesystem where flushes cannot be shared.
    public var sharedFlushDevice: UInt64? = 1

    public func flushDomain(_ directory: String) -> UInt64? { sharedFlushDevice }

    fileprivate func writeBack(_ node: Node, offset: UInt64, count: UInt64, path: String) throws {
        writeBacks += 1
        let (sum, overflow) = offset.addingReportingOverflow(count)
        let rangeEnd = min(UInt64(node.data.count), overflow ? .max : sum)
        if failWriteBacks {
            if offset < rangeEnd { node.lostWriteBacks.append(Int(offset)..<Int(rangeEnd)) }
            throw DiskError(path: path, operation: "sync_file_range (simulated I/O error)", code: 5)
        }
        // The device gets the range's current bytes over the durable ones, only up to the durable size
        // (an extension of the file is metadata, which a write-back does not write).
        var bytes = node.onDevice ?? node.durable
        let end = min(UInt64(bytes.count), rangeEnd)
        if offset < end { bytes.replaceSubrange(Int(offset)..<Int(end), with: node.data[Int(offset)..<Int(end)]) }
        node.onDevice = bytes
    }
}

final class SimulatedFile: DiskFile {
    let disk: SimulatedDisk
    let node: SimulatedDisk.Node
    let path: String

    init(disk: SimulatedDisk, node: SimulatedDisk.Node, path: String) {
        self.disk = disk
        self.node = node
        self.path = path
    }

    func size() throws -> UInt64 { UInt64(node.data.count) }
    func write(_ bytes: [UInt8], at offset: UInt64) throws { try disk.write(node, bytes, at: offset, path: path) }
    func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        if let prefix = disk.failReadsUnder, path.hasPrefix(prefix) {
            throw DiskError(path: path, operation: "pread (simulated I/O error)", code: 5)
        }
        guard offset < UInt64(node.data.count), count > 0 else { return [] }
        let start = Int(offset)
        return Array(node.data[start..<min(node.data.count, start + count)])
    }
    func sync() throws { try disk.sync(node, path: path) }
    /// Starting a write-back promises nothing (the device may or may not have the pages yet): no-op.
    func startWriteBack(offset: UInt64, count: UInt64) throws {
        if disk.failWriteBacks { throw DiskError(path: path, operation: "sync_file_range (simulated I/O error)", code: 5) }
    }
    func writeBack(offset: UInt64, count: UInt64) throws { try disk.writeBack(node, offset: offset, count: count, path: path) }
    func truncate(to size: UInt64) throws {
        if node.data.count > Int(size) { node.data.removeSubrange(Int(size)...) } else {
            node.data += [UInt8](repeating: 0, count: Int(size) - node.data.count)
        }
    }
    func close() {}
}
