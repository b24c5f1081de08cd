import Raft
import SegmentFormat
import SegmentStore
import WeftCore

/// A shard replica's applied membership, beside its segments (`membership`): the voters and learners as
/// of the configuration entry at `index`. Written atomically (tmp, fdatasync, rename, directory fsync)
/// before the bootstrap entries go into a new log and after every applied membership change, so a
/// restarted replica knows its group before it has heard from any leader.
///
/// Layout: magic "WEFTMEM\0" | u64 index | u32 voters | u32 learners | u64 ids... | u32 crc of all before
public final class MembershipFile {
    static let magic: [UInt8] = Array("WEFTMEM\0".utf8)
    let disk: any Disk
    let directory: String
    public let path: String

    public init(directory: String, disk: any Disk) {
        self.disk = disk
        self.directory = directory
        path = directory + "/membership"
    }

    public struct Damaged: Error, CustomStringConvertible {
        public var description: String
    }

    /// The stored membership, nil when there is no file yet. A damaged file is an error: guessing the
    /// group of a replica could let it count the wrong quorum.
    public func load() throws -> (membership: Membership, index: LogIndex)? {
        guard disk.exists(path) else { return nil }
        let f = try disk.open(path, create: false)
        defer { f.close() }
        let b = try f.read(at: 0, count: 1 << 16)
        guard b.count >= 28, Array(b[0..<8]) == Self.magic else { throw Damaged(description: "\(path): not a membership file") }
        let nv = Int(b.loadLE(UInt32.self, at: 16))
        let nl = Int(b.loadLE(UInt32.self, at: 20))
        let end = 24 + 8 * (nv + nl)
        guard nv + nl <= 4096, b.count == end + 4, b.loadLE(UInt32.self, at: end) == CRC32C.checksum(b[0..<end]) else {
            throw Damaged(description: "\(path): damaged (length or checksum)")
        }
        var voters = Set<NodeID>()
        var learners = Set<NodeID>()
        for k in 0..<(nv + nl) {
            let id = NodeID(b.loadLE(UInt64.self, at: 24 + 8 * k))
            if k < nv { voters.insert(id) } else { learners.insert(id) }
        }
        return (Membership(voters: voters, learners: learners), b.loadLE(at: 8))
    }

    public func save(_ m: Membership, index: LogIndex) throws {
        var b = Self.magic
        b.appendLE(index)
        b.appendLE(UInt32(m.voters.count))
        b.appendLE(UInt32(m.learners.count))
        for id in m.voters.sorted() { b.appendLE(id.rawValue) }
        for id in m.learners.sorted() { b.appendLE(id.rawValue) }
        b.appendLE(CRC32C.checksum(b))
        let tmp = path + ".tmp"
        let f = try disk.open(tmp, create: true)
        try f.truncate(to: 0)
        try f.write(b, at: 0)
        try f.sync()
        f.close()
        try disk.rename(tmp, to: path)
        try disk.syncDirectory(directory)
    }
}
