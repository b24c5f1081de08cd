import NIOCore
import WeftCore

/// Frame type byte (see the wire format in PeerTransport.swift). Any other value closes the connection.
public enum PeerFrameType: UInt8, Sendable, CustomStringConvertible {
    case hello = 0x01
    case challenge = 0x02
    case proof = 0x03
    case accept = 0x04
    case data = 0x10

    public var description: String {
        switch self {
        case .hello: "Hello"
        case .challenge: "Challenge"
        case .proof: "Proof"
        case .accept: "Accept"
        case .data: "Data"
        }
    }
}

/// Sizes and limits of the peer wire format. Each constant is a row of the tables in PeerTransport.swift.
public enum PeerWire {
    /// `u32 length | u8 type`.
    public static let headerBytes = 5
    /// Random nonce in Hello and Challenge.
    public static let nonceBytes = 32
    /// HMAC-SHA256 tag in Challenge and Proof.
    public static let macBytes = PeerCrypto.macBytes
    /// Longest cluster name, in UTF-8 bytes.
    public static let clusterNameBytesMax = 255
    /// Hello body: `u64 node | nonce[32] | cluster name`.
    public static let helloFixedBytes = 8 + nonceBytes
    /// Challenge body: `u64 node | nonce[32] | mac[32]`.
    public static let challengeBytes = 8 + nonceBytes + macBytes
    /// Proof body: `mac[32]`.
    public static let proofBytes = macBytes
    /// Data body before the payload: `u64 shard`.
    public static let dataFixedBytes = 8
    /// The shard id of the transport's own link probes (a Data frame with it is never handed to `onFrame`).
    /// An older node hands it on, and its owner drops it as an unknown payload.
    public static let probeShard: UInt64 = .max
    /// A probe's payload: `u8 kind | u64 LE token`, kind `probePing` (answered with the same token) or
    /// `probePong` (the answer).
    public static let probeBytes = 9
    public static let probePing: UInt8 = 0xF0
    public static let probePong: UInt8 = 0xF1
    /// Default `frameBytesMax`: the largest `length` field accepted (16 MiB).
    public static let frameBytesMaxDefault = 16 << 20
    /// Domain-separation label at the start of every MAC input.
    public static let macLabel: [UInt8] = Array("weft-peer-v1".utf8)
    /// Role labels in MAC inputs; both are 6 bytes, so the input layout is unambiguous.
    public static let serverLabel: [UInt8] = Array("server".utf8)
    public static let clientLabel: [UInt8] = Array("client".utf8)
}

/// One decoded frame.
public enum PeerFrame: Equatable, Sendable {
    /// Dialer → listener: who I am, which cluster, my nonce (nonceA).
    case hello(node: NodeID, clusterName: String, nonce: [UInt8])
    /// Listener → dialer: who I am, my nonce (nonceB), and the server MAC proving I hold the secret.
    case challenge(node: NodeID, nonce: [UInt8], mac: [UInt8])
    /// Dialer → listener: the client MAC proving the dialer holds the secret.
    case proof(mac: [UInt8])
    /// Listener → dialer: the proof was accepted; Data frames may follow.
    case accept
    /// Dialer → listener, only after Accept: one shard's opaque payload (an encoded Raft message).
    case data(shard: UInt64, payload: [UInt8])

    public var type: PeerFrameType {
        switch self {
        case .hello: .hello
        case .challenge: .challenge
        case .proof: .proof
        case .accept: .accept
        case .data: .data
        }
    }

    /// Bytes of the body, i.e. the value of the `length` field.
    public var bodyBytes: Int {
        switch self {
        case .hello(_, let clusterName, _): PeerWire.helloFixedBytes + clusterName.utf8.count
        case .challenge: PeerWire.challengeBytes
        case .proof: PeerWire.proofBytes
        case .accept: 0
        case .data(_, let payload): PeerWire.dataFixedBytes + payload.count
        }
    }

