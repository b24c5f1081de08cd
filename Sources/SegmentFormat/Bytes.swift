/// Little-endian encoding helpers. Every integer in Weft's files is little-endian (Docs/segment-format.md).

extension Array where Element == UInt8 {
    @inlinable public mutating func appendLE<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.littleEndian) { append(contentsOf: $0) }
    }

    @inlinable public mutating func storeLE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        withUnsafeMutableBytes { buf in
            buf.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self)
        }
    }
}

extension UnsafeRawBufferPointer {
    /// Reads a little-endian integer; the caller has checked the bounds.
    @inlinable public func loadLE<T: FixedWidthInteger>(_: T.Type = T.self, at offset: Int) -> T {
        T(littleEndian: loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}

extension Array where Element == UInt8 {
    /// Reads a little-endian integer at `offset`; the caller has checked the bounds.
    @inlinable public func loadLE<T: FixedWidthInteger>(_: T.Type = T.self, at offset: Int) -> T {
        precondition(offset >= 0 && offset + MemoryLayout<T>.size <= count)
        return withUnsafeBytes { $0.loadLE(T.self, at: offset) }
    }
}

/// Random access to the bytes of one file, so that the pure decoders never open a file themselves.
public protocol ByteSource {
    /// Name used in error messages (a path).
    var name: String { get }
    /// Current length in bytes.
    var size: UInt64 { get }
    /// Up to `count` bytes starting at `offset`; fewer only at the end of the source.
    func read(at offset: UInt64, count: Int) throws -> [UInt8]
}

/// A `ByteSource` over bytes already in memory (tests, the fuzzer).
public struct MemoryByteSource: ByteSource {
    public var name: String
    public var bytes: [UInt8]
    public init(name: String = "<memory>", bytes: [UInt8]) {
        self.name = name
        self.bytes = bytes
    }
    public var size: UInt64 { UInt64(bytes.count) }
    public func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        guard offset < UInt64(bytes.count), count > 0 else { return [] }
        let start = Int(offset)
        let end = start + Swift.min(count, bytes.count - start)
        return Array(bytes[start..<end])
    }
}
