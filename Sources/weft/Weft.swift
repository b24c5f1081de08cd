import ArgumentParser
import Foundation
import Logging
import SegmentStore
import WeftBench
import WeftServer

@main
struct Weft: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "weft",
        abstract: "Weft: a messaging backend whose storage is a replicated log.",
        subcommands: [ServeCommand.self, LocalCommand.self, StatusCmd.self, Bench.self])
}

struct ServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve", abstract: "Run one node in the foreground (SIGTERM: graceful shutdown).")

    @Option(help: "Cluster configuration file (TOML).")
    var config: String

    @Option(help: "This node's id in the configuration.")
    var node: UInt64

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    func run() async throws {
        guard let level = Logger.Level(rawValue: logLevel) else { throw ValidationError("unknown --log-level \(logLevel)") }
        LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
        do {
            try await Serve.run(configPath: config, node: node, logLevel: level)
        } catch {
            FileHandle.standardError.write(Data("weft serve: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}

struct LocalCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "local", abstract: "Start every node of a configuration as child processes; Ctrl-C stops them all.")

    @Option(help: "Cluster configuration file (TOML).")
    var config: String

    func run() throws {
        let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
        do {
            let status = try LocalCluster.run(configPath: config, executable: exe)
            if status != 0 { throw ExitCode(status) }
        } catch let e as ExitCode {
            throw e
        } catch {
            FileHandle.standardError.write(Data("weft local: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}

struct StatusCmd: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status", abstract: "Print the cluster's nodes and shards (leader, term, commit, replicas).")

    @Option(help: "Cluster configuration file (TOML).")
    var config: String

    func run() async throws {
        do {
            print(try await StatusCommand.run(configPath: config), terminator: "")
        } catch {
            FileHandle.standardError.write(Data("weft status: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks. They print figures; record them in Docs/benchmarks.md.",
        subcommands: [
            BenchStore.self, BenchLog.self, BenchChat.self, BenchPush.self, BenchGroups.self, BenchFailover.self, BenchRestart.self, BenchStateRestart.self,
            BenchIdleClient.self,
        ])
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

    @Option(help: "Segment size at which a segment is sealed and a new one started.")
    var segmentBytes: UInt64 = 64 << 20

    func validate() throws {
        guard records > 0 else { throw ValidationError("--records must be positive") }
        guard batch > 0, batch <= 65_536 else { throw ValidationError("--batch must be 1...65536") }
        guard streams > 0 else { throw ValidationError("--streams must be positive") }
        guard blockBytes >= 256, blockBytes <= 4 << 20 else { throw ValidationError("--block-bytes must be 256...4194304") }
        guard segmentBytes >= 4096 else { throw ValidationError("--segment-bytes must be at least 4096") }
    }

    func run() throws {
        let bench = StoreBench(
            directory: dir, records: records, batch: batch, streams: streams, reads: reads,
            options: StoreOptions(segmentBytesMax: segmentBytes, blockBytesTarget: blockBytes))
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

struct BenchLog: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "log",
        abstract: "Start the cluster of a config file, append ~200-byte records through it, print committed records/s and commit latency.")

    @Option(help: "Cluster configuration file (TOML); its nodes are started as child processes.")
    var config: String

    @Option(help: "How many records to append in all.")
    var records: Int = 20_000

    @Option(help: "Requests in flight.")
    var inflight: Int = 1

    @Option(help: "Records per request.")
    var batch: Int = 1

    @Flag(help: "Send JSON bodies instead of the binary append format.")
    var json = false

    @Flag(help: "Send requests over the append stream (a WebSocket per node, many requests outstanding on each) instead of one HTTP request each.")
    var stream = false

    @Flag(help: "Send each request straight to its shard's leader (a client that knows the leaders) instead of spreading requests over the nodes.")
    var toLeader = false

    @Option(help: "Also write the result as JSON to this file (for comparing runs by script).")
    var jsonOut: String?

    func validate() throws {
        if stream && json { throw ValidationError("--stream sends binary records over one WebSocket per node: it does not take --json") }
        guard records > 0, inflight > 0, inflight <= 4096, batch > 0, batch <= 65_536 else {
            throw ValidationError("--records, --inflight (<= 4096) and --batch (<= 65536) must be positive")
        }
    }

    func run() async throws {
        var bench = try ClusterBench(configPath: config, executable: URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path)
        try await bench.runLog(records: records, inflight: inflight, batch: batch, binary: !json, toLeader: toLeader, stream: stream, jsonOut: jsonOut) { print($0); fflush(nil) }
    }
}

struct BenchChat: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "chat",
        abstract: "Start the cluster of a config file, sign up users, send 1:1 messages through the messaging API; print sends/s, send latency, bytes on disk per message.",
        discussion: "The config needs [messaging] sends_per_minute >= --messages and bcrypt_cost = 4 (Docs/benchmarks.md).")

    @Option(help: "Cluster configuration file (TOML); its nodes are started as child processes.")
    var config: String

    @Option(help: "Users (each a contact of the next).")
    var users: Int = 200

    @Option(help: "Messages to send with --inflight in flight.")
    var messages: Int = 20_000

    @Option(help: "Requests in flight.")
    var inflight: Int = 64

    @Option(help: "Messages then sent one at a time (latency at 1 in flight); 0 skips.")
    var single: Int = 2_000

    @Option(help: "Single-record raw log appends at the same concurrency, for comparison; 0 skips.")
    var logRecords: Int = 20_000

    @Option(help: "Also write the result as JSON to this file.")
    var jsonOut: String?

    func validate() throws {
        guard users >= 2, messages > 0, inflight > 0, inflight <= 4096, single >= 0, logRecords >= 0 else {
            throw ValidationError("--users >= 2, --messages > 0, --inflight 1...4096")
        }
    }

    func run() async throws {
        var bench = try ClusterBench(configPath: config, executable: URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path)
        try await bench.runChat(users: users, messages: messages, inflight: inflight, single: single, logRecords: logRecords, jsonOut: jsonOut) {
            print($0)
            fflush(nil)
        }
    }
}

struct BenchPush: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "push",
        abstract: "Start the cluster of a config file, connect devices over /api/v1/ws; print send → push latency per send rate, and memory per idle session.",
        discussion: """
            Push latency: --users devices, one per user, on random nodes; messages to contacts at each of --rates (msgs/s, open loop) \
            for --step-seconds each. Idle sessions (--idle-sessions N): N sessions that authenticate, resume and only ping, from \
            127.0.0.2 … 127.0.0.(1+k); the nodes' resident memory before and after. More sessions than one process can hold \
            (its open file limit): --idle-clients K, K child processes holding N / K each. The config needs bcrypt_cost = 4 and \
            [messaging] sends_per_minute at least what one user sends in the sweep (the bench says how much) (Docs/benchmarks.md).
            """)

    @Option(help: "Cluster configuration file (TOML); its nodes are started as child processes.")
    var config: String?

    @Option(help: "Users in the push sweep, one device each (each a contact of the next).")
    var users: Int = 200

    @Option(help: "Send rates to sweep, messages/s, comma-separated; \"none\" for no sweep.")
    var rates: String = "250,500,1000,2000"

    @Option(help: "Seconds per rate.")
    var stepSeconds: Double = 5

    @Option(help: "How senders send: ws (a send frame on the sender's socket) or http (POST /api/v1/messages).")
    var sendVia: String = "ws"

    @Option(help: "Keep-alive connections for --send-via http.")
    var httpConnections: Int = 128

    @Option(help: "Seconds after a step's last send by which every acknowledged message must have been pushed (else it is lost).")
    var pushTimeout: Double = 10

    @Option(help: "Idle sessions to open before the sweep (0: none); they stay open during it.")
    var idleSessions: Int = 0

    @Option(help: "Loopback source addresses for idle sessions: 127.0.0.2 … 127.0.0.(1+k).")
    var sourceAddresses: Int = 8

    @Option(help: "Idle sessions being opened at a time (over all idle clients).")
    var connectConcurrency: Int = 256

    @Option(help: "Processes holding the idle sessions: 1, this one; K > 1, K child processes with N / K sessions each (for more than one process's open file limit).")
    var idleClients: Int = 1

    @Option(help: "Seconds the idle sessions are held (servers' idle CPU measured) before memory is read.")
    var idleHold: Double = 10

    @Option(help: "Seconds to wait, nodes' pids printed, before opening idle sessions (to attach a profiler).")
    var pauseBeforeSessions: Double = 0

    @Option(help: "Also write the result as JSON to this file.")
    var jsonOut: String?

    @Option(help: "Also write a self-contained HTML report (figures, latency over time, histogram) to this file.")
    var htmlOut: String?

    @Option(help: "Only write --html-out from the JSON result of an earlier run (no cluster is started).")
    var reportFrom: String?

    func validate() throws {
        guard users >= 2, stepSeconds > 0, pushTimeout > 0, idleSessions >= 0, sourceAddresses >= 1, sourceAddresses <= 250,
            connectConcurrency >= 1, httpConnections >= 1, idleHold >= 0, pauseBeforeSessions >= 0, idleClients >= 1, idleClients <= 64
        else { throw ValidationError("--users >= 2, --source-addresses 1...250, --idle-clients 1...64, and the counts and seconds must be positive") }
        guard SendVia(rawValue: sendVia) != nil else { throw ValidationError("--send-via is ws or http") }
        _ = try rateList()
        if reportFrom != nil && htmlOut == nil { throw ValidationError("--report-from needs --html-out") }
        if reportFrom == nil && config == nil { throw ValidationError("--config is required (or --report-from)") }
    }

    typealias SendVia = ClusterBench.SendPath

    func rateList() throws -> [Double] {
        if rates == "none" { return [] }
        let list = rates.split(separator: ",").map { Double($0.trimmingCharacters(in: .whitespaces)) }
        guard !list.isEmpty, list.allSatisfy({ ($0 ?? 0) > 0 }) else { throw ValidationError("--rates: positive numbers separated by commas, or none") }
        return list.compactMap { $0 }
    }

    func run() async throws {
        if let reportFrom, let htmlOut {
            try Data(BenchReport.pushHTML(fromJSON: reportFrom).utf8).write(to: URL(fileURLWithPath: htmlOut))
            print("report written to \(htmlOut)")
            return
        }
        var o = ClusterBench.PushOptions()
        o.users = users
        o.rates = try rateList()
        o.stepSeconds = stepSeconds
        o.sendVia = SendVia(rawValue: sendVia) ?? .ws
        o.httpConnections = httpConnections
        o.pushTimeout = pushTimeout
        o.idleSessions = idleSessions
        o.sourceAddresses = sourceAddresses
        o.connectConcurrency = connectConcurrency
        o.idleClients = idleClients
        o.idleHold = idleHold
        o.pauseBeforeSessions = pauseBeforeSessions
        o.jsonOut = jsonOut
        o.htmlOut = htmlOut
        guard let config else { throw ValidationError("--config is required") }
        var bench = try ClusterBench(configPath: config, executable: URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path)
        try await bench.runPush(o) {
            print($0)
            fflush(nil)
        }
    }
}

/// Internal: one of the processes of `weft bench push --idle-clients K` (started by it, speaking JSON lines
/// on stdout; stdin's end stops it).
struct BenchIdleClient: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "idle-client",
        abstract: "Internal, started by `weft bench push --idle-clients`: hold idle sessions [from, to) until stdin ends.",
        shouldDisplay: false)

    @Option(help: "The nodes' API addresses, host:port, comma-separated, in the config's order.")
    var nodes: String

    @Option(help: "A file of the users' tokens, one per line.")
    var tokens: String

    @Option(help: "First session (of the bench's numbering).")
    var from: Int

    @Option(help: "Session after the last.")
    var to: Int

    @Option(help: "Loopback source addresses: 127.0.0.2 … 127.0.0.(1+k).")
    var sourceAddresses: Int = 8

    @Option(help: "Sessions being opened at a time.")
    var connectConcurrency: Int = 256

    func validate() throws {
        guard from >= 0, to >= from, sourceAddresses >= 1, sourceAddresses <= 250, connectConcurrency >= 1 else {
            throw ValidationError("0 <= --from <= --to, --source-addresses 1...250, --connect-concurrency >= 1")
        }
        guard !nodes.split(separator: ",").isEmpty else { throw ValidationError("--nodes: at least one host:port") }
    }

    func run() async throws {
        let o = ClusterBench.IdleClientOptions(
            nodes: nodes.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }, tokensFile: tokens, range: from..<to,
            sourceAddresses: sourceAddresses, connectConcurrency: connectConcurrency)
        do {
            try await ClusterBench.runIdleClient(o)
        } catch {
            FileHandle.standardError.write(Data("weft bench idle-client: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}

struct BenchGroups: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "groups",
        abstract: "Start the cluster of a config file, create groups, connect every member over /api/v1/ws; print fan-out pushes/s and send → last-member push latency per group size.",
        discussion: """
            Per size of --sizes: that many users, all contacts of the first, in one group, one device each on random nodes; --senders members \
            send --rate group messages/s (open loop) for --seconds. The config needs bcrypt_cost = 4, [messaging] group_members_max >= the \
            largest size, actions_per_minute above it and sends_per_minute at least one sender's messages (the bench says) (Docs/benchmarks.md).
            """)

    @Option(help: "Cluster configuration file (TOML); its nodes are started as child processes.")
    var config: String?

    @Option(help: "Group sizes (members, creator included), comma-separated, one phase each.")
    var sizes: String = "50,500,2000"

    @Option(help: "Group messages per second, all senders together (open loop).")
    var rate: Double = 10

    @Option(help: "Seconds of sending per group.")
    var seconds: Double = 20

    @Option(help: "Members that send (spread over the group).")
    var senders: Int = 4

    @Option(help: "Seconds after the last send by which every acknowledged message must have reached every member (else it is lost).")
    var pushTimeout: Double = 10

    @Option(help: "Devices being connected at a time.")
    var connectConcurrency: Int = 64

    @Option(help: "Also write the result as JSON to this file.")
    var jsonOut: String?

    @Option(help: "Also write a self-contained HTML report to this file.")
    var htmlOut: String?

    @Option(help: "Only write --html-out from the JSON result of an earlier run (no cluster is started).")
    var reportFrom: String?

    func sizeList() throws -> [Int] {
        let list = sizes.split(separator: ",").map { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard !list.isEmpty, list.allSatisfy({ ($0 ?? 0) >= 2 && ($0 ?? 0) <= 10_000 }) else {
            throw ValidationError("--sizes: group sizes 2...10000 separated by commas")
        }
        return list.compactMap { $0 }
    }

    func validate() throws {
        _ = try sizeList()
        guard rate > 0, seconds > 0, senders >= 1, pushTimeout > 0, connectConcurrency >= 1 else {
            throw ValidationError("--rate, --seconds, --senders, --push-timeout and --connect-concurrency must be positive")
        }
        if reportFrom != nil && htmlOut == nil { throw ValidationError("--report-from needs --html-out") }
        if reportFrom == nil && config == nil { throw ValidationError("--config is required (or --report-from)") }
    }

    func run() async throws {
        if let reportFrom, let htmlOut {
            try Data(BenchReport.groupsHTML(fromJSON: reportFrom).utf8).write(to: URL(fileURLWithPath: htmlOut))
            print("report written to \(htmlOut)")
            return
        }
        var o = ClusterBench.GroupOptions()
        o.sizes = try sizeList()
        o.rate = rate
        o.seconds = seconds
        o.senders = senders
        o.pushTimeout = pushTimeout
        o.connectConcurrency = connectConcurrency
        o.jsonOut = jsonOut
        o.htmlOut = htmlOut
        guard let config else { throw ValidationError("--config is required") }
        var bench = try ClusterBench(configPath: config, executable: URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path)
        try await bench.runGroups(o) {
            print($0)
            fflush(nil)
        }
    }
}

struct BenchRestart: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restart",
        abstract: "Start the cluster of a config file, write records, SIGKILL one node and restart it; print how long until it serves again.")

    @Option(help: "Cluster configuration file (TOML); its nodes are started as child processes.")
    var config: String

    @Option(help: "How many records to write before the kill.")
    var records: Int = 200_000

    @Option(help: "Records per append request.")
    var batch: Int = 1024

    func validate() throws {
        guard records > 0, batch > 0, batch <= 65_536 else { throw ValidationError("--records and --batch (<= 65536) must be positive") }
    }

    func run() async throws {
        var bench = try ClusterBench(configPath: config, executable: URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path)
        try await bench.runRestart(records: records, batch: batch) { print($0); fflush(nil) }
    }
}

struct BenchStateRestart: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "state-restart",
        abstract: "Write a shard of many records and users' state on one replica, then time its restart (warm and cold page cache).")

    @Option(help: "A new, empty directory for the shard.")
    var dir: String

    @Option(help: "Log entries to write.")
    var records: Int = 10_000_000

    @Option(help: "Users (one key and one stream each) the records update in turn.")
    var users: Int = 1_000_000

    @Option(help: "Entries after the snapshot, replayed at the restart.")
    var tail: Int = 50_000

    @Flag(help: "Only time the restarts of a shard an earlier run wrote to --dir.")
    var reopenOnly = false

    func validate() throws {
        guard records > 0, users > 0, tail >= 0, tail < records else { throw ValidationError("--records, --users must be positive, 0 <= --tail < --records") }
    }

    func run() throws {
        try StateRestartBench(directory: dir, records: records, users: users, tail: tail, reopenOnly: reopenOnly).run { print($0); fflush(nil) }
    }
}

struct BenchFailover: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "failover",
        abstract: "Start the cluster of a config file, SIGKILL the leader of shard 0 repeatedly, print the time to the next commit.")

    @Option(help: "Cluster configuration file (TOML); its nodes are started as child processes.")
    var config: String

    @Option(help: "How many leader kills.")
    var rounds: Int = 5

    func run() async throws {
        var bench = try ClusterBench(configPath: config, executable: URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path)
        try await bench.runFailover(rounds: rounds) { print($0); fflush(nil) }
    }
}
