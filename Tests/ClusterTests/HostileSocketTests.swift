import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Hostile clients of `/api/v1/ws` on a plain TCP socket (no WebSocket library in between that would
/// read or answer for them): a client that pings without reading, one that sends an oversized frame, and
/// one that floods text frames.
extension Clusters {
    @Suite(.serialized) struct HostileSocketTests {
        /// A blocking TCP connection to 127.0.0.1 speaking just enough WebSocket to attack.
        final class RawSocket {
            let fd: Int32

            init(port: Int) throws {
                fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
                guard fd >= 0 else { throw POSIXError(.EMFILE) }
                var addr = sockaddr_in()
                addr.sin_family = sa_family_t(AF_INET)
                addr.sin_port = in_port_t(UInt16(port).bigEndian)
                addr.sin_addr.s_addr = inet_addr("127.0.0.1")
                let r = withUnsafePointer(to: &addr) { p in
                    p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
                }
                guard r == 0 else {
                    close(fd)
                    throw POSIXError(.ECONNREFUSED)
                }
                var timeout = timeval(tv_sec: 30, tv_usec: 0)
                setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            }

            deinit { close(fd) }

            /// False once the server is gone (no SIGPIPE).
            @discardableResult
            func send(_ bytes: [UInt8]) -> Bool {
                var sent = 0
                while sent < bytes.count {
                    let n = bytes[sent...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                    guard n > 0 else { return false }
                    sent += n
                }
                return true
            }

            /// Everything until the server closes or 30 s pass without a byte.
            func readAll() -> [UInt8] {
                var out: [UInt8] = []
                var buffer = [UInt8](repeating: 0, count: 1 << 16)
                while true {
                    let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                    guard n > 0 else { return out }
                    out += buffer[0..<n]
                }
            }

            func upgrade() -> Bool {
                send(Array("GET /api/v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".utf8))
            }

            /// A client frame (masked, with a zero key: the payload goes as it is).
            static func frame(opcode: UInt8, _ payload: [UInt8]) -> [UInt8] {
                var f: [UInt8] = [0x80 | opcode]
                if payload.count < 126 {
                    f.append(0x80 | UInt8(payload.count))
                } else {
                    f += [0x80 | 126, UInt8(payload.count >> 8), UInt8(payload.count & 0xFF)]
                }
                return f + [0, 0, 0, 0] + payload
            }
        }

        /// The close codes of the server's close frames in what it wrote after the upgrade response.
        static func closeCodes(_ bytes: [UInt8]) -> [Int] {
            guard let end = bytes.indices.dropLast(3).first(where: { bytes[$0...].starts(with: Array("\r\n\r\n".utf8)) }) else { return [] }
            var i = end + 4
            var codes: [Int] = []
            while i + 2 <= bytes.count {
                let opcode = bytes[i] & 0x0F
                var length = Int(bytes[i + 1] & 0x7F)
                var at = i + 2
                if length == 126 {
                    guard at + 2 <= bytes.count else { break }
                    length = Int(bytes[at]) << 8 | Int(bytes[at + 1])
                    at += 2
                } else if length == 127 {
                    guard at + 8 <= bytes.count else { break }
                    length = bytes[at..<at + 8].reduce(0) { $0 << 8 | Int($1) }
                    at += 8
                }
                if opcode == 0x8, length >= 2, at + 2 <= bytes.count { codes.append(Int(bytes[at]) << 8 | Int(bytes[at + 1])) }
                i = at + length
            }
            return codes
        }

        /// A client that sends protocol pings and never reads is closed with 4000 once the pongs it does
        /// not take pass its session's queue (16 here), instead of the server buffering pongs for ever;
        /// a frame over 16 KiB is refused with 1009 by the frame decoder.
        @Test(.timeLimit(.minutes(3))) func pingsWithoutReadingAndOversizedFramesAreRefused() async throws {
            let c = try ClusterProcess(name: "wshostile", nodes: 3, shards: 2, tables: "[delivery]\nsession_queue_max = 16")
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<2 { _ = try #require(await c.leader(of: UInt64(s))) }
            let user = try #require(await c.register("mallory"))
            _ = user
            let token = try #require(await c.login("mallory"))
            let port = try #require(c.apiPorts[1])

            let flood = try RawSocket(port: port)
            #expect(flood.upgrade())
            flood.send(RawSocket.frame(opcode: 0x1, Array(#"{"type":"auth","token":"\#(token)"}"#.utf8)))
            flood.send(RawSocket.frame(opcode: 0x1, Array(#"{"type":"resume","cursor":"0"}"#.utf8)))
            // Protocol pings count against the frame rate like data frames: a flood is closed with 1008
            // once past the burst of 400 (before, only when 12 MiB of pongs owed filled the queue: 4000).
            let ping = RawSocket.frame(opcode: 0x9, [UInt8](repeating: 0x70, count: 125))
            flood.send(Array([[UInt8]](repeating: ping, count: 1000).joined()))
            let codes = Self.closeCodes(flood.readAll())
            #expect(codes == [1008], "closed with 1008 after 1 000 pings at once: \(codes)")
            // Pongs nobody asked for are frames too.
            let pongs = try RawSocket(port: port)
            #expect(pongs.upgrade())
            pongs.send(RawSocket.frame(opcode: 0x1, Array(#"{"type":"auth","token":"\#(token)"}"#.utf8)))
            let pong = RawSocket.frame(opcode: 0xA, [UInt8](repeating: 0x71, count: 16))
            pongs.send(Array([[UInt8]](repeating: pong, count: 1000).joined()))
            #expect(Self.closeCodes(pongs.readAll()) == [1008])

            let big = try RawSocket(port: port)
            #expect(big.upgrade())
            big.send(RawSocket.frame(opcode: 0x1, Array(#"{"type":"auth","token":"\#(token)"}"#.utf8)))
            big.send(RawSocket.frame(opcode: 0x1, Array(#"{"type":"ping","pad":"\#(String(repeating: "x", count: 20_000))"}"#.utf8)))
            #expect(Self.closeCodes(big.readAll()) == [1009])

            // A client that sends text frames as fast as it can (each one parsed on an event loop other
            // sessions share) is closed with 1008 once past its burst of 400.
            let chatty = try RawSocket(port: port)
            #expect(chatty.upgrade())
            chatty.send(RawSocket.frame(opcode: 0x1, Array(#"{"type":"auth","token":"\#(token)"}"#.utf8)))
            chatty.send(RawSocket.frame(opcode: 0x1, Array(#"{"type":"resume","cursor":"0"}"#.utf8)))
            let ack = RawSocket.frame(opcode: 0x1, Array(#"{"type":"ack","cursor":"0"}"#.utf8))
            chatty.send(Array([[UInt8]](repeating: ack, count: 1000).joined()))
            #expect(Self.closeCodes(chatty.readAll()) == [1008])
        }

        /// A node shutting down (SIGTERM) closes every device session with 4000 ("resume elsewhere"),
        /// whatever its state: one that has only sent its token, and one that resumed.
        @Test(.timeLimit(.minutes(3))) func aNodeShuttingDownTellsEverySessionToResume() async throws {
            let c = try ClusterProcess(name: "wsquiesce", nodes: 3, shards: 2)
            try c.startAll()
            defer { c.stopAll() }
            for s in 0..<2 { _ = try #require(await c.leader(of: UInt64(s))) }
            _ = try #require(await c.register("dora"))
            let token = try #require(await c.login("dora"))
            let port = try #require(c.apiPorts[1])
            let authOnly = try RawSocket(port: port)
            #expect(authOnly.upgrade())
            authOnly.send(RawSocket.frame(opcode: 0x1, Array(#"{"type":"auth","token":"\#(token)"}"#.utf8)))
            let live = try RawSocket(port: port)
            #expect(live.upgrade())
            live.send(RawSocket.frame(opcode: 0x1, Array(#"{"type":"auth","token":"\#(token)"}"#.utf8)))
            live.send(RawSocket.frame(opcode: 0x1, Array(#"{"type":"resume","cursor":"0"}"#.utf8)))
            try await Task.sleep(for: .seconds(1))
            #expect(c.terminate(1), "node 1 exits after SIGTERM")
            #expect(Self.closeCodes(authOnly.readAll()) == [4000])
            #expect(Self.closeCodes(live.readAll()) == [4000])
        }
    }
}
