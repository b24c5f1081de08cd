import Foundation

/// `weft-faults --self-check`: the checker against histories whose anomalies are known, so a checker
/// that cannot see a lost, duplicated, misplaced or divergent write fails the test suite
/// (Tests/ToolTests). Needs no root and starts nothing.
enum SelfCheck {
    static func entry(_ i: UInt64, _ p: String, seq: UInt64) -> Checker.Entry {
        Checker.Entry(index: i, term: 1, type: 1, stream: 1, seq: seq, payload: p)
    }

    /// Runs every case; returns one line per case and whether all came out as expected.
    static func run() -> (lines: [String], ok: Bool) {
        let good = [entry(1, "a", seq: 1), entry(2, "b", seq: 2), entry(3, "c", seq: 3)]
        let acked: [String: History.Ack] = [
            "a": .init(shard: 0, index: 1, seq: 1), "b": .init(shard: 0, index: 2, seq: 2), "c": .init(shard: 0, index: 3, seq: 3),
        ]
        func logs(_ n2: [Checker.Entry]) -> [Int: [Int: [Checker.Entry]]] { [1: [0: good], 2: [0: n2], 3: [0: good]] }
        let cases: [(String, Checker.Result, (Checker.Result) -> Bool)] = [
            ("clean", Checker.check(logs: logs(good), acked: acked, failed: [], indeterminate: [], shards: 1), { $0.ok }),
            (
                "lost on one replica",
                Checker.check(logs: logs(Array(good.prefix(2))), acked: acked, failed: [], indeterminate: [], shards: 1),
                { $0.lost.count == 1 && !$0.divergent.isEmpty }
            ),
            (
                "duplicated",
                Checker.check(logs: logs(good + [entry(4, "c", seq: 4)]), acked: acked, failed: [], indeterminate: [], shards: 1),
                { !$0.duplicated.isEmpty }
            ),
            (
                "divergent payload",
                Checker.check(logs: logs([good[0], entry(2, "x", seq: 2), good[2]]), acked: acked, failed: [], indeterminate: ["x"], shards: 1),
                { !$0.divergent.isEmpty && $0.lost.count == 1 }
            ),
            (
                "misplaced",
                Checker.check(logs: logs([good[1], good[0], good[2]].enumerated().map { entry(UInt64($0 + 1), $1.payload, seq: UInt64($0 + 1)) }), acked: acked, failed: [], indeterminate: [], shards: 1),
                { !$0.misplaced.isEmpty }
            ),
            (
                "refused but written",
                Checker.check(logs: [1: [0: good], 2: [0: good], 3: [0: good]], acked: acked.filter { $0.key != "c" }, failed: ["c"], indeterminate: [], shards: 1),
                { !$0.unexpected.isEmpty }
            ),
            (
                "indeterminate that landed is fine",
                Checker.check(logs: logs(good), acked: acked.filter { $0.key != "c" }, failed: [], indeterminate: ["c"], shards: 1),
                { $0.ok }
            ),
            (
                "read back but missing",
                Checker.check(logs: logs(good), acked: acked, failed: [], indeterminate: [], shards: 1, readBack: ["0/1/4": "d"]),
                { $0.lost.count == 3 }
            ),
            (
                "read back differently",
                Checker.check(logs: logs(good), acked: acked, failed: [], indeterminate: [], shards: 1, readBack: ["0/1/2": "z"]),
                { $0.divergent.count == 3 }
            ),
            (
                "stream seq gap",
                Checker.check(logs: [1: [0: [good[0], entry(2, "b", seq: 3)]], 2: [0: [good[0], entry(2, "b", seq: 3)]], 3: [0: [good[0], entry(2, "b", seq: 3)]]], acked: [:], failed: [], indeterminate: ["a", "b"], shards: 1),
                { !$0.divergent.isEmpty }
            ),
        ]
        var lines: [String] = []
        var ok = true
        for (name, result, expected) in cases {
            let pass = expected(result)
            ok = ok && pass
            lines.append("\(pass ? "ok" : "WRONG") \(name): lost \(result.lost.count), duplicated \(result.duplicated.count), divergent \(result.divergent.count), misplaced \(result.misplaced.count), unexpected \(result.unexpected.count)")
        }
        return (lines, ok)
    }
}
