import Foundation
import Logging
import Raft
import Testing
import WeftCore
import WeftTesting

@testable import Replication

/// Issue 8, item 10: catch-up read every sealed file whole on the shard thread and queued all of it at
/// once. The shipper reads chunk by chunk on its own thread and keeps at most a window unacknowledged.
@Suite struct CatchUpShipperTests {
    final class Wire: @unchecked Sendable {
        let lock = NSLock()
        var chunks: [(name: String, offset: UInt64, count: Int)] = []
        var messages: [Message] = []
        var events: [CatchUpShipper.Event] = []
        func with<T>(_ body: (Wire) -> T) -> T { lock.withLock { body(self) } }
    }

    func files(_ dir: TempDirectory) throws -> [(name: String, path: String)] {
        var out: [(String, String)] = []
        for (name, size) in [("00000000000000000001.seg", 10_000), ("00000000000000000001.idx", 3_000), ("00000000000000000090.seg", 0)] {
            let path = dir.path + "/" + name
            _ = FileManager.default.createFile(atPath: path, contents: Data((0..<size).map { UInt8(truncatingIfNeeded: $0) }))
            out.append((name, path))
        }
        return out
    }

    func waitFor(_ wire: Wire, _ done: (Wire) -> Bool) async throws {
        for _ in 0..<400 where !wire.with(done) { try await Task.sleep(for: .milliseconds(10)) }
    }

    @Test func keepsAtMostAWindowUnacknowledgedAndFailsWithoutAcks() async throws {
        let dir = try TempDirectory(prefix: "weft-shipper")
        defer { dir.remove() }
        let wire = Wire()
        let shipper = CatchUpShipper(
            chunkBytes: 1000, windowBytes: 3000, ackTimeoutSeconds: 0.5, logger: Logger(label: "test"),
            sendChunk: { _, _, _, name, offset, _, bytes in wire.with { $0.chunks.append((name, offset, bytes.count)) } },
            sendMessage: { _, m in wire.with { $0.messages.append(m) } },
            report: { _, _, _, e in wire.with { $0.events.append(e) } })
        shipper.start(shard: ShardID(0), to: NodeID(2), transfer: 7, files: try files(dir), snapshot: Message(kind: .snapshot, from: NodeID(1), to: NodeID(2), term: 1))
        try await waitFor(wire) { !$0.events.isEmpty }
        wire.with { w in
            #expect(w.chunks.map(\.count).reduce(0, +) <= 3000, "no more than the window without acknowledgements")
            #expect(w.messages.isEmpty, "the snapshot message never goes before its files are acknowledged")
            if case .failed = w.events.first {} else { Issue.record("expected a failure, got \(w.events)") }
        }
        #expect(shipper.running == 0)
    }

    @Test func shipsEveryFileThenTheMessageAndANewTransferReplacesTheOld() async throws {
        let dir = try TempDirectory(prefix: "weft-shipper")
        defer { dir.remove() }
        let wire = Wire()
        let box = ShipperBox()
        let shipper = CatchUpShipper(
            chunkBytes: 1000, windowBytes: 2000, ackTimeoutSeconds: 5, logger: Logger(label: "test"),
            sendChunk: { shard, to, transfer, name, offset, _, bytes in
                wire.with { $0.chunks.append((name, offset, bytes.count)) }
                // The follower acknowledges transfer 9 only: transfer 8 stalls and is replaced.
                if transfer == 9 {
                    box.shipper?.acknowledge(shard: shard, from: to, transfer: transfer, name: name, received: offset + UInt64(bytes.count), ok: true)
                }
            },
            sendMessage: { _, m in wire.with { $0.messages.append(m) } },
            report: { _, _, _, e in wire.with { $0.events.append(e) } })
        box.shipper = shipper
        let fs = try files(dir)
        var old = Message(kind: .snapshot, from: NodeID(1), to: NodeID(2), term: 1)
        old.context = 8
        shipper.start(shard: ShardID(0), to: NodeID(2), transfer: 8, files: fs, snapshot: old)
        try await waitFor(wire) { $0.chunks.count >= 2 }
        var new = old
        new.context = 9
        wire.with { $0.chunks = [] }
        shipper.start(shard: ShardID(0), to: NodeID(2), transfer: 9, files: fs, snapshot: new)
        try await waitFor(wire) { $0.events.contains(.done) }
        wire.with { w in
            #expect(w.messages.map(\.context) == [9], "only the newer transfer's message, once")
            var bytes: [String: Int] = [:]
            for c in w.chunks { bytes[c.name, default: 0] += c.count }
            #expect(bytes["00000000000000000001.seg"] ?? 0 >= 10_000)
            #expect(bytes["00000000000000000001.idx"] ?? 0 >= 3_000)
            #expect(w.chunks.contains { $0.name == "00000000000000000090.seg" && $0.count == 0 }, "an empty file is shipped too")
        }
        shipper.stop()
    }

    final class ShipperBox: @unchecked Sendable {
        var shipper: CatchUpShipper?
    }
}
