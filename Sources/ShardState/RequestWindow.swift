import WeftCore

/// The outcomes of the last `countMax` requests that carried a client's request key, derived from the log
/// like any state (Docs/state.md, "Idempotent writes").
///
/// In the log a keyed request is a `requestKey` record (`u8 key length | key | u32 n`) followed by its n
/// records, all proposed at once by one leader, so all of the same term. Applying them in order, the
/// window collects the n records' places and outcomes under the key. If an entry of another term (or
/// another key record) comes before all n have (the leader failed half way and a new leader's entries
/// follow), the request is cut short: with none of its records committed the key is forgotten (nothing
/// was written: a retry writes it), with some committed it is kept as `partial` (a retry is told which
/// records landed, and writes nothing).
///
/// Deterministic (apply order only); oldest keys are dropped first once `countMax` are kept or their
/// entries take more than `bytesMax` (counted from their contents, the same on every replica). A keyed
/// request has at most `keyedRecordsMax` records, so one key costs at most a few KiB.
public struct RequestWindow: Sendable, Equatable {
    public struct Landed: Sendable, Equatable {
        public var index: LogIndex
        public var term: Term
        public var stream: StreamID
        public var seq: StreamSeq
        public var outcome: ApplyOutcome
        public init(index: LogIndex, term: Term, stream: StreamID, seq: StreamSeq, outcome: ApplyOutcome) {
            self.index = index
            self.term = term
            self.stream = stream
            self.seq = seq
            self.outcome = outcome
        }
    }

    public struct Entry: Sendable, Equatable {
        /// Where the key record is.
        public var keyIndex: LogIndex
        /// The records that committed, in order.
        public var landed: [Landed]
        /// How many the request had (`landed.count < count`: cut short by a leader change).
        public var count: Int
        public var complete: Bool { landed.count == count }
    }

    public static let keyBytesMax = 64
    public static let keyedRecordsMax = 64
    public var countMax = 65_536
    public var bytesMax = 32 << 20
    /// What the kept entries take (`Self.cost`).
    public private(set) var bytes = 0
    var entries: [[UInt8]: Entry] = [:]
    /// Keys in the order they completed (oldest first), for eviction; `head` entries are gone.
    var order: [[UInt8]] = []
    var head = 0
    /// The request being collected: its key, term, and what landed so far.
    var open: (key: [UInt8], term: Term, entry: Entry)?

    public init() {}

    public var count: Int { entries.count }

    /// The keyed request being applied (its key record applied, not all its records yet).
    public var openRequest: (key: [UInt8], keyIndex: LogIndex, count: Int)? {
        open.map { ($0.key, $0.entry.keyIndex, $0.entry.count) }
    }

    public func lookup(_ key: [UInt8]) -> Entry? { entries[key] }

    /// The key record's payload.
    public static func keyPayload(_ key: [UInt8], count: Int) -> [UInt8] {
        var b: [UInt8] = [UInt8(min(key.count, keyBytesMax))]
        b += key.prefix(keyBytesMax)
        b.appendLE(UInt32(clamping: count))
        return b
    }

    public static func parseKey(_ payload: [UInt8]) -> (key: [UInt8], count: Int)? {
        guard let n = payload.first, payload.count == 1 + Int(n) + 4, n > 0, Int(n) <= keyBytesMax else { return nil }
        let key = Array(payload[1...Int(n)])
        var r = LEReader(Array(payload[(1 + Int(n))...]))
        guard let count = r.u32() else { return nil }
        return (key, Int(count))
    }

    /// Applies one committed record (every record, in log order) with its outcome.
    public mutating func apply(_ r: Record, outcome: ApplyOutcome) {
        if var o = open {
            if r.term == o.term && r.type != .requestKey && r.type != .relayBatch && o.entry.landed.count < o.entry.count {
                o.entry.landed.append(Landed(index: r.index, term: r.term, stream: r.stream, seq: r.seq, outcome: outcome))
                open = o
                if o.entry.complete { close() }
                return
            }
            // Cut short: something else follows the key's records.
            close()
        }
        if r.type == .requestKey, let (key, count) = Self.parseKey(r.payload) {
            open = (key, r.term, Entry(keyIndex: r.index, landed: [], count: count))
            if count == 0 { close() }
        }
    }

    mutating func close() {
        guard let o = open else { return }
        open = nil
        // None of its records committed: nothing was written, the key is forgotten (a retry writes it).
        guard !o.entry.landed.isEmpty || o.entry.count == 0 else { return }
        keep(o.key, o.entry)
    }

    /// Bytes an entry is counted as: its key, its fields, each record's place and outcome.
    static func cost(_ key: [UInt8], _ e: Entry) -> Int {
        var n = key.count + 64
        for l in e.landed {
            n += 48
            switch l.outcome {
            case .accepted(let b): n += b.count
            case .rejected(let code, let message): n += code.utf8.count + message.utf8.count
            }
        }
        return n
    }

