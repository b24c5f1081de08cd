import SegmentFormat
import SegmentStore
import WeftCore

/// `weft bench store`: append throughput at several batch sizes with fsync on, compression, recovery
/// time, and cursor-read latency on the resulting shard. Prints its figures; asserts nothing.
public struct StoreBench {
    public var directory: String
    public var records: Int
    public var batch: Int
    public var streams: Int
    public var reads: Int
    public var pageSize: Int
    public var seed: UInt64
    public var options: StoreOptions

    public init(
        directory: String, records: Int, batch: Int = 1024, streams: Int = 10_000, reads: Int = 2_000, pageSize: Int = 20,
        seed: UInt64 = 42, options: StoreOptions = StoreOptions()
    ) {
        self.options = options
        self.directory = directory
        self.records = records
        self.batch = batch
        self.streams = streams
        self.reads = reads
        self.pageSize = pageSize
        self.seed = seed
    }

    public struct BenchError: Error, CustomStringConvertible {
        public var description: String
    }

    /// Runs the benchmark, printing each figure as it is measured.
    public func run(print: (String) -> Void) throws {
        let disk = PosixDisk()
        if disk.exists(directory), let names = try? disk.list(directory), !names.isEmpty {
            throw BenchError(description: "\(directory) is not empty; give a fresh directory")
        }
        let clock = ContinuousClock()
        try disk.makeDirectory(directory)
        let floor = try fsyncFloor(disk, clock)
        print("fsync floor on this disk (4 KiB append + fdatasync, 500 times): p50 \(ms(floor, 0.5)) ms p99 \(ms(floor, 0.99)) ms")
        let fence = try fenceCost(disk, clock)
        print("fence rewrite (36 B pwrite in place, no sync, as after every append; 5000 times): p50 \(ms(fence, 0.5)) ms p99 \(ms(fence, 0.99)) ms")
        var corpus = ChatCorpus(seed: seed, streams: streams)
        let store = try SegmentStore(directory: directory, options: options)
        print("weft bench store: \(records) records into \(directory) (shard 0, \(streams) streams, fsync every batch, segment \(store.options.segmentBytesMax >> 20) MiB, block ~\(store.options.blockBytesTarget >> 10) KiB)")

        // Small batches are fsync-bound: measure them on a slice, then fill the rest at `batch`.
        let phases = [(1, min(records, 2_000)), (64, min(max(records - 2_000, 0), 64 * 400))]
        var plan = phases.filter { $0.1 > 0 }
        let done = plan.reduce(0) { $0 + $1.1 }
        if records > done { plan.append((batch, records - done)) }

        var index: LogIndex = 1
        var rawTotal = 0
        let startMicros: Int64 = 1_767_225_600_000_000  // 2026-01-01T00:00:00Z
        for (size, count) in plan {
            var written = 0
            var rawBytes = 0
            var elapsed = Duration.zero
            var latencies: [Duration] = []
            while written < count {
                let n = min(size, count - written)
                var b = [Record]()
                b.reserveCapacity(n)
                for _ in 0..<n {
                    let r = corpus.next(index: index, term: 1, timestampMicros: startMicros + Int64(index) * 1_000)
                    rawBytes += RecordCodec.encodedBytes(r)
                    b.append(r)
                    index += 1
                }
                let t0 = clock.now
                try store.append(b)
                let dt = clock.now - t0
                elapsed += dt
                if latencies.count < 100_000 { latencies.append(dt) }
                written += n
            }
            rawTotal += rawBytes
            let secs = seconds(elapsed)
            latencies.sort()
            print(
                "append batch=\(pad(size, 4)): \(pad(count, 9)) records in \(f2(secs)) s = \(pad(Int(Double(count) / secs), 8)) records/s, \(f2(Double(rawBytes) / secs / 1e6)) MB/s raw; append p50 \(ms(latencies, 0.5)) ms p99 \(ms(latencies, 0.99)) ms"
            )
        }
        try store.sync()
        let stored = try diskBytes(disk)
        print("compression: \(f2(Double(rawTotal) / 1e6)) MB of records in \(f2(Double(stored) / 1e6)) MB of segment files (ratio \(f2(Double(rawTotal) / Double(stored))), \(store.segmentCount) segments, index files included)")
        store.close()

        let t0 = clock.now
        let reopened = try SegmentStore(directory: directory, options: options)
        let openSecs = seconds(clock.now - t0)
        print("reopen (recovery: load sealed indexes, scan the last segment): \(f2(openSecs * 1000)) ms for \(reopened.lastIndex) records in \(reopened.segmentCount) segments")

        var rng = BenchRNG(seed: seed ^ 0xC0FFEE)
        var forward: [Duration] = []
        var backward: [Duration] = []
        var got = 0
        for _ in 0..<reads {
            let s = corpus.pickStream()
            let last = corpus.nextSeq[s] - 1
            guard last > 0 else { continue }
            let from = 1 + rng.next() % last
            let t1 = clock.now
            got += try reopened.readStream(StreamID(UInt64(s + 1)), fromSeq: from, limit: pageSize).count
            forward.append(clock.now - t1)
            let t2 = clock.now
            got += try reopened.readStreamBackward(StreamID(UInt64(s + 1)), beforeSeq: nil, limit: pageSize).count
            backward.append(clock.now - t2)
        }
        forward.sort()
        backward.sort()
        print("cursor read, \(pageSize) records forward from a random cursor: p50 \(ms(forward, 0.5)) ms, p99 \(ms(forward, 0.99)) ms (\(forward.count) reads)")
        print("cursor read, newest \(pageSize) backward: p50 \(ms(backward, 0.5)) ms, p99 \(ms(backward, 0.99)) ms (\(backward.count) reads, \(got) records returned)")
        reopened.close()
        print("left in place: \(directory) (inspect with: weft-dump --verify \(directory))")
    }

