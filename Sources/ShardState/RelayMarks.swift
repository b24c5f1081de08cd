import WeftCore

/// Per source shard, the highest source log index whose derived records this (destination) shard has
/// applied: what makes relays exactly-once (Docs/state.md, "Relays").
///
/// In the destination's log a relay batch is a `relayBatch` record followed by the batch's derived
/// records, proposed together by one leader (so all of one term):
///
/// ```
/// relayBatch payload: u64 source shard | u64 first source index | u64 last source index | u32 n
///                     | n × u64 source index of each derived record (non-decreasing, within first...last)
/// ```
///
/// Applying in order: when the batch's n records have all landed, the mark for the source becomes the
/// batch's last source index (source records in the range that derived nothing for this shard count as
/// done). If a leader change cuts the batch short, the mark advances only past source indexes all of
/// whose derived records landed, so the relay's retry from the mark writes no record twice.
public struct RelayMarks: Sendable, Equatable {
    public private(set) var marks: [UInt64: LogIndex] = [:]
    /// The batch being applied: source, last source index, term, the remaining derived records' source
    /// indexes.
    var open: (source: UInt64, last: LogIndex, term: Term, pending: [LogIndex])?

    public init() {}

    public func mark(of source: ShardID) -> LogIndex { marks[source.rawValue] ?? 0 }

    /// The batch being applied, if any: its source and last source index.
    public var openBatch: (source: ShardID, last: LogIndex)? { open.map { (ShardID($0.source), $0.last) } }

    public struct Header: Sendable, Equatable {
        public var source: ShardID
        public var first: LogIndex
        public var last: LogIndex
        public var sourceIndexes: [LogIndex]
        public init(source: ShardID, first: LogIndex, last: LogIndex, sourceIndexes: [LogIndex]) {
            self.source = source
            self.first = first
            self.last = last
            self.sourceIndexes = sourceIndexes
        }

        public func encode() -> [UInt8] {
            var b: [UInt8] = []
            b.appendLE(source.rawValue)
            b.appendLE(first)
            b.appendLE(last)
            b.appendLE(UInt32(sourceIndexes.count))
            for i in sourceIndexes { b.appendLE(i) }
            return b
        }

        /// Nil unless well formed: first <= last, indexes non-decreasing within the range.
        public static func decode(_ payload: [UInt8]) -> Header? {
            var r = LEReader(payload)
            guard let source = r.u64(), let first = r.u64(), let last = r.u64(), let n = r.u32(), first >= 1, first <= last,
                payload.count == 28 + 8 * Int(n)
            else { return nil }
            var out: [LogIndex] = []
            out.reserveCapacity(Int(n))
            for _ in 0..<n {
                guard let i = r.u64(), i >= first, i <= last, i >= (out.last ?? 0) else { return nil }
                out.append(i)
            }
            return Header(source: ShardID(source), first: first, last: last, sourceIndexes: out)
        }
    }

    /// Applies one committed record (every record, in log order).
    public mutating func apply(_ r: Record) {
        if var o = open {
            if r.term == o.term && r.type != .relayBatch && r.type != .requestKey && !o.pending.isEmpty {
                let s = o.pending.removeFirst()
                // Every derived record of source index s has landed once the next one is of a later index.
                if o.pending.first.map({ $0 > s }) ?? true { advance(o.source, to: o.pending.isEmpty ? o.last : s) }
                open = o.pending.isEmpty ? nil : o
                return
            }
            open = nil  // cut short: the mark stays where the landed records put it
        }
        if r.type == .relayBatch, let h = Header.decode(r.payload) {
            if h.sourceIndexes.isEmpty {
                advance(h.source.rawValue, to: h.last)
            } else {
                open = (h.source.rawValue, h.last, r.term, h.sourceIndexes)
            }
        }
    }

    mutating func advance(_ source: UInt64, to index: LogIndex) {
        if index > (marks[source] ?? 0) { marks[source] = index }
    }

    /// `u32 n | n × (u64 source | u64 mark) | u8 open | [u64 source | u64 last | u64 term | u32 k | k × u64]`,
    /// sources ascending.
    public func encode() -> [UInt8] {
        var b: [UInt8] = []
        b.appendLE(UInt32(marks.count))
        for (s, m) in marks.sorted(by: { $0.key < $1.key }) {
            b.appendLE(s)
            b.appendLE(m)
        }
        if let o = open {
            b.append(1)
            b.appendLE(o.source)
            b.appendLE(o.last)
            b.appendLE(o.term)
            b.appendLE(UInt32(o.pending.count))
            for p in o.pending { b.appendLE(p) }
        } else {
            b.append(0)
        }
        return b
    }

    public init(encoded bytes: [UInt8]) throws {
        var r = LEReader(bytes)
        guard let n = r.u32() else { throw StateDecodeError("relay marks: no count") }
        for _ in 0..<n {
            guard let s = r.u64(), let m = r.u64() else { throw StateDecodeError("relay marks: a mark runs past the end at byte \(r.offset)") }
            marks[s] = m
        }
        guard let flag = r.bytes(1)?.first else { throw StateDecodeError("relay marks: open flag missing") }
        if flag == 1 {
            guard let s = r.u64(), let last = r.u64(), let term = r.u64(), let k = r.u32() else {
                throw StateDecodeError("relay marks: open batch runs past the end")
            }
            var pending: [LogIndex] = []
            for _ in 0..<k {
                guard let p = r.u64() else { throw StateDecodeError("relay marks: open batch runs past the end") }
                pending.append(p)
            }
            open = (s, last, term, pending)
        }
        guard r.offset == bytes.count else { throw StateDecodeError("relay marks: \(bytes.count - r.offset) bytes left over") }
    }

    public static func == (a: RelayMarks, b: RelayMarks) -> Bool {
        a.marks == b.marks && a.open?.source == b.open?.source && a.open?.last == b.open?.last && a.open?.term == b.open?.term
            && a.open?.pending == b.open?.pending
    }
}