    mutating func keep(_ key: [UInt8], _ e: Entry) {
        if let old = entries.updateValue(e, forKey: key) {
            bytes -= Self.cost(key, old)
        } else {
            order.append(key)
        }
        bytes += Self.cost(key, e)
        while (entries.count > countMax || bytes > bytesMax), head < order.count {
            let k = order[head]
            if let gone = entries.removeValue(forKey: k) { bytes -= Self.cost(k, gone) }
            head += 1
        }
        if head > 4096 && head * 2 > order.count {
            order.removeFirst(head)
            head = 0
        }
    }

    /// `u32 countMax | u64 bytesMax | u32 n | n × entry | u8 open | [open entry + u64 term]`, entry: `u8 key length |
    /// key | u64 keyIndex | u32 count | u32 landed | landed × (u64 index | u64 term | u64 stream | u64
    /// seq | outcome)`, outcome: `u8 0 | u32 length | bytes` (accepted) or `u8 1 | u16 code length |
    /// code | u32 message length | message` (rejected). Entries in completion order.
    public func encode() -> [UInt8] {
        var b: [UInt8] = []
        b.appendLE(UInt32(countMax))
        b.appendLE(UInt64(bytesMax))
        let live = order[head...].filter { entries[$0] != nil }
        b.appendLE(UInt32(live.count))
        for key in live {
            guard let e = entries[key] else { continue }
            Self.put(key, e, into: &b)
        }
        if let o = open {
            b.append(1)
            Self.put(o.key, o.entry, into: &b)
            b.appendLE(o.term)
        } else {
            b.append(0)
        }
        return b
    }

    static func put(_ key: [UInt8], _ e: Entry, into b: inout [UInt8]) {
        b.append(UInt8(key.count))
        b += key
        b.appendLE(e.keyIndex)
        b.appendLE(UInt32(e.count))
        b.appendLE(UInt32(e.landed.count))
        for l in e.landed {
            b.appendLE(l.index)
            b.appendLE(l.term)
            b.appendLE(l.stream.rawValue)
            b.appendLE(l.seq)
            switch l.outcome {
            case .accepted(let bytes):
                b.append(0)
                b.appendLE(UInt32(bytes.count))
                b += bytes
            case .rejected(let code, let message):
                b.append(1)
                let c = Array(code.utf8.prefix(1024))
                b.appendLE(UInt16(c.count))
                b += c
                let m = Array(message.utf8.prefix(65536))
                b.appendLE(UInt32(m.count))
                b += m
            }
        }
    }

    public init(encoded bytes: [UInt8]) throws {
        var r = LEReader(bytes)
        func fail(_ what: String) -> StateDecodeError { StateDecodeError("request window: \(what) at byte \(r.offset)") }
        func entry() throws -> ([UInt8], Entry) {
            guard let kl = r.bytes(1)?.first, let key = r.bytes(Int(kl)), let keyIndex = r.u64(), let count = r.u32(), let n = r.u32() else {
                throw fail("entry header runs past the end")
            }
            var landed: [Landed] = []
            for _ in 0..<n {
                guard let index = r.u64(), let term = r.u64(), let stream = r.u64(), let seq = r.u64(), let kind = r.bytes(1)?.first else {
                    throw fail("record runs past the end")
                }
                let outcome: ApplyOutcome
                if kind == 0 {
                    guard let len = r.u32(), let data = r.bytes(Int(len)) else { throw fail("outcome runs past the end") }
                    outcome = .accepted(data)
                } else if kind == 1 {
                    guard let cl = r.u16(), let code = r.bytes(Int(cl)), let ml = r.u32(), let message = r.bytes(Int(ml)) else {
                        throw fail("outcome runs past the end")
                    }
                    outcome = .rejected(code: String(decoding: code, as: UTF8.self), message: String(decoding: message, as: UTF8.self))
                } else {
                    throw fail("outcome kind \(kind)")
                }
                landed.append(Landed(index: index, term: term, stream: StreamID(stream), seq: seq, outcome: outcome))
            }
            return (key, Entry(keyIndex: keyIndex, landed: landed, count: Int(count)))
        }
        guard let cm = r.u32(), let bm = r.u64(), bm <= UInt64(Int.max), let n = r.u32() else { throw fail("header runs past the end") }
        countMax = Int(cm)
        bytesMax = Int(bm)
        for _ in 0..<n {
            let (key, e) = try entry()
            keep(key, e)
        }
        guard let hasOpen = r.bytes(1)?.first else { throw fail("open flag missing") }
        if hasOpen == 1 {
            let (key, e) = try entry()
            guard let term = r.u64() else { throw fail("open term missing") }
            open = (key, term, e)
        }
        guard r.offset == bytes.count else { throw fail("\(bytes.count - r.offset) bytes left over") }
    }

    public static func == (a: RequestWindow, b: RequestWindow) -> Bool {
        a.entries == b.entries && a.countMax == b.countMax && a.bytesMax == b.bytesMax && a.open?.key == b.open?.key && a.open?.term == b.open?.term
            && a.open?.entry == b.open?.entry
    }
}
