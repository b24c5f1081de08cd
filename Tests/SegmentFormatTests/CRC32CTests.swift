import SegmentFormat
import Testing
import WeftTesting

/// Bit-at-a-time CRC-32C, straight from the definition, to check the table-driven one against.
func referenceCRC32C(_ bytes: [UInt8]) -> UInt32 {
    var c: UInt32 = 0xFFFF_FFFF
    for b in bytes {
        c ^= UInt32(b)
        for _ in 0..<8 { c = (c & 1) != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
    }
    return ~c
}

@Suite struct CRC32CTests {
    @Test func checkValue() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8]()) == 0)
    }

    /// RFC 3720 (iSCSI) appendix B.4 test vectors.
    @Test func iscsiVectors() {
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
        #expect(CRC32C.checksum((0..<32).map { UInt8($0) }) == 0x46DD_794E)
        #expect(CRC32C.checksum((0..<32).reversed().map { UInt8($0) }) == 0x113F_DB5C)
    }

    @Test func matchesBitwiseReference() {
        var rng = SeededRNG(seed: 1)
        for length in Array(0..<80) + [255, 256, 257, 1000, 4099] {
            let bytes = rng.bytes(length)
            #expect(CRC32C.checksum(bytes) == referenceCRC32C(bytes), "length \(length)")
        }
    }

    /// The CPU's instruction (where there is one) and the table-driven code agree, at every alignment
    /// and length, and continuing from any CRC.
    @Test func hardwareAndSoftwareAgree() {
        var rng = SeededRNG(seed: 3)
        let bytes = rng.bytes(5000)
        for start in 0..<9 {
            for length in Array(0..<40) + [63, 64, 65, 1000, 4096] {
                let slice = bytes[start..<(start + length)]
                let seed = UInt32(truncatingIfNeeded: rng.next())
                let hw = slice.withUnsafeBytes { CRC32C.checksum($0, continuing: seed) }
                let sw = slice.withUnsafeBytes { CRC32C.software($0, continuing: seed) }
                #expect(hw == sw, "start \(start) length \(length)")
            }
        }
        #expect(Array("123456789".utf8).withUnsafeBytes { CRC32C.software($0) } == 0xE306_9283)
        print("CRC-32C: \(CRC32C.hardware ? "the CPU's instruction" : "software (no instruction on this CPU)")")
    }

    @Test func incrementalEqualsOneShot() {
        var rng = SeededRNG(seed: 2)
        let bytes = rng.bytes(300)
        let whole = CRC32C.checksum(bytes)
        for split in 0...bytes.count {
            let head = CRC32C.checksum(Array(bytes[..<split]))
            #expect(CRC32C.checksum(Array(bytes[split...]), continuing: head) == whole, "split at \(split)")
            // The slice overload must agree with the array one.
            #expect(CRC32C.checksum(bytes[split...], continuing: CRC32C.checksum(bytes[..<split])) == whole)
        }
        // Many pieces of random sizes, through the raw-buffer overload.
        for _ in 0..<50 {
            var crc: UInt32 = 0
            var pos = 0
            while pos < bytes.count {
                let end = min(bytes.count, pos + rng.int(0...40))
                crc = bytes[pos..<end].withUnsafeBytes { CRC32C.checksum($0, continuing: crc) }
                pos = end
            }
            #expect(crc == whole)
        }
        // Continuing over nothing changes nothing.
        #expect(CRC32C.checksum([UInt8](), continuing: whole) == whole)
    }
}