    /// Appends the encoded frame (header and body) to `buffer`.
    /// Preconditions (bugs, not input): nonces and MACs have their fixed sizes, the cluster name fits.
    public func encode(into buffer: inout ByteBuffer) {
        switch self {
        case .hello(let node, let clusterName, let nonce):
            precondition(nonce.count == PeerWire.nonceBytes, "Hello nonce must be 32 bytes")
            precondition(clusterName.utf8.count <= PeerWire.clusterNameBytesMax, "cluster name too long")
            Self.writeHeader(type: .hello, bodyBytes: self.bodyBytes, into: &buffer)
            buffer.writeInteger(node.rawValue, endianness: .little)
            buffer.writeBytes(nonce)
            buffer.writeString(clusterName)
        case .challenge(let node, let nonce, let mac):
            precondition(nonce.count == PeerWire.nonceBytes && mac.count == PeerWire.macBytes)
            Self.writeHeader(type: .challenge, bodyBytes: PeerWire.challengeBytes, into: &buffer)
            buffer.writeInteger(node.rawValue, endianness: .little)
            buffer.writeBytes(nonce)
            buffer.writeBytes(mac)
        case .proof(let mac):
            precondition(mac.count == PeerWire.macBytes)
            Self.writeHeader(type: .proof, bodyBytes: PeerWire.proofBytes, into: &buffer)
            buffer.writeBytes(mac)
        case .accept:
            Self.writeHeader(type: .accept, bodyBytes: 0, into: &buffer)
        case .data(let shard, let payload):
            Self.encodeData(shard: shard, payload: payload, into: &buffer)
        }
    }

    /// Appends a Data frame without building a `PeerFrame` first (the send path).
    static func encodeData(shard: UInt64, payload: [UInt8], into buffer: inout ByteBuffer) {
        Self.writeHeader(type: .data, bodyBytes: PeerWire.dataFixedBytes + payload.count, into: &buffer)
        buffer.writeInteger(shard, endianness: .little)
        buffer.writeBytes(payload)
    }

    private static func writeHeader(type: PeerFrameType, bodyBytes: Int, into buffer: inout ByteBuffer) {
        precondition(bodyBytes <= Int(UInt32.max), "frame body too large for a u32 length")
        buffer.writeInteger(UInt32(bodyBytes), endianness: .little)
        buffer.writeInteger(type.rawValue)
    }
}

/// Why the decoder refused the byte stream. Every case closes the connection.
public enum PeerFrameError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The length field exceeds `frameBytesMax` (checked before any of the body is buffered).
    case frameTooLarge(length: UInt32, max: Int)
    /// The type byte is not in the frame table.
    case unknownType(UInt8)
    /// A handshake frame whose length does not fit its type, or a Data frame shorter than its shard field,
    /// or a Hello whose cluster name is not UTF-8.
    case malformed(PeerFrameType, length: UInt32)
    /// A Data frame on a connection that may not carry one: before authentication, or on an outbound connection.
    case dataNotAllowed

    public var description: String {
        switch self {
        case .frameTooLarge(let length, let max): "frame length \(length) exceeds frameBytesMax \(max)"
        case .unknownType(let type): "unknown frame type 0x\(String(type, radix: 16))"
        case .malformed(let type, let length): "malformed \(type) frame (length \(length))"
        case .dataNotAllowed: "application frame before authentication or on an outbound connection"
        }
    }
}

/// Splits the byte stream into `PeerFrame`s.
///
/// The header is validated as soon as its 5 bytes arrive, before the body is buffered: an unknown type, a
/// length over `frameBytesMax`, a handshake frame of the wrong size, or a Data frame while
/// `dataFramesAllowed` is false fails at once, so a peer can never make this side buffer more than
/// `frameBytesMax + 5` bytes for one frame — and an unauthenticated peer no more than a Hello.
///
/// A class so the connection handler can flip `dataFramesAllowed` after authentication; both live on the
/// channel's event loop and are never shared across threads (hence not `Sendable`).
public final class PeerFrameDecoder: ByteToMessageDecoder {
    public typealias InboundOut = PeerFrame

    /// Largest accepted `length` field.
    public let frameBytesMax: Int
    /// Data frames are rejected until the connection handler sets this (listener side, after Accept).
    public var dataFramesAllowed: Bool

