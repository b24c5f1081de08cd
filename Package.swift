// swift-tools-version:6.1
import PackageDescription

// Module map and import rules: Docs/architecture.md (from ../shared/design.md).
let strict: [SwiftSetting] = [
    .swiftLanguageMode(.v6),
    .enableUpcomingFeature("ExistentialAny"),
]

let package = Package(
    name: "Weft",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "weft", targets: ["weft"]),
        .executable(name: "weft-dump", targets: ["weft-dump"]),
        .executable(name: "weft-faults", targets: ["weft-faults"]),
        .executable(name: "weft-fuzz-decoder", targets: ["weft-fuzz-decoder"]),
        .library(name: "SegmentStore", targets: ["SegmentStore"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird-websocket", from: "2.8.1"),
        .package(url: "https://github.com/hummingbird-project/swift-websocket", from: "1.6.2"),
        .package(url: "https://github.com/apple/swift-nio-extras", from: "1.35.2"),
        .package(url: "https://github.com/apple/swift-http-types", from: "1.8.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird-auth", from: "2.5.0"),
        .package(url: "https://github.com/vapor/jwt-kit", from: "5.8.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "4.5.2"),
        // The offline-push webhook's HTTP client (https, keep-alive): Docs/delivery.md, "Offline push".
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
    ],
    targets: [
        .target(name: "WeftCore", swiftSettings: strict),
        .systemLibrary(
            name: "CLZ4", pkgConfig: "liblz4",
            providers: [.apt(["liblz4-dev"])]),
        .systemLibrary(
            name: "COpenSSL", pkgConfig: "openssl",
            providers: [.apt(["libssl-dev"])]),
        // CRC-32C with the CPU's instruction (no library on the machine has it).
        .target(name: "CCRC32C"),
        // sync_file_range(2) for flushes shared by a lane's shards (Docs/storage.md): a GNU extension
        // Swift's Glibc module does not export.
        .target(name: "CFileSync"),
        .target(name: "SegmentFormat", dependencies: ["WeftCore", "CLZ4", "CCRC32C"], swiftSettings: strict),
        .target(name: "SegmentStore", dependencies: ["WeftCore", "SegmentFormat", "CFileSync"], swiftSettings: strict),
        .target(name: "Raft", dependencies: ["WeftCore"], swiftSettings: strict),
        // The state layer's pure part: the state machine protocol, outcomes, copy-on-write state.
        .target(name: "ShardState", dependencies: ["WeftCore"], swiftSettings: strict),
        // The messaging domain (Docs/messaging.md): records, validation, deterministic apply, relay rule.
        .target(name: "Messaging", dependencies: ["WeftCore", "ShardState"], swiftSettings: strict),
        // Real-time delivery (Docs/delivery.md): sessions as state machines returning actions; no sockets.
        .target(name: "Delivery", dependencies: ["WeftCore"], swiftSettings: strict),
        .target(
            name: "ClusterConfig",
            dependencies: ["WeftCore", .product(name: "TOMLKit", package: "TOMLKit")],
            swiftSettings: strict),
        .target(
            name: "PeerTransport",
            dependencies: [
                "WeftCore", "COpenSSL",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .target(
            name: "Replication",
            dependencies: ["WeftCore", "Raft", "SegmentStore", "SegmentFormat", "ShardState", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        .target(
            name: "WeftServer",
            dependencies: [
                "WeftCore", "Raft", "Replication", "SegmentStore", "ShardState", "ClusterConfig", "PeerTransport", "Messaging", "Delivery",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "HummingbirdBcrypt", package: "hummingbird-auth"),
                .product(name: "HummingbirdOTP", package: "hummingbird-auth"),
                .product(name: "JWTKit", package: "jwt-kit"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "HummingbirdWebSocket", package: "hummingbird-websocket"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "WSCore", package: "swift-websocket"),
                .product(name: "NIOHTTPTypes", package: "swift-nio-extras"),
                .product(name: "NIOHTTPTypesHTTP1", package: "swift-nio-extras"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ],
            swiftSettings: strict),
        .target(
            name: "WeftBench",
            dependencies: [
                "WeftCore", "SegmentFormat", "SegmentStore", "ClusterConfig", "Raft", "Replication", "ShardState",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "HummingbirdWSClient", package: "hummingbird-websocket"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
            ],
            swiftSettings: strict),
        .executableTarget(
            name: "weft",
            dependencies: [
                "WeftBench", "SegmentStore", "WeftServer",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strict),
        .executableTarget(
            name: "weft-dump",
            dependencies: [
                "SegmentFormat", "SegmentStore",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "Tools/weft-dump",
            swiftSettings: strict),
        // The fault harness: a client outside the cluster, so it depends on no Weft module.
        .executableTarget(
            name: "weft-faults",
            dependencies: [
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
            ],
            path: "Tools/weft-faults",
            swiftSettings: strict),
        // Built normally it replays files through the decoders; built by Tools/fuzz.sh with
        // -sanitize=fuzzer and -DFUZZING it is a libFuzzer target.
        .executableTarget(
            name: "weft-fuzz-decoder",
            dependencies: ["SegmentFormat"],
            path: "Tools/fuzz-decoder",
            swiftSettings: strict),
        .target(name: "WeftTesting", dependencies: ["WeftCore", "SegmentStore", "Raft", "ShardState"], swiftSettings: strict),
        .testTarget(name: "SegmentFormatTests", dependencies: ["SegmentFormat", "WeftTesting"], swiftSettings: strict),
        .testTarget(name: "SegmentStoreTests", dependencies: ["SegmentStore", "SegmentFormat", "WeftTesting"], swiftSettings: strict),
        .testTarget(name: "ClusterConfigTests", dependencies: ["ClusterConfig"], swiftSettings: strict),
        .testTarget(name: "PeerTransportTests", dependencies: ["PeerTransport", "WeftTesting"], swiftSettings: strict),
        .testTarget(name: "ReplicationTests", dependencies: ["Replication", "WeftTesting", "ShardState"], swiftSettings: strict),
        .testTarget(name: "ShardStateTests", dependencies: ["ShardState"], swiftSettings: strict),
        .testTarget(name: "MessagingTests", dependencies: ["Messaging", "ShardState", "WeftCore"], swiftSettings: strict),
        .testTarget(name: "DeliveryTests", dependencies: ["Delivery", "WeftCore"], swiftSettings: strict),
        .testTarget(name: "RaftTests", dependencies: ["Raft", "WeftTesting", "ShardState"], swiftSettings: strict),
        .testTarget(
            name: "ClusterTests",
            dependencies: [
                "SegmentStore", "SegmentFormat", "WeftCore", "WeftTesting",
                .product(name: "HummingbirdWSClient", package: "hummingbird-websocket"),
                .product(name: "HummingbirdOTP", package: "hummingbird-auth"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: strict),
        .testTarget(
            name: "WeftServerTests",
            dependencies: ["WeftServer", "Raft", "WeftCore", "WeftTesting", .product(name: "Prometheus", package: "swift-prometheus")],
            swiftSettings: strict),
        .testTarget(name: "ToolTests", dependencies: ["SegmentStore", "SegmentFormat", "WeftTesting"], swiftSettings: strict),
    ]
)
