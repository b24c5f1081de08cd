import NIOCore
import PeerTransport
import Testing
import WeftCore

@Suite("Peer wire format")
struct WireTests {
    private let allocator = ByteBufferAllocator()

    private func bytes(_ frame: PeerFrame) -> [UInt8] {
        var buffer = self.allocator.buffer(capacity: 0)
        frame.encode(into: &buffer)
        return Array(buffer.readableBytesView)
    }

    @Test func sizesArePinned() {
        #expect(PeerWire.headerBytes == 5)
        #expect(PeerWire.nonceBytes == 32)
        #expect(PeerWire.macBytes == 32)
        #expect(PeerWire.helloFixedBytes == 40)
        #expect(PeerWire.challengeBytes == 72)
        #expect(PeerWire.proofBytes == 32)
        #expect(PeerWire.dataFixedBytes == 8)
        #expect(PeerWire.frameBytesMaxDefault == 16 * 1024 * 1024)
        #expect(PeerWire.macLabel == Array("weft-peer-v1".utf8))
        #expect(PeerFrameType.hello.rawValue == 0x01)
        #expect(PeerFrameType.challenge.rawValue == 0x02)
        #expect(PeerFrameType.proof.rawValue == 0x03)
        #expect(PeerFrameType.accept.rawValue == 0x04)
        #expect(PeerFrameType.data.rawValue == 0x10)
    }

