import SegmentFormat
import SegmentStore
import Testing
import WeftCore
import WeftTesting

/// The store against a brute-force model on seeded random workloads: appends of random batch sizes over
/// ~50 streams, random suffix truncations, random reopens, and (second test) retention. A failure names
/// its seed; rerun that one argument to replay it.
@Suite struct ModelTests {
    static let seeds: [UInt64] = Array(0..<300)

    @Test(arguments: seeds)
    func storeMatchesModel(seed: UInt64) throws {
        try Self.run(seed: seed, retention: false)
    }

    /// With retention runs too: every stream's last seq, including streams whose records were all
    /// dropped, must survive later truncations and reopens.
    @Test(arguments: Array(seeds.prefix(150)))
    func storeMatchesModelWithRetention(seed: UInt64) throws {
        try Self.run(seed: seed, retention: true)
    }

    static func run(seed: UInt64, retention: Bool) throws {
        var rng = SeededRNG(seed: seed &* 0x9E37_79B9_7F4A_7C15 &+ 17)
        let options = StoreOptions(
            shard: ShardID(seed), segmentBytesMax: [2_048, 4_096, 8_192][rng.int(0..<3)],
            blockBytesTarget: [256, 512, 1_024][rng.int(0..<3)], compress: !rng.oneIn(4))
        let disk = SimulatedDisk()
        var store = try SegmentStore(directory: simDirectory, options: options, disk: disk)
        var model = LogModel()
        model.streamCount = rng.int(5...50)
        let steps = 24
        for step in 0..<steps {
            let context = "seed \(seed) step \(step)"
            let op = rng.int(0..<(retention ? 23 : 20))
            switch op {
            case 0..<13:
                let batch = model.makeBatch(count: rng.oneIn(6) ? rng.int(20...60) : rng.int(1...12), rng: &rng)
                try store.append(batch)
                model.apply(batch)
            case 13..<17:
                guard model.lastIndex > 0 else { continue }
                let last = Int(model.lastIndex)
                var cut: Int
                switch rng.int(0..<6) {
                case 0: cut = rng.int(1...last)  // anywhere, possibly everything
                case 1: cut = last + 1  // nothing
                default: cut = rng.int(max(1, last - 30)...last)
                }
                // After retention, Raft never cuts what it applied: keep the first record.
                if model.firstIndex > 1 { cut = max(cut, Int(model.firstIndex) + 1) }
                try store.truncateSuffix(from: LogIndex(cut))
                model.truncate(from: LogIndex(cut))
            case 17..<19:
                store.close()
                store = try SegmentStore(directory: simDirectory, options: options, disk: disk)
            case 20..<23:
                try store.dropSegments(through: LogIndex(rng.int(0...Int(model.lastIndex))))
                model.drop(below: store.firstIndex)
            default:
                try store.sync()
            }
            // The whole log is compared after every truncation and reopen, and every few appends.
            guard check(store, model, context, rng: &rng, queries: 3, readAll: op >= 13 || step == steps - 1) else { return }
            #expect(noFindings(store.findings), "\(context): \(store.findings)")
            #expect(store.damage.isEmpty, "\(context): \(store.damage)")
        }
        // One last reopen must agree too.
        store.close()
        store = try SegmentStore(directory: simDirectory, options: options, disk: disk)
        check(store, model, "seed \(seed) after final reopen", rng: &rng, queries: 20)
    }
}
