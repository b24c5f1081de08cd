import WeftCore

/// A small key-value state machine: the simulation's and the tests' model of a shard's state, and the
/// example for the domain machines (Docs/state.md).
///
/// Records of type `data` carry one operation; other types (Raft's no-ops and membership entries, client
/// types it does not know) change nothing and are accepted.
///
/// ```
/// payload: u8 op | u16 keyLength | key | operands          (little-endian)
///   op 1 put      operands: value                → accepted(u64 version), version = the record's index
///   op 2 delete   operands: none                 → accepted([]) | rejected("not_found")
///   op 3 cas      operands: u64 expected | value → accepted(u64 version) | rejected("conflict")
///                 (expected 0: the key must be absent)
/// anything else                                  → rejected("malformed")
/// ```
public struct KeyValueMachine: ShardStateMachine {
    public struct Entry: Sendable, Equatable {
        public var value: [UInt8]
        /// Index of the record that wrote it.
        public var version: UInt64
        public init(value: [UInt8], version: UInt64) {
            self.value = value
            self.version = version
        }
    }

    public private(set) var entries = BucketedMap<[UInt8], Entry>()
    /// Timestamp of the last record applied (the machine's clock: it only moves with the log).
    public private(set) var clockMicros: Int64 = 0

    public init() {}

    public enum Op: UInt8 {
        case put = 1, delete = 2, cas = 3
    }

    public static func put(_ key: [UInt8], _ value: [UInt8]) -> [UInt8] { header(.put, key) + value }
    public static func delete(_ key: [UInt8]) -> [UInt8] { header(.delete, key) }
    public static func cas(_ key: [UInt8], expected: UInt64, _ value: [UInt8]) -> [UInt8] {
        var b = header(.cas, key)
        b.appendLE(expected)
        return b + value
    }
    static func header(_ op: Op, _ key: [UInt8]) -> [UInt8] {
        var b: [UInt8] = [op.rawValue]
        b.appendLE(UInt16(truncatingIfNeeded: key.count))
        return b + key.prefix(Int(UInt16.max))
    }

    public subscript(key: [UInt8]) -> Entry? { entries[key] }

    public mutating func apply(_ records: ArraySlice<Record>) -> [ApplyOutcome] {
        var out: [ApplyOutcome] = []
        out.reserveCapacity(records.count)
        for r in records {
            clockMicros = max(clockMicros, r.timestampMicros)
            out.append(r.type == .data ? applyOne(r) : .ok)
        }
        return out
    }

    mutating func applyOne(_ r: Record) -> ApplyOutcome {
        let p = r.payload
        guard p.count >= 3, let op = Op(rawValue: p[0]) else { return .rejected(code: "malformed", message: "no operation at index \(r.index)") }
        let keyLength = Int(p[1]) | Int(p[2]) << 8
        guard p.count >= 3 + keyLength else { return .rejected(code: "malformed", message: "key runs past the payload at index \(r.index)") }
        let key = Array(p[3..<(3 + keyLength)])
        let rest = p[(3 + keyLength)...]
        var version: [UInt8] = []
        version.appendLE(r.index)
        switch op {
        case .put:
            entries[key] = Entry(value: Array(rest), version: r.index)
            return .accepted(version)
        case .delete:
            guard entries[key] != nil else { return .rejected(code: "not_found", message: "no such key") }
            entries[key] = nil
            return .ok
        case .cas:
            guard rest.count >= 8 else { return .rejected(code: "malformed", message: "cas without an expected version at index \(r.index)") }
            let expected = rest.prefix(8).enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
            guard (entries[key]?.version ?? 0) == expected else {
                return .rejected(code: "conflict", message: "version is \(entries[key]?.version ?? 0), not \(expected)")
            }
            entries[key] = Entry(value: Array(rest.dropFirst(8)), version: r.index)
            return .accepted(version)
        }
    }

    /// `u64 clockMicros | u64 count | count × (u16 keyLength | key | u64 version | u32 valueLength | value)`,
    /// bucket by bucket, keys sorted within a bucket (equal states give equal bytes).
    public func snapshot() -> [UInt8] {
        var b: [UInt8] = []
        b.appendLE(UInt64(bitPattern: clockMicros))
        b.appendLE(UInt64(entries.count))
        for k in 0..<BucketedMap<[UInt8], Entry>.bucketCount {
            let bucket = entries.entries(inBucket: k)
            for key in bucket.keys.sorted(by: { $0.lexicographicallyPrecedes($1) }) {
                guard let e = bucket[key] else { continue }
                b.appendLE(UInt16(key.count))
                b += key
                b.appendLE(e.version)
                b.appendLE(UInt32(e.value.count))
                b += e.value
            }
        }
        return b
    }

    public init(snapshot b: [UInt8]) throws {
        var r = LEReader(b)
        guard let clock = r.u64(), let count = r.u64() else { throw StateDecodeError("snapshot too short for its header (\(b.count) bytes)") }
        clockMicros = Int64(bitPattern: clock)
        // Each entry takes at least 14 bytes: a count beyond that is a lie, caught below, not reserved.
        entries.reserveCapacity(Int(min(count, UInt64(b.count / 14))))
        for n in 0..<count {
            guard let kl = r.u16(), let key = r.bytes(Int(kl)), let version = r.u64(), let vl = r.u32(), let value = r.bytes(Int(vl)) else {
                throw StateDecodeError("snapshot entry \(n) of \(count) runs past the end at byte \(r.offset)")
            }
            entries[key] = Entry(value: value, version: version)
        }
        guard r.offset == b.count else { throw StateDecodeError("\(b.count - r.offset) bytes after the last entry") }
    }

    public var stateHash: UInt64 {
        // A sum of per-entry digests: independent of order and layout.
        var sum = UInt64(bitPattern: clockMicros)
        entries.forEach { key, e in
            var h = FNV1a()
            h.add(UInt64(key.count))
            h.add(key)
            h.add(e.version)
            h.add(e.value)
            sum &+= h.value
        }
        return sum
    }
}

/// Little-endian reading of snapshot bytes; nil past the end.
public struct LEReader {
    let bytes: [UInt8]
    public private(set) var offset = 0
    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    mutating func int<T: FixedWidthInteger>(_: T.Type) -> T? {
        let n = MemoryLayout<T>.size
        guard offset + n <= bytes.count else { return nil }
        var v: T = 0
        for k in 0..<n { v |= T(bytes[offset + k]) << (8 * k) }
        offset += n
        return v
    }
    public mutating func u16() -> UInt16? { int(UInt16.self) }
    public mutating func u32() -> UInt32? { int(UInt32.self) }
    public mutating func u64() -> UInt64? { int(UInt64.self) }
    public mutating func bytes(_ n: Int) -> [UInt8]? {
        guard n >= 0, offset + n <= bytes.count else { return nil }
        defer { offset += n }
        return Array(bytes[offset..<(offset + n)])
    }
}

extension Array where Element == UInt8 {
    mutating func appendLE<T: FixedWidthInteger>(_ v: T) {
        Swift.withUnsafeBytes(of: v.littleEndian) { append(contentsOf: $0) }
    }
}
