import COpenSSL

/// The three OpenSSL primitives the handshake needs. Pure functions of their inputs (except `randomBytes`).
public enum PeerCrypto {
    /// Bytes in an HMAC-SHA256 tag.
    public static let macBytes = 32

    /// HMAC-SHA256(key, message). `key` must not be empty (the transport rejects an empty secret at start).
    public static func hmacSHA256(key: [UInt8], message: [UInt8]) -> [UInt8] {
        precondition(!key.isEmpty, "HMAC key must not be empty")
        precondition(key.count <= Int(Int32.max), "HMAC key too long")
        var tag = [UInt8](repeating: 0, count: macBytes)
        var tagLength: UInt32 = 0
        let ok = key.withUnsafeBufferPointer { keyBuffer in
            message.withUnsafeBufferPointer { messageBuffer in
                tag.withUnsafeMutableBufferPointer { tagBuffer in
                    // Empty messages are never passed (the MAC input always holds the label), but an
                    // empty buffer's base address may be nil; OpenSSL accepts NULL with length 0.
                    HMAC(
                        EVP_sha256(), keyBuffer.baseAddress, Int32(keyBuffer.count),
                        messageBuffer.baseAddress, messageBuffer.count,
                        tagBuffer.baseAddress, &tagLength) != nil
                }
            }
        }
        // HMAC-SHA256 over in-memory buffers cannot fail short of a broken OpenSSL install: a bug, not a fault.
        precondition(ok && tagLength == UInt32(macBytes), "OpenSSL HMAC-SHA256 failed")
        return tag
    }

    /// Constant-time equality (CRYPTO_memcmp). Lengths are public, so a length mismatch returns early.
    public static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        if a.isEmpty { return true }
        return a.withUnsafeBufferPointer { aBuffer in
            b.withUnsafeBufferPointer { bBuffer in
                CRYPTO_memcmp(aBuffer.baseAddress, bBuffer.baseAddress, aBuffer.count) == 0
            }
        }
    }

    /// Errors from the OpenSSL random generator.
    public struct RandomError: Error, CustomStringConvertible {
        public var description: String { "RAND_bytes failed" }
    }

    /// `count` bytes from OpenSSL's CSPRNG.
    public static func randomBytes(_ count: Int) throws(RandomError) -> [UInt8] {
        precondition(count > 0 && count <= Int(Int32.max))
        var bytes = [UInt8](repeating: 0, count: count)
        let rc = bytes.withUnsafeMutableBufferPointer { buffer in
            RAND_bytes(buffer.baseAddress, Int32(buffer.count))
        }
        guard rc == 1 else { throw RandomError() }
        return bytes
    }
}