    public init(frameBytesMax: Int = PeerWire.frameBytesMaxDefault, dataFramesAllowed: Bool = false) {
        precondition(frameBytesMax >= PeerWire.helloFixedBytes + PeerWire.clusterNameBytesMax)
        self.frameBytesMax = frameBytesMax
        self.dataFramesAllowed = dataFramesAllowed
    }

    public func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let frame = try self.decodeFrame(&buffer) else { return .needMoreData }
        context.fireChannelRead(NIOAny(frame))
        return .continue
    }

    public func decodeLast(
        context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool
    ) throws -> DecodingState {
        // A partial frame at EOF is simply discarded: the connection is gone either way.
        try self.decode(context: context, buffer: &buffer)
    }

    /// Decodes one frame from the front of `buffer`, or returns nil (consuming nothing) when more bytes are
    /// needed. Throws on a protocol violation; the caller must then close the connection.
    public func decodeFrame(_ buffer: inout ByteBuffer) throws(PeerFrameError) -> PeerFrame? {
        guard
            let length = buffer.getInteger(at: buffer.readerIndex, endianness: .little, as: UInt32.self),
            let typeByte = buffer.getInteger(at: buffer.readerIndex + 4, as: UInt8.self)
        else { return nil }
        guard let type = PeerFrameType(rawValue: typeByte) else { throw .unknownType(typeByte) }
        guard Int(length) <= self.frameBytesMax else { throw .frameTooLarge(length: length, max: self.frameBytesMax) }
        try self.validateLength(type: type, length: length)
        let bodyBytes = Int(length)
        guard buffer.readableBytes >= PeerWire.headerBytes + bodyBytes else { return nil }
        buffer.moveReaderIndex(forwardBy: PeerWire.headerBytes)
        guard var body = buffer.readSlice(length: bodyBytes) else { return nil }  // checked above
        return try Self.decodeBody(type: type, length: length, body: &body)
    }

    private func validateLength(type: PeerFrameType, length: UInt32) throws(PeerFrameError) {
        let ok: Bool
        switch type {
        case .hello:
            ok = length >= PeerWire.helloFixedBytes && length <= PeerWire.helloFixedBytes + PeerWire.clusterNameBytesMax
        case .challenge: ok = length == PeerWire.challengeBytes
        case .proof: ok = length == PeerWire.proofBytes
        case .accept: ok = length == 0
        case .data:
            guard self.dataFramesAllowed else { throw .dataNotAllowed }
            ok = length >= PeerWire.dataFixedBytes
        }
        guard ok else { throw .malformed(type, length: length) }
    }

    private static func decodeBody(
        type: PeerFrameType, length: UInt32, body: inout ByteBuffer
    ) throws(PeerFrameError) -> PeerFrame {
        // Lengths were validated against the type, so the reads below cannot run short; guard anyway.
        switch type {
        case .hello:
            guard
                let node = body.readInteger(endianness: .little, as: UInt64.self),
                let nonce = body.readBytes(length: PeerWire.nonceBytes),
                let nameBytes = body.readBytes(length: body.readableBytes)
            else { throw .malformed(type, length: length) }
            let name = String(decoding: nameBytes, as: UTF8.self)
            guard name.utf8.elementsEqual(nameBytes) else { throw .malformed(type, length: length) }
            return .hello(node: NodeID(node), clusterName: name, nonce: nonce)
        case .challenge:
            guard
                let node = body.readInteger(endianness: .little, as: UInt64.self),
                let nonce = body.readBytes(length: PeerWire.nonceBytes),
                let mac = body.readBytes(length: PeerWire.macBytes)
            else { throw .malformed(type, length: length) }
            return .challenge(node: NodeID(node), nonce: nonce, mac: mac)
        case .proof:
            guard let mac = body.readBytes(length: PeerWire.macBytes) else { throw .malformed(type, length: length) }
            return .proof(mac: mac)
        case .accept:
            return .accept
        case .data:
            guard
                let shard = body.readInteger(endianness: .little, as: UInt64.self),
                let payload = body.readBytes(length: body.readableBytes)
            else { throw .malformed(type, length: length) }
            return .data(shard: shard, payload: payload)
        }
    }
}