    /// The physical floor for a durable append, measured in the same run so figures compare as ratios.
    func fsyncFloor(_ disk: PosixDisk, _ clock: ContinuousClock) throws -> [Duration] {
        try measureFsyncFloor(directory: directory, count: 500)
    }

    /// What the tail fence adds to every append batch (Docs/faults.md): one small pwrite in place.
    func fenceCost(_ disk: PosixDisk, _ clock: ContinuousClock) throws -> [Duration] {
        let path = directory + "/fence-cost.tmp"
        let f = try disk.open(path, create: true)
        defer {
            f.close()
            try? disk.remove(path)
        }
        var bytes = [UInt8](repeating: 0x5A, count: 36)
        var out: [Duration] = []
        for i in 0..<5000 {
            bytes[8] = UInt8(truncatingIfNeeded: i)
            let t0 = clock.now
            try f.write(bytes, at: 0)
            out.append(clock.now - t0)
        }
        return out.sorted()
    }

    func diskBytes(_ disk: PosixDisk) throws -> UInt64 {
        var total: UInt64 = 0
        for name in try disk.list(directory) where name.hasSuffix(".seg") || name.hasSuffix(".idx") {
            let f = try disk.open(directory + "/" + name, create: false)
            total += try f.size()
            f.close()
        }
        return total
    }
}

/// `count` pwrite + fdatasync rounds of 4 KiB appended to a scratch file in `directory` (the disk the
/// data lives on), sorted: the floor of any durable append there, printed next to every result.
func measureFsyncFloor(directory: String, count: Int) throws -> [Duration] {
    let disk = PosixDisk()
    try disk.makeDirectory(directory)
    let path = directory + "/fsync-floor.tmp"
    let f = try disk.open(path, create: true)
    defer {
        f.close()
        try? disk.remove(path)
    }
    let block = [UInt8](repeating: 0xA5, count: 4096)
    let clock = ContinuousClock()
    var out: [Duration] = []
    for i in 0..<count {
        let t0 = clock.now
        try f.write(block, at: UInt64(i * 4096))
        try f.sync()
        out.append(clock.now - t0)
    }
    return out.sorted()
}

func seconds(_ d: Duration) -> Double {
    Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
}

func ms(_ sorted: [Duration], _ q: Double) -> String {
    guard !sorted.isEmpty else { return "-" }
    let i = min(sorted.count - 1, Int(Double(sorted.count) * q))
    return f3(seconds(sorted[i]) * 1000)
}

func f2(_ d: Double) -> String { fixed(d, 2) }
func f3(_ d: Double) -> String { fixed(d, 3) }

func fixed(_ d: Double, _ places: Int) -> String {
    var p = 1.0
    for _ in 0..<places { p *= 10 }
    let v = (d * p).rounded() / p
    var s = String(v)
    if let dot = s.firstIndex(of: ".") {
        let decimals = s.distance(from: dot, to: s.endIndex) - 1
        if decimals < places { s += String(repeating: "0", count: places - decimals) }
    }
    return s
}

func pad(_ n: Int, _ width: Int) -> String {
    let s = String(n)
    return String(repeating: " ", count: max(0, width - s.count)) + s
}
