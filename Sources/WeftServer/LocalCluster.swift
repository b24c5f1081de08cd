import ClusterConfig
import Foundation
import WeftCore

/// `weft local`: every node of a config file as child `weft serve` processes; SIGINT/SIGTERM stop them
/// together (SIGTERM to each, then wait).
public enum LocalCluster {
    public static func run(configPath: String, executable: String) throws -> Int32 {
        let config = try ClusterConfiguration.load(path: configPath)
        var children: [Process] = []
        signal(SIGINT, SIG_IGN)
        signal(SIGTERM, SIG_IGN)
        let stopping = DispatchSemaphore(value: 0)
        var sources: [any DispatchSourceSignal] = []
        for sig in [SIGINT, SIGTERM] {
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler { stopping.signal() }
            s.resume()
            sources.append(s)
        }
        for n in config.nodes {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: executable)
            p.arguments = ["serve", "--config", configPath, "--node", String(n.id.rawValue)]
            try p.run()
            children.append(p)
            print("weft local: node \(n.id) pid \(p.processIdentifier) api http://\(n.apiAddress) peer \(n.peerAddress)")
        }
        print("weft local: \(children.count) nodes running; Ctrl-C stops them")
        fflush(nil)
        stopping.wait()
        print("weft local: stopping")
        for p in children where p.isRunning { kill(p.processIdentifier, SIGTERM) }
        var status: Int32 = 0
        for p in children {
            p.waitUntilExit()
            if p.terminationStatus != 0 { status = 1 }
        }
        _ = sources
        return status
    }
}
