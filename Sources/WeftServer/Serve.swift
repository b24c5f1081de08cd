import ClusterConfig
import Hummingbird
import Logging
import Metrics
import NIOCore
import NIOPosix
import Prometheus
import ServiceLifecycle
import WeftCore

/// `weft serve`: one node in the foreground. SIGTERM or SIGINT shut it down gracefully (HTTP first,
/// then the shards, each finishing its current batch); SIGKILL is survived by recovery on restart.
public enum Serve {
    public static func run(configPath: String, node: UInt64, logLevel: Logger.Level = .info) async throws {
        let config = try ClusterConfiguration.load(path: configPath)
        let id = NodeID(node)
        guard let me = config.node(id) else {
            throw WriteError.invalid("\(configPath): no [[nodes]] entry with id = \(node)")
        }
        var logger = Logger(label: "weft")
        logger.logLevel = logLevel
        logger[metadataKey: "node"] = "\(node)"
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))

        let weftNode = try WeftNode(config: config, node: id, group: MultiThreadedEventLoopGroup.singleton, logger: logger)
        let app = Application(
            router: HTTPAPI.router(node: weftNode, registry: registry),
            configuration: .init(address: .hostname(me.apiAddress.host, port: me.apiAddress.port), serverName: "weft"),
            logger: logger)
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: NodeService(node: weftNode)), .init(service: app)],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger))
        try await group.run()
    }
}

/// Runs the node's shards and peer transport for the life of the service group.
struct NodeService: Service {
    let node: WeftNode
    func run() async throws {
        try await node.start()
        try? await gracefulShutdown()
        await node.stop()
    }
}
