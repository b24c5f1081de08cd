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
    /// Burst batches (Burst.swift): acknowledged, definitely failed, or of unknown outcome, by batch key.
    private(set) var bursts = Checker.Bursts()
    /// Hostile requests (Hostile.swift) and what they got.
    private(set) var hostile = HostileTally()
    private(set) var reads = 0
    private(set) var recordsRead = 0
    /// Chat sends (Chat.swift) by client_msg_id, with what their attempts got.
    private(set) var chat: [String: ChatChecker.Send] = [:]
    /// The chat writers' read-your-writes reads (one after each acknowledgement).
    private(set) var chatReads: [ChatChecker.Read] = []

    /// Group sends (GroupChat.swift) by client_msg_id, and the membership changes the driver made.
    private(set) var groupSends: [String: GroupChatChecker.Send] = [:]
    private(set) var groupChanges: [GroupChatChecker.Change] = []

    /// The nemesis's availability probes (one write through each other node to each shard during a
    /// one-node fault) with their answers, and those faults: the rule "writes go on" (Availability.swift).
    private(set) var probes: [Availability.Attempt] = []
    private var openProbe: [String: Int] = [:]
    private(set) var faults: [Availability.Fault] = []

    init(path: String) throws {
        _ = FileManager.default.createFile(atPath: path, contents: nil)
        guard let h = FileHandle(forWritingAtPath: path) else { throw HarnessError("cannot write \(path)") }
        handle = h
    }

    func write(_ event: sending [String: Any]) {
        var e = event
        e["t"] = (now() * 1000).rounded() / 1000
        if let d = try? JSONSerialization.data(withJSONObject: e, options: [.sortedKeys]) {
            handle.write(d)
            handle.write(Data([0x0A]))
        }
    }

    /// Seconds since the run began (the `t` of the events).
    func now() -> Double { Date().timeIntervalSince(start) }

    func fault(_ f: Availability.Fault) { faults.append(f) }

    /// A probe's write is an append like any other (checked as one), and its answer is also kept here.
    func probeInvoke(process: Int, shard: Int, stream: Int, value: String, node: Int) {
        openProbe[value] = probes.count
        probes.append(Availability.Attempt(t: now(), node: node, shard: shard, ok: nil))
        invoke(process: process, shard: shard, stream: stream, value: value, node: node)
    }

    private func answered(_ value: String, ok: Bool) {
        if let k = openProbe.removeValue(forKey: value) { probes[k].ok = ok }
    }

    func invoke(process: Int, shard: Int, stream: Int, value: String, node: Int) {
        write(["op": "append", "type": "invoke", "process": process, "shard": shard, "stream": stream, "value": value, "node": node])
    }

    func ok(process: Int, shard: Int, value: String, node: Int, index: UInt64, seq: UInt64) {
        acked[value] = Ack(shard: shard, index: index, seq: seq)
        failed.remove(value)  // an earlier attempt that never connected
        answered(value, ok: true)
        write(["op": "append", "type": "ok", "process": process, "shard": shard, "value": value, "node": node, "index": index, "seq": seq])
    }

    func fail(process: Int, value: String, node: Int, status: UInt, error: String) {
        failed.insert(value)
        answered(value, ok: false)
        write(["op": "append", "type": "fail", "process": process, "value": value, "node": node, "status": status, "error": error])
    }

    func info(process: Int, value: String, node: Int, error: String) {
        indeterminate.insert(value)
        failed.remove(value)
        answered(value, ok: false)
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

    // MARK: Bursts

    func burstInvoke(batch: String, shard: Int, stream: UInt64, count: Int, node: Int) {
        write(["op": "burst-append", "type": "invoke", "batch": batch, "shard": shard, "stream": stream, "count": count, "node": node])
    }

    /// An acknowledged batch: `refs` are the (index, seq) the node answered, one per record in order.
    func burstOK(batch: String, shard: Int, stream: UInt64, count: Int, node: Int, refs: [(index: UInt64, seq: UInt64)]) {
        bursts.failed.removeValue(forKey: batch)
        var e: [String: Any] = ["op": "burst-append", "type": "ok", "batch": batch, "shard": shard, "node": node, "count": count]
        guard let first = refs.first, refs.count == count,
            refs.enumerated().allSatisfy({ $1.index == first.index + UInt64($0) && $1.seq == first.seq + UInt64($0) })
        else {
            // Still acknowledged (every record must be in the logs), but where is not one range.
            bursts.acked[batch] = Checker.BurstAck(shard: shard, stream: stream, firstIndex: 0, firstSeq: 0, count: count)
            bursts.irregular.append("batch \(batch): \(count) records acknowledged by node \(node) with \(refs.count) refs that are not one contiguous range of indexes and seqs")
            e["irregular"] = true
            write(e)
            return
        }
        bursts.acked[batch] = Checker.BurstAck(shard: shard, stream: stream, firstIndex: first.index, firstSeq: first.seq, count: count)
        e["first_index"] = first.index
        e["first_seq"] = first.seq
        write(e)
    }

    func burstFail(batch: String, count: Int, node: Int, status: UInt, error: String) {
        bursts.failed[batch] = count
        write(["op": "burst-append", "type": "fail", "batch": batch, "node": node, "status": status, "error": String(error.prefix(300))])
    }

    func burstInfo(batch: String, count: Int, node: Int, error: String) {
        bursts.indeterminate[batch] = count
        bursts.failed.removeValue(forKey: batch)
        write(["op": "burst-append", "type": "info", "batch": batch, "node": node, "error": String(error.prefix(300))])
    }

    // MARK: Chat

    /// One attempt of a chat send (the same client_msg_id each time).
    func chatInvoke(writer: Int, key: String, from: UInt64, to: UInt64, content: String, node: Int) {
        var s = chat[key] ?? ChatChecker.Send(key: key, writer: writer, from: from, to: to, content: content)
        s.attempts += 1
        chat[key] = s
        write(["op": "chat-send", "type": "invoke", "process": 200 + writer, "key": key, "from": from, "to": to, "content": content, "node": node, "attempt": s.attempts])
    }

    /// 200: the message and its place in the conversation.
    /// 200: the message and its place in the conversation (a later 200 for the same client_msg_id, a
    /// replay, is kept apart: it must name the same message).
    /// `at`: when the answer came (seconds since the run began, stamped by the caller).
    func chatOK(key: String, node: Int, messageID: UInt64, seq: UInt64, at: Double) {
        let replay = chat[key]?.messageID != nil
        if replay {
            chat[key]?.replays.append(messageID)
        } else {
            chat[key]?.messageID = messageID
            chat[key]?.seq = seq
            chat[key]?.ackedAt = at
        }
        write(["op": "chat-send", "type": replay ? "replay-ok" : "ok", "key": key, "node": node, "message_id": messageID, "seq": seq])
    }

    /// An attempt that wrote nothing: refused (4xx; `final` unless 429) or no connection (status 0).
    func chatFail(key: String, node: Int, status: UInt, error: String, final: Bool) {
        if final { chat[key]?.refusal = "\(status) \(error.prefix(200))" }
        write(["op": "chat-send", "type": final ? "fail" : "retry", "key": key, "node": node, "status": status, "error": String(error.prefix(300))])
    }

    /// An attempt of unknown outcome (5xx, timeout, connection lost after sending): may have landed.
    func chatInfo(key: String, node: Int, error: String) {
        chat[key]?.unknown = true
        write(["op": "chat-send", "type": "info", "key": key, "node": node, "error": String(error.prefix(300))])
    }

    /// The newest history page the sender read right after an acknowledgement (`op: chat-ryw`: `ok` a
    /// 200 with its page, `fail` anything else).
    func chatRead(_ r: ChatChecker.Read, writer: Int) {
        chatReads.append(r)
        var e: [String: Any] = [
            "op": "chat-ryw", "type": r.page != nil ? "ok" : "fail", "process": 200 + writer, "key": r.key, "viewer": r.viewer, "peer": r.peer,
            "node": r.node, "message_id": r.messageID, "seq": r.seq, "status": r.status,
        ]
        if let page = r.page {
            e["ids"] = page.map(\.id)
            e["seqs"] = page.map(\.seq)
            e["more"] = r.more
            e["found"] = r.found
        }
        if !r.unreachable.isEmpty { e["unreachable"] = r.unreachable }
        if let error = r.error { e["error"] = String(error.prefix(300)) }
        write(e)
    }

    // MARK: Groups

    func groupInvoke(writer: Int, key: String, from: UInt64, content: String, node: Int) {
        var s = groupSends[key] ?? GroupChatChecker.Send(key: key, writer: writer, from: from, content: content)
        s.attempts += 1
        groupSends[key] = s
        write(["op": "group-send", "type": "invoke", "process": 300 + writer, "key": key, "from": from, "content": content, "node": node, "attempt": s.attempts])
    }

    /// 200 (a later 200 for the same client_msg_id, a replay, must name the same message).
    func groupOK(key: String, node: Int, messageID: UInt64, seq: UInt64) {
        let replay = groupSends[key]?.messageID != nil
        if replay {
            groupSends[key]?.replays.append(messageID)
        } else {
            groupSends[key]?.messageID = messageID
            groupSends[key]?.seq = seq
        }
        write(["op": "group-send", "type": replay ? "replay-ok" : "ok", "key": key, "node": node, "message_id": messageID, "seq": seq])
    }

    func groupFail(key: String, node: Int, status: UInt, error: String, final: Bool) {
        if final { groupSends[key]?.refusal = "\(status) \(error.prefix(200))" }
        write(["op": "group-send", "type": final ? "fail" : "retry", "key": key, "node": node, "status": status, "error": String(error.prefix(300))])
    }

    func groupInfo(key: String, node: Int, error: String) {
        groupSends[key]?.unknown = true
        write(["op": "group-send", "type": "info", "key": key, "node": node, "error": String(error.prefix(300))])
    }

    func groupChange(_ c: GroupChatChecker.Change) {
        groupChanges.append(c)
        var e: [String: Any] = [
            "op": "group-change", "type": c.landed ? "ok" : c.unknown ? "info" : "fail", "kind": c.kind.rawValue, "user": c.user, "attempts": c.attempts,
        ]
        if let r = c.refusal { e["error"] = r }
        write(e)
    }

    // MARK: Hostile clients

    /// One hostile request and its answer. A 4xx is what it must get; a 2xx (taken) or 5xx (it got past
    /// the checks into the write path) is a finding; no answer (the node was down, paused or cut off) is
    /// only counted.
    func hostile(kind: String, marker: String, node: Int, path: String, expected: UInt, outcome: HTTPOutcome) {
        hostile.sent += 1
        hostile.byKind[kind, default: 0] += 1
        var e: [String: Any] = ["op": "hostile", "kind": kind, "marker": marker, "node": node, "path": path, "expected_status": expected]
        switch outcome {
        case .response(let status, let body):
            let obj = (try? JSONSerialization.jsonObject(with: Data(body.prefix(4096)))) as? [String: Any]
            let code = (obj?["error"] as? [String: Any])?["code"] as? String ?? ""
            e["status"] = status
            e["code"] = code
            if (400..<500).contains(status) {
                hostile.refused += 1
                e["type"] = "refused"
                if status != expected {
                    hostile.otherStatus.append("\(kind) \(marker) via node \(node): \(status) \(code), the contract says \(expected)")
                }
            } else {
                e["type"] = "accepted"
                hostile.accepted.append("\(kind) \(marker) via node \(node) (\(path)): \(status) \(String(decoding: body.prefix(200), as: UTF8.self))")
            }
        case .failed(let why):
            hostile.unanswered += 1
            e["type"] = "no-answer"
            e["error"] = String(why.prefix(300))
        }
        write(e)
    }

    func close() { try? handle.close() }
}

/// What the hostile clients sent and got.
struct HostileTally: Sendable {
    var sent = 0
    var refused = 0
    var unanswered = 0
    /// 2xx or 5xx answers: each is a finding.
    var accepted: [String] = []
    /// Refused, but with another 4xx than the contract names (reported, not a finding).
    var otherStatus: [String] = []
    var byKind: [String: Int] = [:]
}
