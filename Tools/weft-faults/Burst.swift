import Foundation

/// The payload of record `i` of burst batch `batch`: `B<batch>:<i>:` then seeded filler up to `size`
/// bytes (base64 alphabet, so LZ4 keeps it near its size and segments fill). Deterministic, so the
/// checker recognises every burst record exactly without keeping any of them.
enum BurstPayload {
    static let size = 100
    static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

    static func make(batch: String, i: Int) -> [UInt8] {
        var out = Array("B\(batch):\(i):".utf8)
        var h: UInt64 = 0xCBF2_9CE4_8422_2325
        for b in batch.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01B3 }
        var rng = SplitMix(seed: h ^ (UInt64(i) &* 0x9E37_79B9_7F4A_7C15))
        out.reserveCapacity(size)
        while out.count < size {
            var r = rng.next()
            for _ in 0..<10 where out.count < size {
                out.append(alphabet[Int(r & 63)])
                r >>= 6
            }
        }
        return out
    }

    /// (batch, i) of a payload that has the shape of a burst record, else nil.
    static func parse(_ p: [UInt8]) -> (batch: String, i: Int)? {
        guard p.count == size, p.first == UInt8(ascii: "B"), let c1 = p[1...].firstIndex(of: UInt8(ascii: ":")), c1 > 1,
            let c2 = p[(c1 + 1)...].firstIndex(of: UInt8(ascii: ":")), c2 > c1 + 1, c2 - c1 <= 6,
            p[1..<c1].allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || $0 == UInt8(ascii: ".") }),
            let i = Int(String(decoding: p[(c1 + 1)..<c2], as: UTF8.self))
        else { return nil }
        return (String(decoding: p[1..<c1], as: UTF8.self), i)
    }
}

/// One burst phase: `lanes` requests in flight, each a binary batch (`u64 stream | u32 length | payload`,
/// little-endian) of `batch` records to one shard and stream, back to back at full speed until `end`
/// (which the nemesis may move) or until `maxRecords` were sent. Batches are recorded like single writes: acknowledged (with the
/// range of indexes and seqs the node answered), failed (4xx, or no connection: tried on another node),
/// or indeterminate (never retried).
struct BurstWriter: Sendable {
    let client: HTTPClient
    let history: History
    let phase: Int
    let shard: Int
    let stream: UInt64
    let batch: Int
    let lanes: Int

    final class Tally: @unchecked Sendable {
        private let lock = NSLock()
        private var sent = 0
        private(set) var acked = 0
        private(set) var batches = 0
        private(set) var indeterminate = 0
        func reserve(_ n: Int, max: Int) -> Bool {
            lock.withLock {
                guard sent + n <= max else { return false }
                sent += n
                return true
            }
        }
        func ack(_ n: Int) { lock.withLock { acked += n; batches += 1 } }
        func unknown() { lock.withLock { indeterminate += 1 } }
        var snapshot: (acked: Int, batches: Int, indeterminate: Int) { lock.withLock { (acked, batches, indeterminate) } }
    }

    /// Sends to nodes drawn from `targets` (the leader, and other nodes that forward).
    func run(targets: @escaping @Sendable () -> [Int], until end: @escaping @Sendable () -> ContinuousClock.Instant, maxRecords: Int, seed: UInt64) async -> Tally {
        let tally = Tally()
        await withTaskGroup(of: Void.self) { g in
            for lane in 0..<lanes {
                g.addTask {
                    var rng = SplitMix(seed: seed ^ UInt64(phase) &* 0x2545_F491_4F6C_DD1D ^ UInt64(lane))
                    var k = 0
                    while ContinuousClock.now < end(), tally.reserve(batch, max: maxRecords) {
                        k += 1
                        await send(key: "\(phase).\(lane).\(k)", targets: targets(), rng: &rng, tally: tally)
                    }
                }
            }
        }
        return tally
    }

    func body(key: String) -> [UInt8] {
        var body: [UInt8] = []
        body.reserveCapacity(batch * (12 + BurstPayload.size))
        for i in 0..<batch {
            let p = BurstPayload.make(batch: key, i: i)
            withUnsafeBytes(of: stream.littleEndian) { body += $0 }
            withUnsafeBytes(of: UInt32(p.count).littleEndian) { body += $0 }
            body += p
        }
        return body
    }

    func send(key: String, targets: [Int], rng: inout SplitMix, tally: Tally) async {
        let body = body(key: key)
        var tried: [Int] = []
        while tried.count < 3 {
            let untried = targets.filter { !tried.contains($0) }
            let node = rng.pick(untried.isEmpty ? targets : untried)
            tried.append(node)
            await history.burstInvoke(batch: key, shard: shard, stream: stream, count: batch, node: node)
            let outcome = await client.request(
                .POST, host: TestNetwork.address(node), port: Cluster.apiPort, path: "/api/v1/shards/\(shard)/append", body: body,
                contentType: "application/x-weft-records", timeout: .seconds(10))
            switch outcome {
            case .response(200, let b):
                let obj = (try? JSONSerialization.jsonObject(with: Data(b))) as? [String: Any]
                guard let recs = obj?["records"] as? [[String: Any]] else {
                    await history.burstInfo(batch: key, count: batch, node: node, error: "200 with an unreadable body")
                    tally.unknown()
                    return
                }
                let refs = recs.map { r in ((r["index"] as? NSNumber)?.uint64Value ?? 0, (r["seq"] as? NSNumber)?.uint64Value ?? 0) }
                await history.burstOK(batch: key, shard: shard, stream: stream, count: batch, node: node, refs: refs.map { (index: $0.0, seq: $0.1) })
                tally.ack(batch)
                return
            case .response(let status, let b) where status >= 400 && status < 500:
                await history.burstFail(batch: key, count: batch, node: node, status: status, error: String(decoding: b.prefix(300), as: UTF8.self))
                return
            case .response(let status, let b):
                await history.burstInfo(batch: key, count: batch, node: node, error: "\(status) \(String(decoding: b.prefix(300), as: UTF8.self))")
                tally.unknown()
                return
            case .failed(let why) where why.hasPrefix("connect:"):
                await history.burstFail(batch: key, count: batch, node: node, status: 0, error: why)
            case .failed(let why):
                await history.burstInfo(batch: key, count: batch, node: node, error: why)
                tally.unknown()
                return
            }
        }
    }
}
