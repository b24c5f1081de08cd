import SegmentFormat
import WeftCore

/// Reads a shard's committed records straight from its segment files, for a reader on its own thread
/// (a tail subscriber that fell out of the in-memory window): it never touches the `SegmentStore`, which
/// belongs to the shard's thread.
///
/// Why this is safe without the store's lock: the caller asks only for records up to an index the
/// replica has applied, and those bytes are written before they are applied and never rewritten in
/// place (sealed segments are immutable; the active one is only appended to, and only entries past the
/// commit index are ever truncated). Every block is checked (CRC32C) before its records are returned,
/// so a block a repair is cutting at that moment fails its checks and is reported, never served.
///
/// Sequential: the reader keeps its position (segment, block offset) and continues from it; a new
/// position is found through the sealed segment's `.idx` file, or by walking the active segment's
/// blocks once.
public final class LogFileReader {
    public let directory: String
    let disk: any Disk
    /// The next index `read` returns.
    public private(set) var next: LogIndex
    /// Open segment and the offset of the block holding `next` (nil: not positioned).
    var segment: (base: LogIndex, file: any DiskFile, offset: UInt64)?

    public init(directory: String, disk: any Disk, from: LogIndex) {
        self.directory = directory
        self.disk = disk
        next = max(1, from)
    }

    deinit { segment?.file.close() }

    public struct Failure: Error, CustomStringConvertible {
        public var description: String
        /// Set when `next` is before the log's first segment: the first index the files hold (a catch-up
        /// replaced the log with one that starts past a snapshot, or retention dropped it).
        public var firstIndex: LogIndex?
    }

    /// Up to `limit` records from `next`, none past `upTo` (an applied index). Fewer only when `upTo`
    /// is reached. Throws when the files do not hold what they must (damage, a missing segment).
    public func read(upTo: LogIndex, limit: Int) throws -> [Record] {
        var out: [Record] = []
        while out.count < limit, next <= upTo {
            if segment == nil { try position() }
            guard let seg = segment else { throw Failure(description: "\(directory): no segment holds index \(next)") }
            let source = try FileByteSource(seg.file)
            let scanner = try SegmentScanner(source)
            let block: ScannedBlock
            do {
                block = try scanner.readBlock(at: seg.offset)
            } catch let e as FormatError {
                // The end of this segment's data: the next segment starts at `next`.
                if try scanner.isZero(from: seg.offset) || seg.offset >= source.size {
                    let name = FileNames.segment(next)
                    guard disk.exists(directory + "/" + name) else {
                        throw Failure(description: "\(directory)/\(name): index \(next) is applied but no file holds it (segment ends at byte \(seg.offset))")
                    }
                    seg.file.close()
                    segment = (next, try disk.open(directory + "/" + name, create: false), UInt64(Layout.segmentHeaderBytes))
                    continue
                }
                throw Failure(description: "\(e)")
            }
            let records = try block.records(file: seg.file.path)
            for r in records where r.index >= next && r.index <= upTo && out.count < limit {
                out.append(r)
            }
            if let last = out.last { next = last.index + 1 }
            if block.header.lastIndex < next {
                segment = (seg.base, seg.file, seg.offset + UInt64(block.bytes.count))
            }
        }
        return out
    }

    /// Opens the segment holding `next` and finds the block with it.
    func position() throws {
        let bases = try disk.list(directory).compactMap(FileNames.segmentBase).sorted()
        guard let base = bases.last(where: { $0 <= next }) else {
            throw Failure(description: "\(directory): index \(next) is before the log's first segment", firstIndex: bases.first)
        }
        let file = try disk.open(directory + "/" + FileNames.segment(base), create: false)
        var offset = UInt64(Layout.segmentHeaderBytes)
        let idxPath = directory + "/" + FileNames.index(base)
        if disk.exists(idxPath), let f = try? disk.open(idxPath, create: false) {
            defer { f.close() }
            if let idx = try? SegmentIndexFile.open(try FileByteSource(f)),
                let b = idx.blocks.first(where: { $0.lastIndex >= next })
            {
                segment = (base, file, b.offset)
                return
            }
        }
        // The active segment (or an index that cannot be used): walk the blocks.
        var scanner = try SegmentScanner(try FileByteSource(file))
        while let item = try scanner.next() {
            guard case .block(let b) = item else { break }
            if b.header.lastIndex >= next {
                offset = b.offset
                break
            }
            offset = b.offset + UInt64(b.bytes.count)
        }
        segment = (base, file, offset)
    }
}
