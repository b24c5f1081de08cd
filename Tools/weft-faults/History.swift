import Foundation

/// Everything that happened, as JSON lines in `<out>/history.jsonl` (one object per event, with `t`:
/// seconds since the run began), and the facts the checker needs.
actor History {
    let handle: FileHandle
    let start = Date()

    struct Ack: Sendable {
        var shard: Int
        var index: UInt64
        var seq: UInt64
    }
    /// payload -> where the acknowledging node said it was written.
    private(set) var acked: [String: Ack] = [:]
    /// Definitely not written: the last attempt got a 4xx answer or no connection at all.
    private(set) var failed: Set<String> = []
    /// Outcome unknown (timeout, connection lost, 5xx): may or may not be in the log.
    private(set) var indeterminate: Set<String> = []
    /// "shard/stream/seq" -> payload, from every cursor read (reads return committed records only, so
    /// each of these must be in every final log).
    private(set) var seen: [String: String] = [:]
    private(set) var readAnomalies: [String] = []
    private(set) var reads = 0
    private(set) var recordsRead = 0

    init(path: String) throws {
        _ = FileManager.default.createFile(atPath: path, contents: nil)
        guard let h = FileHandle(forWritingAtPath: path) else { throw HarnessError("cannot write \(path)") }
        handle = h
    }

    func write(_ event: sending [String: Any]) {
        var e = event
        e["t"] = (Date().timeIntervalSince(start) * 1000).rounded() / 1000
        if let d = try? JSONSerialization.data(withJSONObject: e, options: [.sortedKeys]) {
            handle.write(d)
            handle.write(Data([0x0A]))
        }
    }

    func invoke(process: Int, shard: Int, stream: Int, value: String, node: Int) {
        write(["op": "append", "type": "invoke", "process": process, "shard": shard, "stream": stream, "value": value, "node": node])
    }

    func ok(process: Int, shard: Int, value: String, node: Int, index: UInt64, seq: UInt64) {
        acked[value] = Ack(shard: shard, index: index, seq: seq)
        failed.remove(value)  // an earlier attempt that never connected
        write(["op": "append", "type": "ok", "process": process, "shard": shard, "value": value, "node": node, "index": index, "seq": seq])
    }

    func fail(process: Int, value: String, node: Int, status: UInt, error: String) {
        failed.insert(value)
        write(["op": "append", "type": "fail", "process": process, "value": value, "node": node, "status": status, "error": error])
    }

    func info(process: Int, value: String, node: Int, error: String) {
        indeterminate.insert(value)
        failed.remove(value)
        write(["op": "append", "type": "info", "process": process, "value": value, "node": node, "error": error])
    }

    /// A cursor read: records must continue the cursor exactly (seq == cursor, cursor + 1, ...) and agree
    /// with every earlier read of the same seq.
    func read(process: Int, shard: Int, stream: Int, cursor: UInt64, node: Int, records: [(seq: UInt64, payload: String)]) {
        reads += 1
        recordsRead += records.count
        var problems: [String] = []
        for (k, r) in records.enumerated() where r.seq != cursor + UInt64(k) {
            problems.append("read from node \(node) of shard \(shard) stream \(stream) at cursor \(cursor): record \(k) has seq \(r.seq), expected \(cursor + UInt64(k))")
            break
        }
        for r in records {
            let key = "\(shard)/\(stream)/\(r.seq)"
            if let before = seen[key], before != r.payload {
                problems.append("shard \(shard) stream \(stream) seq \(r.seq): node \(node) returned \(r.payload), an earlier read returned \(before)")
            } else {
                seen[key] = r.payload
            }
        }
        readAnomalies += problems
        var e: [String: Any] = [
            "op": "read", "type": problems.isEmpty ? "ok" : "anomaly", "process": process, "shard": shard, "stream": stream,
            "cursor": cursor, "node": node, "count": records.count,
        ]
        if let f = records.first, let l = records.last {
            e["first_seq"] = f.seq
            e["last_seq"] = l.seq
        }
        if !problems.isEmpty { e["problems"] = problems }
        write(e)
    }

    func close() { try? handle.close() }
}