    @Test func workedExampleFromTheDocComment() {
        #expect(
            self.bytes(.data(shard: 7, payload: [0xAA, 0xBB]))
                == [0x0A, 0, 0, 0, 0x10, 7, 0, 0, 0, 0, 0, 0, 0, 0xAA, 0xBB])
        #expect(self.bytes(.accept) == [0, 0, 0, 0, 0x04])
        let hello = self.bytes(.hello(node: NodeID(0x0102), clusterName: "ab", nonce: [UInt8](repeating: 9, count: 32)))
        #expect(hello.count == 5 + 42)
        #expect(Array(hello[0..<5]) == [42, 0, 0, 0, 0x01])
        #expect(Array(hello[5..<13]) == [0x02, 0x01, 0, 0, 0, 0, 0, 0])
        #expect(Array(hello[45...]) == Array("ab".utf8))
    }

    @Test func roundTripEveryFrameTypeByteByByte() throws {
        let frames: [PeerFrame] = [
            .hello(node: NodeID(3), clusterName: "prod-eu", nonce: [UInt8](repeating: 1, count: 32)),
            .hello(node: NodeID(4), clusterName: "", nonce: [UInt8](repeating: 2, count: 32)),
            .challenge(node: NodeID(.max), nonce: [UInt8](repeating: 3, count: 32), mac: [UInt8](repeating: 4, count: 32)),
            .proof(mac: [UInt8](repeating: 5, count: 32)),
            .accept,
            .data(shard: 0, payload: []),
            .data(shard: .max, payload: Array(0..<200)),
        ]
        var stream: [UInt8] = []
        for frame in frames { stream += self.bytes(frame) }

        let decoder = PeerFrameDecoder(dataFramesAllowed: true)
        var buffer = self.allocator.buffer(capacity: stream.count)
        var decoded: [PeerFrame] = []
        for byte in stream {
            buffer.writeInteger(byte)
            while let frame = try decoder.decodeFrame(&buffer) { decoded.append(frame) }
        }
        #expect(decoded == frames)
        #expect(buffer.readableBytes == 0)
    }

    private func decodeError(_ stream: [UInt8], dataAllowed: Bool = false, frameBytesMax: Int = 1 << 20) -> PeerFrameError? {
        let decoder = PeerFrameDecoder(frameBytesMax: frameBytesMax, dataFramesAllowed: dataAllowed)
        var buffer = self.allocator.buffer(bytes: stream)
        do {
            while try decoder.decodeFrame(&buffer) != nil {}
            return nil
        } catch {
            return error
        }
    }

    @Test func oversizedLengthFailsOnTheHeaderAlone() {
        // Only the 5 header bytes: the decoder must refuse without waiting for (or buffering) the body.
        #expect(self.decodeError([0xFF, 0xFF, 0xFF, 0xFF, 0x10], dataAllowed: true) == .frameTooLarge(length: .max, max: 1 << 20))
        let justOver = UInt32((1 << 20) + 1)
        let header = withUnsafeBytes(of: justOver.littleEndian) { Array($0) } + [0x10]
        #expect(self.decodeError(header, dataAllowed: true) == .frameTooLarge(length: justOver, max: 1 << 20))
        // At the limit the header is accepted and the decoder waits for the body.
        let atLimit = withUnsafeBytes(of: UInt32(1 << 20).littleEndian) { Array($0) } + [0x10]
        #expect(self.decodeError(atLimit, dataAllowed: true) == nil)
    }

    @Test func unknownTypeFails() {
        #expect(self.decodeError([0, 0, 0, 0, 0x7F]) == .unknownType(0x7F))
        #expect(self.decodeError(Array("GET / HTTP/1.1\r\n".utf8)) == .unknownType(UInt8(ascii: "/")))
    }

    @Test func handshakeFramesOfTheWrongSizeFail() {
        #expect(self.decodeError([71, 0, 0, 0, 0x02]) == .malformed(.challenge, length: 71))
        #expect(self.decodeError([33, 0, 0, 0, 0x03]) == .malformed(.proof, length: 33))
        #expect(self.decodeError([1, 0, 0, 0, 0x04]) == .malformed(.accept, length: 1))
        #expect(self.decodeError([39, 0, 0, 0, 0x01]) == .malformed(.hello, length: 39))
        #expect(self.decodeError([40 + 256, 1, 0, 0, 0x01].map { UInt8(truncatingIfNeeded: $0) } ) == .malformed(.hello, length: 296))
        #expect(self.decodeError([7, 0, 0, 0, 0x10], dataAllowed: true) == .malformed(.data, length: 7))
    }

    @Test func helloNameMustBeUTF8() {
        var stream: [UInt8] = [42, 0, 0, 0, 0x01] + [UInt8](repeating: 0, count: 8 + 32)
        stream += [0xC3, 0x28]  // invalid UTF-8
        #expect(self.decodeError(stream) == .malformed(.hello, length: 42))
    }

    @Test func dataIsRefusedUntilAllowed() {
        let frame = self.bytes(.data(shard: 1, payload: [1, 2, 3]))
        #expect(self.decodeError(frame) == .dataNotAllowed)
        // Refused on the header alone, even when the claimed body is large.
        #expect(self.decodeError([0, 0, 0x10, 0, 0x10]) == .dataNotAllowed)
        #expect(self.decodeError(frame, dataAllowed: true) == nil)
    }
}

@Suite("Peer crypto")
struct CryptoTests {
    @Test func hmacSHA256MatchesRFC4231TestCase1() {
        let tag = PeerCrypto.hmacSHA256(key: [UInt8](repeating: 0x0B, count: 20), message: Array("Hi There".utf8))
        let hex = tag.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
        #expect(hex == "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")
    }

    @Test func constantTimeEqual() {
        #expect(PeerCrypto.constantTimeEqual([1, 2, 3], [1, 2, 3]))
        #expect(!PeerCrypto.constantTimeEqual([1, 2, 3], [1, 2, 4]))
        #expect(!PeerCrypto.constantTimeEqual([1, 2, 3], [1, 2]))
        #expect(PeerCrypto.constantTimeEqual([], []))
    }

    @Test func randomBytesAreFreshAndSized() throws {
        let a = try PeerCrypto.randomBytes(32)
        let b = try PeerCrypto.randomBytes(32)
        #expect(a.count == 32 && b.count == 32)
        #expect(a != b)
    }
}
