import Replication
import Testing
import WeftCore

@testable import WeftServer

/// A read answered for another node (`ReadPoint.encodeResult`/`decodeResult`): the records, the indexes
/// and, for a stream whose start retention dropped, its floor; and the sync refusal that floor leads to.
@Suite struct ReadAnswerTests {
    static let records = [
        Record(index: 40, term: 3, stream: StreamID(9), seq: 12, timestampMicros: 5, payload: Array("twelve".utf8)),
        Record(index: 41, term: 3, stream: StreamID(9), seq: 13, timestampMicros: 6, payload: []),
    ]

    static func bytes(_ a: Envelope.ForwardAnswer) -> [UInt8] {
        if case .bytes(let b) = a { return b }
        Issue.record("not bytes: \(a)")
        return []
    }

    @Test func aReadRoundTripsWithItsFloor() throws {
        for floor: UInt64 in [1, 12, 1 << 40] {
            let rr = ReadResult(records: Self.records, applied: 41, commit: 44, floor: floor)
            let b = Self.bytes(ReadPoint.encodeResult(.success(rr)))
            // A floor of 1 (nothing dropped) keeps the layout nodes before stop 24 read.
            #expect(b.first == (floor > 1 ? 2 : 0))
            guard case .success(let back)? = ReadPoint.decodeResult(b) else {
                Issue.record("floor \(floor): not decoded")
                continue
            }
            #expect(back == rr)
        }
    }

    @Test func aHeadRoundTripsAndAnswersWithoutOneKeepTheOldLayout() {
        for (floor, head): (UInt64, UInt64?) in [(1, 0), (1, 77), (5, 77), (5, nil), (1, nil)] {
            let rr = ReadResult(records: [], applied: 9, commit: 9, floor: floor, head: head)
            let b = Self.bytes(ReadPoint.encodeResult(.success(rr)))
            #expect(b.first == (floor > 1 || head != nil ? 2 : 0))
            guard case .success(let back)? = ReadPoint.decodeResult(b) else {
                Issue.record("\(floor) \(String(describing: head)): not decoded")
                continue
            }
            #expect(back == rr)
        }
    }

    /// An answer whose records would not fit in a peer frame carries the first ones only (at least one),
    /// so it is sent rather than dropped; the asker reads on from the last.
    @Test func anAnswerTooLongForAFrameCarriesItsFirstRecords() {
        let big = [UInt8](repeating: 7, count: 3 << 20)
        let records = (0..<10).map { Record(index: 100 + UInt64($0), term: 2, stream: StreamID(9), seq: UInt64($0) + 1, timestampMicros: 1, payload: big) }
        let b = Self.bytes(ReadPoint.encodeResult(.success(ReadResult(records: records, applied: 200, commit: 200, floor: 1))))
        #expect(b.count < 9 << 20)
        guard case .success(let back)? = ReadPoint.decodeResult(b) else {
            Issue.record("not decoded")
            return
        }
        #expect(back.records == Array(records.prefix(2)))
        // Records of the largest payload: one per answer (two would pass the budget by their headers).
        let largest = (0..<3).map { Record(index: 1 + UInt64($0), term: 1, stream: StreamID(9), seq: 1 + UInt64($0), timestampMicros: 1, payload: [UInt8](repeating: 1, count: Limits.recordPayloadBytesMax)) }
        let one = Self.bytes(ReadPoint.encodeResult(.success(ReadResult(records: largest, applied: 3, commit: 3, floor: 1))))
        guard case .success(let alone)? = ReadPoint.decodeResult(one) else {
            Issue.record("not decoded")
            return
        }
        #expect(alone.records == [largest[0]])
    }

    @Test func aFloorOfZeroOrACutAnswerIsRefused() {
        let rr = ReadResult(records: Self.records, applied: 41, commit: 44, floor: 7)
        var b = Self.bytes(ReadPoint.encodeResult(.success(rr)))
        #expect(ReadPoint.decodeResult(Array(b.dropLast())) == nil)
        // The floor sits after the tag and two u64s.
        for k in 17..<25 { b[k] = 0 }
        #expect(ReadPoint.decodeResult(b) == nil, "a floor of 0 would move a session's cursor to the end of all seqs")
    }

    @Test func syncRefusesACursorBelowTheFloorAndNamesWhereToGoOn() {
        #expect(MessagingAPI.cursorExpired(after: 0, floor: 1) == nil)
        #expect(MessagingAPI.cursorExpired(after: 4, floor: 5) == nil)
        #expect(MessagingAPI.cursorExpired(after: 900, floor: 5) == nil, "a cursor past the floor")
        let e = MessagingAPI.cursorExpired(after: 3, floor: 10)
        #expect(e?.status == .gone && e?.code == "cursor_expired" && e?.cursor == "9")
        #expect(e?.message.contains("after cursor 3 through 9") == true)
    }
}
