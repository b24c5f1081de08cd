import Raft
import SegmentFormat
import SegmentStore
import WeftCore

/// Raft's hard state (term, vote, commit) in a small file beside the shard's segments: two 64-byte
/// slots written alternately, each with a sequence number and a CRC, so an update is one pwrite plus one
/// fdatasync and a torn write leaves the other slot intact. Not a log: it holds one value.
///
/// Slot: magic "WEFTHS\0\0" | u64 seq | u64 term | u64 vote (0 = none) | u64 commit | 20 zero | u32 crc
public final class HardStateFile {
    static let magic: [UInt8] = Array("WEFTHS\0\0".utf8)
    static let slotBytes = 64
    let file: any DiskFile
    public let path: String
    var seq: UInt64
    public private(set) var state: HardState
    /// The file held bytes but no valid slot: the term and vote this node had are unknown.
    public let damaged: Bool

    public init(path: String, disk: any Disk) throws {
        self.path = path
        file = try disk.open(path, create: true)
        let bytes = try file.read(at: 0, count: 2 * Self.slotBytes)
        var best: (UInt64, HardState)?
        for slot in 0..<2 {
            let start = slot * Self.slotBytes
            guard bytes.count >= start + Self.slotBytes else { continue }
            let s = Array(bytes[start..<(start + Self.slotBytes)])
            guard Array(s[0..<8]) == Self.magic, s.loadLE(UInt32.self, at: 60) == CRC32C.checksum(s[0..<60]) else { continue }
            let seq: UInt64 = s.loadLE(at: 8)
            let vote: UInt64 = s.loadLE(at: 24)
            let hs = HardState(term: s.loadLE(at: 16), vote: vote == 0 ? nil : NodeID(vote), commit: s.loadLE(at: 32))
            if best == nil || seq > best!.0 { best = (seq, hs) }
        }
        seq = best?.0 ?? 0
        state = best?.1 ?? HardState()
        damaged = best == nil && bytes.contains { $0 != 0 }
    }

    /// Writes `hs` durably (pwrite + fdatasync) into the older slot.
    public func save(_ hs: HardState) throws {
        seq += 1
        var s = Self.magic
        s.appendLE(seq)
        s.appendLE(hs.term)
        s.appendLE(hs.vote?.rawValue ?? 0)
        s.appendLE(hs.commit)
        s += [UInt8](repeating: 0, count: 20)
        s.appendLE(CRC32C.checksum(s))
        try file.write(s, at: UInt64(Int(seq % 2) * Self.slotBytes))
        try file.sync()
        state = hs
    }

    public func close() { file.close() }
}
