import Foundation

/// Clients outside the namespaces: writers append unique payloads through random nodes, readers follow
/// streams by cursor through random nodes. Even-numbered writers send no request key: a payload whose
/// outcome is unknown is never sent again (a retry could write it twice). Odd-numbered writers send each
/// payload with an `Idempotency-Key` and retry an unknown outcome with the same key (through any node,
/// until acknowledged or the run ends): the checker then requires each of those payloads exactly once.
/// Every fourth writer (3, 7, ...) writes `fanout` records (keyed, retried the same way) naming a stream
/// from `Checker.derivedStreamBase` in another shard: the relay of the source shard's leader copies each
/// one there, and the checker requires every fan-out record's derived record exactly once.
struct Workload: Sendable {
    let client: HTTPClient
    let nodes: [Int]
    let shards: Int
    let streams = 4
    let history: History

    func writer(_ process: Int, until end: ContinuousClock.Instant, seed: UInt64) async {
        var rng = SplitMix(seed: seed ^ UInt64(process) &* 0x51_7CC1_B727_220A)
        var n = 0
        while ContinuousClock.now < end {
            n += 1
            let shard = Int(rng.next() % UInt64(shards))
            let stream = 1 + Int(rng.next() % UInt64(streams))
            let keyed = process % 2 == 1
            let relayed = process % 4 == 3 && shards > 1
            let value = relayed ? "r\(process)-\(n)" : keyed ? "k\(process)-\(n)" : "w\(process)-\(n)"
            let body: [UInt8]
            if relayed {
                let destination = UInt64((shard + 1 + Int(rng.next() % UInt64(shards - 1))) % shards)
                var f: [UInt8] = [1, 0]
                withUnsafeBytes(of: destination.littleEndian) { f.append(contentsOf: $0) }
                withUnsafeBytes(of: (Checker.derivedStreamBase + UInt64(stream)).littleEndian) { f.append(contentsOf: $0) }
                f += Array(value.utf8)
                body = Array(#"{"records":[{"stream":\#(stream),"type":6,"payload_b64":"\#(Data(f).base64EncodedString())"}]}"#.utf8)
            } else {
                body = Array(#"{"records":[{"stream":\#(stream),"payload":"\#(value)"}]}"#.utf8)
            }
            // A definite failure (no connection: nothing was sent) is retried on another node, up to three
            // nodes; an unknown outcome never is (a retry could write the payload twice), unless the write
            // carries a key: then it is retried until acknowledged, refused, or the run is over.
            var tried: [Int] = []
            var unknownRetries = 0
            attempts: while tried.count < 3 || (keyed && unknownRetries > 0 && unknownRetries < 40 && ContinuousClock.now < end) {
                let untried = nodes.filter { !tried.contains($0) }
                let node = rng.pick(untried.isEmpty ? nodes : untried)
                tried.append(node)
                await history.invoke(process: process, shard: shard, stream: stream, value: value, node: node)
                let outcome = await client.request(
                    .POST, host: TestNetwork.address(node), port: Cluster.apiPort, path: "/api/v1/shards/\(shard)/append", body: body,
                    headers: keyed ? [("Idempotency-Key", value)] : [], timeout: .seconds(5))
                if keyed {
                    // Unknown outcomes of a keyed write: recorded (it may have landed), then sent again.
                    var retry: String?
                    switch outcome {
                    case .response(let status, let b) where status >= 500: retry = "\(status) \(String(decoding: b.prefix(200), as: UTF8.self))"
                    case .failed(let why) where !why.hasPrefix("connect:"): retry = why
                    default: break
                    }
                    if let why = retry {
                        await history.info(process: process, value: value, node: node, error: why)
                        unknownRetries += 1
                        try? await Task.sleep(for: .milliseconds(200))
                        continue attempts
                    }
                }
                switch outcome {
                case .response(200, let b):
                    let obj = (try? JSONSerialization.jsonObject(with: Data(b))) as? [String: Any]
                    if let recs = obj?["records"] as? [[String: Any]], let r = recs.first,
                        let index = (r["index"] as? NSNumber)?.uint64Value, let seq = (r["seq"] as? NSNumber)?.uint64Value
                    {
                        await history.ok(process: process, shard: shard, value: value, node: node, index: index, seq: seq)
                    } else {
                        await history.info(process: process, value: value, node: node, error: "200 with an unreadable body")
                    }
                    break attempts
                case .response(let status, let b) where status >= 400 && status < 500:
                    await history.fail(process: process, value: value, node: node, status: status, error: String(decoding: b, as: UTF8.self))
                    break attempts
                case .response(let status, let b):
                    await history.info(process: process, value: value, node: node, error: "\(status) \(String(decoding: b.prefix(300), as: UTF8.self))")
                    break attempts
                case .failed(let why) where why.hasPrefix("connect:"):
                    // No connection, so nothing was sent: a definite failure; try another node.
                    await history.fail(process: process, value: value, node: node, status: 0, error: why)
                case .failed(let why):
                    await history.info(process: process, value: value, node: node, error: why)
                    break attempts
                }
            }
            try? await Task.sleep(for: rng.millis(5...25))
        }
    }

    func reader(_ process: Int, shard: Int, stream: Int, until end: ContinuousClock.Instant, seed: UInt64) async {
        var rng = SplitMix(seed: seed ^ 0xAEAD ^ UInt64(process))
        var cursor: UInt64 = 1
        while ContinuousClock.now < end {
            let node = rng.pick(nodes)
            let outcome = await client.request(
                .GET, host: TestNetwork.address(node), port: Cluster.apiPort,
                path: "/api/v1/shards/\(shard)/streams/\(stream)?cursor=\(cursor)&limit=200", timeout: .seconds(3))
            if case .response(200, let b) = outcome,
                let obj = (try? JSONSerialization.jsonObject(with: Data(b))) as? [String: Any],
                let recs = obj["records"] as? [[String: Any]]
            {
                let records: [(seq: UInt64, payload: String)] = recs.compactMap { r in
                    guard let seq = (r["seq"] as? NSNumber)?.uint64Value, let p = r["payload_b64"] as? String,
                        let d = Data(base64Encoded: p)
                    else { return nil }
                    return (seq, String(decoding: d, as: UTF8.self))
                }
                await history.read(process: process, shard: shard, stream: stream, cursor: cursor, node: node, records: records)
                if let last = records.last, last.seq >= cursor { cursor = last.seq + 1 }
            }
            try? await Task.sleep(for: rng.millis(30...80))
        }
    }
}
