import WeftCore

/// Binary encoding of Raft messages for the peer transport (little-endian, see Docs/replication.md).
///
/// ```
/// u8 kind | u64 from | u64 to | u64 term | u64 logTerm | u64 index | u64 commit | u8 reject
/// | u64 hint | u64 context | u32 n | n x entry
/// entry: u64 index | u64 term | u64 stream | u64 seq | u16 type | i64 timestamp | u32 len | len bytes
/// ```
public enum MessageCodec {
    public static let headerBytes = 1 + 8 * 6 + 1 + 8 + 8 + 4
    public static let entryHeaderBytes = 8 * 4 + 2 + 8 + 4

    public struct DecodeError: Error, Equatable, CustomStringConvertible {
        public var offset: Int
        public var reason: String
        public var description: String { "raft message: \(reason) at byte \(offset)" }
    }

    public static func encode(_ m: Message, into out: inout [UInt8]) {
        out.append(m.kind.rawValue)
        put(m.from.rawValue, &out)
        put(m.to.rawValue, &out)
        put(m.term, &out)
        put(m.logTerm, &out)
        put(m.index, &out)
        put(m.commit, &out)
        out.append(m.reject ? 1 : 0)
        put(m.hint, &out)
        put(m.context, &out)
        put(UInt32(m.entries.count), &out)
        for e in m.entries {
            put(e.index, &out)
            put(e.term, &out)
            put(e.stream.rawValue, &out)
            put(e.seq, &out)
            put(e.type.rawValue, &out)
            put(UInt64(bitPattern: e.timestampMicros), &out)
            put(UInt32(e.payload.count), &out)
            out.append(contentsOf: e.payload)
        }
    }

    public static func encode(_ m: Message) -> [UInt8] {
        var out: [UInt8] = []
        encode(m, into: &out)
        return out
    }

    /// Decodes exactly one message filling `bytes`; hostile input gives an error, never a crash.
    public static func decode(_ bytes: ArraySlice<UInt8>) throws(DecodeError) -> Message {
        var r = Reader(bytes: bytes)
        guard let kind = MessageKind(rawValue: try r.u8()) else { throw DecodeError(offset: 0, reason: "unknown kind") }
        var m = Message(kind: kind, from: NodeID(try r.u64()), to: NodeID(try r.u64()), term: try r.u64())
        m.logTerm = try r.u64()
        m.index = try r.u64()
        m.commit = try r.u64()
        m.reject = try r.u8() != 0
        m.hint = try r.u64()
        m.context = try r.u64()
        let n = Int(try r.u32())
        guard n <= r.remaining / entryHeaderBytes else { throw DecodeError(offset: r.pos, reason: "\(n) entries cannot fit") }
        m.entries.reserveCapacity(n)
        for _ in 0..<n {
            let index = try r.u64()
            let term = try r.u64()
            let stream = try r.u64()
            let seq = try r.u64()
            let type = try r.u16()
            let ts = Int64(bitPattern: try r.u64())
            let len = Int(try r.u32())
            guard len <= Limits.recordPayloadBytesMax else { throw DecodeError(offset: r.pos, reason: "payload of \(len) bytes over limit") }
            let payload = try r.bytes(len)
            m.entries.append(Record(index: index, term: term, stream: StreamID(stream), seq: seq, type: RecordType(type), timestampMicros: ts, payload: payload))
        }
        guard r.remaining == 0 else { throw DecodeError(offset: r.pos, reason: "\(r.remaining) trailing bytes") }
        return m
    }

    static func put<T: FixedWidthInteger>(_ v: T, _ out: inout [UInt8]) {
        withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) }
    }

    struct Reader {
        let bytes: ArraySlice<UInt8>
        var pos = 0
        var remaining: Int { bytes.count - pos }

        mutating func take(_ n: Int) throws(DecodeError) -> ArraySlice<UInt8> {
            guard n >= 0, remaining >= n else { throw DecodeError(offset: pos, reason: "truncated") }
            let start = bytes.startIndex + pos
            pos += n
            return bytes[start..<(start + n)]
        }
        mutating func int<T: FixedWidthInteger>(_: T.Type) throws(DecodeError) -> T {
            var v: T = 0
            for (k, b) in try take(MemoryLayout<T>.size).enumerated() { v |= T(b) << (8 * k) }
            return v
        }
        mutating func u8() throws(DecodeError) -> UInt8 { try int(UInt8.self) }
        mutating func u16() throws(DecodeError) -> UInt16 { try int(UInt16.self) }
        mutating func u32() throws(DecodeError) -> UInt32 { try int(UInt32.self) }
        mutating func u64() throws(DecodeError) -> UInt64 { try int(UInt64.self) }
        mutating func bytes(_ n: Int) throws(DecodeError) -> [UInt8] { Array(try take(n)) }
    }
}
