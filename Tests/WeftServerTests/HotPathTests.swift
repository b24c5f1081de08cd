import Foundation
import Prometheus
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

/// The append stream's bookkeeping (issue 9 review): answers leave in frames no larger than the limit,
/// a request's slot comes back only when its answer is written, and a failed writer stops the reader.
@Suite struct AppendStreamBookkeepingTests {
    @Test func answersAreCutIntoFramesAtTheLimitOnAnswerBoundaries() async throws {
        let answers = AppendStream.Answers()
        let refs = (0..<4096).map { RecordRef(index: UInt64($0), term: 1, stream: StreamID(1), seq: UInt64($0 + 1)) }
        let n = 80  // 80 answers of 4096 records: about 10 MiB in all
        for id in 0..<n { answers.add(id: UInt64(id), .success(refs), requestBytes: 10) }
        answers.finish()
        var seen = 0
        var frames = 0
        while let b = await answers.next() {
            frames += 1
            #expect(b.frame.readableBytes <= AppendStream.frameBytesMax)
            #expect(b.bytes == b.count * 10)
            // Whole answers only: the frame parses to exactly `count` answers.
            var f = b.frame
            var k = 0
            while let _ = f.readInteger(endianness: .little, as: UInt64.self), let status = f.readInteger(as: UInt8.self),
                let count = f.readInteger(endianness: .little, as: UInt32.self)
            {
                #expect(status == 0 && count == 4096)
                f.moveReaderIndex(forwardBy: Int(count) * 32)
                k += 1
            }
            #expect(k == b.count && f.readableBytes == 0)
            seen += b.count
        }
        #expect(seen == n)
        #expect(frames >= 3)
    }

    @Test func theWriterEndsOnlyAfterEveryStartedRequestIsAnswered() async throws {
        let answers = AppendStream.Answers()
        answers.expect()
        answers.expect()
        answers.add(id: 1, .failure(.invalid("bad")), requestBytes: 5)
        // The reader stops with two requests still running: the writer must wait for both answers.
        answers.finish()
        #expect(await answers.next()?.count == 1)
        let writer = Task { () -> [Int] in
            var counts: [Int] = []
            while let b = await answers.next() { counts.append(b.count) }
            return counts
        }
        try await Task.sleep(for: .milliseconds(50))
        answers.add(id: 2, .success([]), requestBytes: 5, expected: true)
        try await Task.sleep(for: .milliseconds(50))
        answers.add(id: 3, .failure(.outcomeUnknown("late")), requestBytes: 5, expected: true)
        let counts = await writer.value
        #expect(counts.reduce(0, +) == 2)
    }

    @Test func aFailedWriterDropsLateAnswersAndEnds() async throws {
        let answers = AppendStream.Answers()
        answers.expect()
        let writer = Task { await answers.next() }
        try await Task.sleep(for: .milliseconds(50))
        answers.fail()
        #expect(await writer.value == nil)
        answers.add(id: 1, .success([]), requestBytes: 5, expected: true)
        #expect(await answers.next() == nil)
    }

    @Test func aSlotComesBackOnlyWhenItsAnswerIsWrittenAndClosingWakesTheReader() async throws {
        let slots = AppendStream.Slots(max: 2, bytesMax: 100)
        #expect(await slots.acquire(bytes: 60))
        // Over the byte budget: waits.
        let third = Task { await slots.acquire(bytes: 60) }
        try await Task.sleep(for: .milliseconds(50))
        #expect(slots.inUse == 1)
        slots.release(count: 1, bytes: 60)
        #expect(await third.value)
        #expect(slots.inUse == 1)
        // One request of any size is let through when nothing is in use.
        slots.release(count: 1, bytes: 60)
        #expect(await slots.acquire(bytes: 1000))
        let blocked = Task { await slots.acquire(bytes: 1) }
        try await Task.sleep(for: .milliseconds(50))
        slots.close()
        #expect(await blocked.value == false)
        #expect(await slots.acquire(bytes: 1) == false)
    }
}

/// `/metrics` is open to anyone: the replica counters are refreshed from the replicas at most once a second.
@Suite struct MetricsRefreshTests {
    @Test func replicaCountersRefreshAtMostOnceASecond() async throws {
        let counters = ReplicaCounters(registry: PrometheusCollectorRegistry())
        #expect(counters.due())
        #expect(!counters.due())
        #expect(!counters.due())
        try await Task.sleep(for: .milliseconds(1100))
        #expect(counters.due())
    }
}
