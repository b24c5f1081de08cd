import Raft
import WeftCore

/// The raw log's relay rule: a `fanout` record is copied to each (shard, stream) it names in other
/// shards, as a `data` record whose payload is `u64 source shard | u64 source index | body` (so a reader
/// of the destination stream finds where it came from). What a message sent to a group, or a pointer into
/// every recipient's inbox, does in the messaging layer, here for any client of the raw API.
public struct FanoutRule: RelayRule {
    /// Destinations one fan-out record may name at most.
    public static let destinationsMax = 1024

    public init() {}

    /// The destinations and body of a fan-out payload; nil when malformed (the API refuses those).
    public static func parse(_ payload: [UInt8]) -> (destinations: [(shard: ShardID, stream: StreamID)], body: ArraySlice<UInt8>)? {
        guard payload.count >= 2 else { return nil }
        let n = Int(payload[0]) | Int(payload[1]) << 8
        guard n >= 1, n <= destinationsMax, payload.count >= 2 + 16 * n else { return nil }
        var out: [(ShardID, StreamID)] = []
        out.reserveCapacity(n)
        for k in 0..<n {
            let at = 2 + 16 * k
            var shard: UInt64 = 0
            var stream: UInt64 = 0
            for b in 0..<8 {
                shard |= UInt64(payload[at + b]) << (8 * UInt64(b))
                stream |= UInt64(payload[at + 8 + b]) << (8 * UInt64(b))
            }
            guard stream > 0 else { return nil }
            out.append((ShardID(shard), StreamID(stream)))
        }
        return (out, payload[(2 + 16 * n)...])
    }

    public static func encode(destinations: [(shard: ShardID, stream: StreamID)], body: [UInt8]) -> [UInt8] {
        var b: [UInt8] = [UInt8(truncatingIfNeeded: destinations.count), UInt8(truncatingIfNeeded: destinations.count >> 8)]
        for d in destinations {
            withUnsafeBytes(of: d.shard.rawValue.littleEndian) { b.append(contentsOf: $0) }
            withUnsafeBytes(of: d.stream.rawValue.littleEndian) { b.append(contentsOf: $0) }
        }
        return b + body
    }

    public func derive(_ record: Record, source: ShardID) -> [(destination: ShardID, proposal: Proposal)] {
        guard record.type == .fanout, let (destinations, body) = Self.parse(record.payload) else { return [] }
        var head: [UInt8] = []
        withUnsafeBytes(of: source.rawValue.littleEndian) { head.append(contentsOf: $0) }
        withUnsafeBytes(of: record.index.littleEndian) { head.append(contentsOf: $0) }
        let payload = head + body
        return destinations.filter { $0.shard != source }.map { d in
            (d.shard, Proposal(stream: d.stream, type: .data, timestampMicros: record.timestampMicros, payload: payload))
        }
    }
}
