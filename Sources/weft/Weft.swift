import ArgumentParser
import Glibc
import SegmentStore
import WeftBench

@main
struct Weft: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "weft",
        abstract: "Weft: a messaging backend whose storage is a replicated log.",
        subcommands: [Bench.self])
}

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks. They print figures; record them in Docs/benchmarks.md.",
        subcommands: [BenchStore.self])
}

struct BenchStore: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "store",
        abstract: "Append chat-like records to a fresh segment store, then measure reopen and cursor reads.")

    @Option(help: "A fresh (absent or empty) directory; it is left in place for weft-dump.")
    var dir: String

    @Option(help: "How many records to write in all.")
    var records: Int

    @Option(help: "Batch size for the bulk of the records (batches of 1 and 64 are measured first).")
    var batch: Int = 1024

    @Option(help: "How many streams (conversations) the records spread over.")
    var streams: Int = 10_000

    @Option(help: "How many cursor reads to time.")
    var reads: Int = 2_000

    @Option(help: "Target raw bytes per block.")
    var blockBytes: Int = 16 << 10

    func validate() throws {
        guard records > 0 else { throw ValidationError("--records must be positive") }
        guard batch > 0, batch <= 65_536 else { throw ValidationError("--batch must be 1...65536") }
        guard streams > 0 else { throw ValidationError("--streams must be positive") }
        guard blockBytes >= 256, blockBytes <= 4 << 20 else { throw ValidationError("--block-bytes must be 256...4194304") }
    }

    func run() throws {
        let bench = StoreBench(
            directory: dir, records: records, batch: batch, streams: streams, reads: reads,
            options: StoreOptions(blockBytesTarget: blockBytes))
        do {
            try bench.run {
                print($0)
                fflush(nil)  // figures appear as they are measured, also through a pipe
            }
        } catch let e as StoreBench.BenchError {
            throw ValidationError(e.description)
        }
    }
}
