import SegmentFormat
import WeftCore

/// Feeds one input to every decoder that reads bytes from disk. Hostile input must give errors:
/// never a crash, an out-of-bounds access (caught by ASan in the fuzzing build) or a huge allocation
/// (decoders check sizes against `Limits` before allocating).
func fuzzOne(_ bytes: [UInt8]) {
    _ = try? SegmentHeader.decode(bytes)
    _ = try? HighWaterFile.decode(bytes)
    _ = try? BlockCodec.decode(bytes, offset: 0)
    if let idx = try? SegmentIndexFile.open(MemoryByteSource(bytes: bytes)) {
        var run: UInt32 = 0
        while run < idx.runCount {
            _ = try? idx.readChunk(containing: run, from: MemoryByteSource(bytes: bytes))
            run += UInt32(Layout.indexRunsPerChunk)
        }
    }
    if var scanner = try? SegmentScanner(MemoryByteSource(bytes: bytes)) {
        var steps = 0
        while steps < 10_000, let item = try? scanner.next() {
            if case .block(let b) = item { _ = try? b.records() }
            steps += 1
        }
    }
    // The checksum stops most mutations at the door; wrap the input in a block with a correct one so the
    // LZ4 and record decoders see hostile payloads too. Input: codec, count (u16), raw size (u24), payload.
    if bytes.count >= 6 {
        let payload = Array(bytes[6...])
        var block = [UInt8]()
        block.appendLE(Layout.blockMagic)
        block.append(bytes[0] & 1)
        block += [0, 0, 0]
        block.appendLE(UInt32(bytes[1]) | UInt32(bytes[2]) << 8)
        block.appendLE(UInt32(payload.count))
        block.appendLE(UInt32(bytes[3]) | UInt32(bytes[4]) << 8 | UInt32(bytes[5]) << 16)
        block.appendLE(UInt64(1))
        block.appendLE(UInt32(0))
        block += payload
        let crc = block.withUnsafeBytes {
            BlockCodec.computeCRC(header: $0, payload: UnsafeRawBufferPointer(rebasing: $0[Layout.blockHeaderBytes...]))
        }
        block.storeLE(crc, at: 28)
        _ = try? BlockCodec.decode(block, offset: 0)
    }
}

#if FUZZING
/// libFuzzer's driver (compiler-rt, -sanitize=fuzzer). SwiftPM names an executable's entry point
/// `<module>_main` and aliases `main` to it, so this entry point starts the fuzzer itself.
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt
) -> CInt

@_cdecl("weft_fuzz_decoder_main")
func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var argc = argc
    var argv = argv
    return LLVMFuzzerRunDriver(&argc, &argv) { data, size in fuzzerTestOneInput(data, size) }
}

/// The callback libFuzzer's own `main` (linked in by -sanitize=fuzzer) looks for.
@_cdecl("LLVMFuzzerTestOneInput")
func fuzzerTestOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard let data else { return 0 }
    fuzzOne(Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
}
#else
import Foundation

/// Without -DFUZZING: replays the files named on the command line (a corpus, or a crash reproducer).
@main
struct Replay {
    static func main() {
        var count = 0
        for path in CommandLine.arguments.dropFirst() {
            guard let data = FileManager.default.contents(atPath: path) else {
                FileHandle.standardError.write(Data("weft-fuzz-decoder: cannot read \(path)\n".utf8))
                exit(2)
            }
            fuzzOne(Array(data))
            count += 1
        }
        print("replayed \(count) inputs without a crash")
    }
}
#endif
