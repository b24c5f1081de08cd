import Foundation
import Testing
import WeftCore

@testable import WeftServer

/// Issue 9: the pieces that replaced per-request work on the write path must behave as what they replaced.
@Suite struct HotPathTests {
    final class Fired: @unchecked Sendable {
        let lock = NSLock()
        var ids: [Int] = []
        func add(_ k: Int) { lock.withLock { ids.append(k) } }
        var all: [Int] { lock.withLock { ids } }
    }

    @Test func appendResponseBodyIsWhatTheJSONEncoderWrote() throws {
        let cases: [[RecordRef]] = [
            [],
            [RecordRef(index: 1, term: 1, stream: StreamID(7), seq: 1)],
            [
                RecordRef(index: 18_446_744_073_709_551_615, term: 3, stream: StreamID(0), seq: 0),
                RecordRef(index: 42, term: 9_007_199_254_740_993, stream: StreamID(18_446_744_073_709_551_615), seq: 12),
            ],
        ]
        for refs in cases {
            let enc = JSONEncoder()
            enc.outputFormatting = [.sortedKeys]
            let expected = Array(try enc.encode(HTTPAPI.AppendResponse(records: refs)))
            #expect(HTTPAPI.appendResponseBody(refs) == expected, "\(String(decoding: expected, as: UTF8.self))")
        }
    }

    @Test func deadlinesFireOnceInOrderAndNeverAfterCancel() async throws {
        let d = Deadlines()
        let fired = Fired()
        let now = ContinuousClock.now
        let a = d.schedule(now + .milliseconds(60)) { fired.add(2) }
        _ = d.schedule(now + .milliseconds(20)) { fired.add(1) }
        let c = d.schedule(now + .milliseconds(40)) { fired.add(99) }
        d.cancel(c)
        for _ in 0..<400 where fired.all.count < 2 { try await Task.sleep(for: .milliseconds(5)) }
        #expect(fired.all == [1, 2])
        d.cancel(a)  // after it fired: no effect
        // A deadline already past fires promptly; none is left waiting.
        _ = d.schedule(now - .seconds(1)) { fired.add(3) }
        for _ in 0..<400 where fired.all.count < 3 { try await Task.sleep(for: .milliseconds(5)) }
        #expect(fired.all == [1, 2, 3])
        #expect(d.count == 0)
    }
}
