import ClusterConfig
import Foundation
import Hummingbird
import HummingbirdCore
import Logging
import Metrics
import NIOCore
import NIOPosix
import NIOSSL
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

        switch config.storage.fsync {
        case .everyBatch: break
        case .everyBatches, .never:
            logger.warning(
                "storage.fsync = \(config.storage.fsync): an acknowledged write is on a quorum's page cache, not yet on its disks; it survives the kill of any process but not a power loss or OS crash of a quorum (Docs/storage.md)"
            )
        }
        // A bad `[push] ca_file` (or a URL the client would not take) stops the start here, before the node opens anything.
        let webhookTLS = try config.push.webhookURL.map { url in
            try WebhookClient.check(url)
            return try WebhookClient.tls(caFile: config.push.caFile)
        }
        let weftNode = try WeftNode(config: config, node: id, group: MultiThreadedEventLoopGroup.singleton, logger: logger)
        let token = Array(config.operatorToken.utf8)
        let messaging = MessagingAPI(node: weftNode, auth: await UserAuth(config: config))
        weftNode.delivery.hub.observe { records, shard in messaging.noteCommitted(records, shard: shard) }
        let app = Application(
            router: HTTPAPI.router(node: weftNode, registry: registry, api: messaging),
            server: HTTPServerBuilder { responder in APIChannel(responder: responder, node: weftNode, api: messaging, operatorToken: token) },
            configuration: .init(address: .hostname(me.apiAddress.host, port: me.apiAddress.port), serverName: "weft"),
            logger: logger)
        let group = ServiceGroup(
            configuration: .init(
                // Shut down in reverse order: the deadline first (it starts its clock), then HTTP, then the node.
                services: [
                    .init(service: NodeService(node: weftNode)), .init(service: app),
                    .init(service: PushService(node: weftNode, api: messaging, tls: webhookTLS, logger: logger)),
                    .init(service: ShutdownDeadline(limit: .seconds(20), logger: logger)),
                ],
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
        // Device sessions are no tasks of the HTTP server: told here (close code 4000, resume elsewhere).
        node.delivery.hub.closeAll()
        await node.stop()
    }
}

/// Offline push (Docs/delivery.md): the webhook worker, when `[push] webhook_url` is set.
struct PushService: Service {
    let node: WeftNode
    let api: MessagingAPI
    /// Set exactly when `[push] webhook_url` is.
    let tls: TLSConfiguration?
    let logger: Logger
    func run() async throws {
        guard let url = node.config.push.webhookURL, let tls else {
            try? await gracefulShutdown()
            return
        }
        let webhook = WebhookClient(url: url, tls: tls)
        let worker = PushWorker(node: node, api: api, config: node.config.push, webhook: webhook, logger: logger)
        await cancelWhenGracefulShutdown { await worker.run() }
        await webhook.shutdown()
    }
}

/// Bounds graceful shutdown: once it begins, the process exits after `limit` whatever the services are
/// still doing (an in-flight request, a shard thread inside an fdatasync on a sick disk). Every request
/// and proposal has its own deadline, so this is a backstop; exiting here is as safe as a SIGKILL
/// (recovery at the next start).
struct ShutdownDeadline: Service {
    let limit: Duration
    let logger: Logger
    func run() async throws {
        do {
            try await gracefulShutdown()
        } catch {
            return
        }
        let seconds = Double(limit.components.seconds)
        let log = logger
        Thread.detachNewThread {
            Thread.sleep(forTimeInterval: seconds)
            log.critical("graceful shutdown did not finish within \(Int(seconds)) s: exiting now (recovery at the next start)")
            _exit(3)
        }
    }
}
