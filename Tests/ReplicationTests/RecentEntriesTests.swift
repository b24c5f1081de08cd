import Foundation
import Raft
import SegmentFormat
import SegmentStore
import Testing
import WeftCore
import WeftTesting

@testable import Replication

/// Issue 9: the reader keeps the entries appended last in memory; whatever it answers from there must
/// be exactly what the store holds, across appends, limits, truncation and retention of the cache.
@Suite struct RecentEntriesTests {
    func records(_ range: ClosedRange<LogIndex>, term: Term, size: Int = 40) -> [Record] {
        range.map { i in
            Record(
                index: i, term: term, stream: StreamID(i % 3 + 1), seq: 0, type: .data, timestampMicros: Int64(i),
                payload: Array(repeating: UInt8(truncatingIfNeeded: i), count: size))
        }
    }

    @Test func cachedEntriesMatchTheStoreThroughAppendsAndTruncation() throws {
        let tmp = try TempDirectory(prefix: "weft-recent-test")
        defer { tmp.remove() }
        let store = try SegmentStore(
            directory: tmp.path, options: StoreOptions(segmentBytesMax: 8192, blockBytesTarget: 512, durability: .never), disk: PosixDisk())
        defer { store.close() }
        let reader = StoreLogReader(store)
        var seqs: [StreamID: StreamSeq] = [:]
        func numbered(_ rs: [Record]) -> [Record] {
            rs.map { r in
                var r = r
                let s = (seqs[r.stream] ?? 0) + 1
                seqs[r.stream] = s
                r.seq = s
                return r
            }
        }
        func check() throws {
            let last = store.lastIndex
            for from in stride(from: max(1, store.firstIndex), through: last, by: 7) {
                for to in [from, from + 1, from + 5, last + 1] where to <= last + 1 && to >= from {
                    for maxBytes in [1, 100, 1 << 20] {
                        let got = reader.entries(from: from, to: to, maxBytes: maxBytes)
                        let stored = try store.read(from: from, to: to - 1, limit: 4096)
                        var expected: [Record] = []
                        var bytes = 0
                        for r in stored where from < to {
                            if !expected.isEmpty && bytes + r.payload.count > maxBytes { break }
                            bytes += r.payload.count
                            expected.append(r)
                        }
                        #expect(got == expected, "entries(\(from)..<\(to), maxBytes \(maxBytes))")
                    }
                }
            }
        }
        var next: LogIndex = 1
        for batch in [1, 5, 30, 2, 64] {
            let rs = numbered(records(next...(next + LogIndex(batch) - 1), term: 1))
            try store.append(rs)
            reader.didAppend(rs)
            next += LogIndex(batch)
        }
        try check()
        // A new leader cuts an uncommitted tail and writes its own entries there.
        try store.truncateSuffix(from: 80)
        reader.didTruncate(from: 80)
        seqs = [:]
        for i in 1...79 { seqs[StreamID(LogIndex(i) % 3 + 1), default: 0] += 1 }
        let rs = numbered(records(80...120, term: 2, size: 70))
        try store.append(rs)
        reader.didAppend(rs)
        try check()
        #expect(reader.term(at: 100) == 2)
        #expect(reader.term(at: 79) == 1)
    }

    @Test func theCacheKeepsItsLimits() throws {
        let tmp = try TempDirectory(prefix: "weft-recent-test")
        defer { tmp.remove() }
        let store = try SegmentStore(
            directory: tmp.path, options: StoreOptions(segmentBytesMax: 1 << 26, blockBytesTarget: 65536, durability: .never),
            disk: PosixDisk())
        defer { store.close() }
        let reader = StoreLogReader(store)
        var next: LogIndex = 1
        // 1 MiB payloads: the byte limit, not the count limit, decides what is kept.
        for _ in 0..<12 {
            let rs = records(next...next, term: 1, size: 1 << 20).map { r -> Record in
                var r = r
                r.stream = .none
                return r
            }
            try store.append(rs)
            reader.didAppend(rs)
            next += 1
        }
        #expect(reader.recentBytes <= StoreLogReader.recentBytesMax)
        #expect(reader.recent.count - reader.recentStart >= 1)
        // Entries older than the cache still come from the store.
        #expect(reader.entries(from: 1, to: 2, maxBytes: 1)?.map(\.index) == [1])
        #expect(reader.entries(from: 12, to: 13, maxBytes: 1)?.map(\.index) == [12])
    }
}
