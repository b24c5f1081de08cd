import ClusterConfig
import Testing
import WeftCore

@Suite struct PlacementTests {
    private func config(ids: [Int], shards: Int, replication: Int) throws -> ClusterConfiguration {
        let cluster = "name = \"t\"\nsecret = \"\(validSecret)\"\nshards = \(shards)\nreplication = \(replication)"
        return try ClusterConfiguration.parse(document(cluster: cluster, nodes: nodes(ids: ids)), configPath: "/c.toml")
    }

    @Test func exampleClusterPlacesEveryShardOnAllThreeNodes() throws {
        let config = try ClusterConfiguration.load(path: packageRoot() + "/cluster.example.toml")
        #expect(config.replicas(of: ShardID(0)).map(\.rawValue) == [1, 2, 3])
        #expect(config.replicas(of: ShardID(1)).map(\.rawValue) == [2, 3, 1])
        #expect(config.replicas(of: ShardID(5)).map(\.rawValue) == [3, 1, 2])
        #expect(config.shardIDs.count == 8)
    }

    /// Issue 8, item 5: placement followed `nodes.count`, so adding a node moved shards. With the
    /// founders listed, a new [[nodes]] entry changes no shard's initial group and hosts nothing.
    @Test func addingANodeMovesNoShard() throws {
        let cluster = "name = \"t\"\nsecret = \"\(validSecret)\"\nshards = 8\nreplication = 3"
        let before = try ClusterConfiguration.parse(document(cluster: cluster, nodes: nodes(ids: [1, 2, 3])), configPath: "/c.toml")
        let after = try ClusterConfiguration.parse(
            document(cluster: cluster + "\nfounders = [1, 2, 3]", nodes: nodes(ids: [1, 2, 3, 4])), configPath: "/c.toml")
        for shard in before.shardIDs { #expect(before.replicas(of: shard) == after.replicas(of: shard)) }
        #expect(after.shards(hostedBy: NodeID(4)).isEmpty)
        #expect(before.placementBasis == after.placementBasis)
        // Without founders the basis differs: a node started with it refuses to run on data placed by the other.
        let moved = try ClusterConfiguration.parse(document(cluster: cluster, nodes: nodes(ids: [1, 2, 3, 4])), configPath: "/c.toml")
        #expect(moved.placementBasis != before.placementBasis)
    }

    @Test func replicasAreConsecutiveNodesInIDOrderFromShardModuloNodeCount() throws {
        // Listed out of order on purpose: placement sorts by id.
        let config = try config(ids: [30, 10, 50, 20, 40], shards: 12, replication: 3)
        #expect(config.replicas(of: ShardID(0)).map(\.rawValue) == [10, 20, 30])
        #expect(config.replicas(of: ShardID(3)).map(\.rawValue) == [40, 50, 10])
        #expect(config.replicas(of: ShardID(4)).map(\.rawValue) == [50, 10, 20])
        #expect(config.replicas(of: ShardID(5)).map(\.rawValue) == [10, 20, 30])
        #expect(config.replicas(of: ShardID(11)).map(\.rawValue) == [20, 30, 40])
        #expect(config.shards(hostedBy: NodeID(10)).map(\.rawValue) == [0, 3, 4, 5, 8, 9, 10])
        #expect(config.shards(hostedBy: NodeID(99)).isEmpty)
    }

    @Test(arguments: 1...6)
    func placementSpreadsReplicas(nodeCount: Int) throws {
        let ids = (1...nodeCount).map { $0 * 3 }
        for replication in 1...nodeCount {
            for shards in [1, 2, nodeCount, nodeCount + 1, 16] {
                let config = try config(ids: ids, shards: shards, replication: replication)
                var holders: Set<NodeID> = []
                var load: [NodeID: Int] = [:]
                for shard in config.shardIDs {
                    let replicas = config.replicas(of: shard)
                    #expect(replicas.count == replication)
                    #expect(Set(replicas).count == replication, "shard \(shard) has repeated replicas \(replicas)")
                    #expect(replicas.allSatisfy { config.node($0) != nil })
                    #expect(replicas == config.replicas(of: shard), "placement must be deterministic")
                    holders.formUnion(replicas)
                    for node in replicas { load[node, default: 0] += 1 }
                }
                if shards >= nodeCount {
                    #expect(holders.count == nodeCount, "\(nodeCount) nodes, \(shards) shards, r=\(replication)")
                }
                // Round-robin starts: no node holds more than one shard above another.
                if shards >= nodeCount, let most = load.values.max(), let least = load.values.min() {
                    #expect(most - least <= replication)
                }
                for node in config.nodes {
                    #expect(config.shards(hostedBy: node.id).count == (load[node.id] ?? 0))
                }
            }
        }
    }

    @Test func shardOfUserIsUserIDModuloShards() throws {
        let config = try config(ids: [1, 2, 3], shards: 8, replication: 3)
        #expect(config.shard(ofUser: 0) == ShardID(0))
        #expect(config.shard(ofUser: 17) == ShardID(1))
        #expect(config.shard(ofUser: UInt64.max) == ShardID(7))
        let single = try self.config(ids: [1], shards: 1, replication: 1)
        #expect(single.shard(ofUser: 12345) == ShardID(0))
        #expect(single.replicas(of: ShardID(0)) == [NodeID(1)])
    }
}

@Suite struct HostPortTests {
    @Test(arguments: [
        ("127.0.0.1:7101", "127.0.0.1", 7101),
        ("localhost:1", "localhost", 1),
        ("node-1.weft.internal:65535", "node-1.weft.internal", 65535),
        ("0.0.0.0:80", "0.0.0.0", 80),
        ("[::1]:7000", "::1", 7000),
        ("[::]:7000", "::", 7000),
        ("[2001:db8::8a2e:370:7334]:443", "2001:db8::8a2e:370:7334", 443),
        ("[1:2:3:4:5:6:7:8]:1", "1:2:3:4:5:6:7:8", 1),
        ("[::ffff:10.0.0.1]:9", "::ffff:10.0.0.1", 9),
    ])
    func validEndpointsParse(text: String, host: String, port: Int) {
        let parsed = HostPort(text)
        #expect(parsed == HostPort(host: host, port: port))
        #expect(parsed?.description == text)
    }

    @Test(arguments: [
        "", ":", "host", "host:", ":7000", "host:0", "host:65536", "host:+80", "host:-1", "host: 80", "host:80 ",
        "host:0x50", "host:080080", "::1:7000", "[::1:7000", "[::1]7000", "[::1]:", "[]:7000", "[1::2::3]:7",
        "[1:2:3:4:5:6:7:8:9]:1", "[12345::1]:1", "[g::1]:1", "[1.2.3.4]:1", "[::1.2.3.4:5]:1", "256.0.0.1:1",
        "1.2.3:1", "1.2.3.4.5:1", "bad_host:1", "-host:1", "host-:1", "a..b:1", "host.:1", " host:1", "hôst:1",
        "host\n:1",
    ])
    func invalidEndpointsAreRejected(text: String) {
        #expect(HostPort(text) == nil)
    }

    @Test func longHostNamesAreRejected() {
        let label63 = String(repeating: "a", count: 63)
        #expect(HostPort("\(label63).com:1") != nil)
        #expect(HostPort("\(label63)a.com:1") == nil)
        let name253 = [String](repeating: label63, count: 3).joined(separator: ".") + "." + String(repeating: "b", count: 61)
        #expect(name253.utf8.count == 253)
        #expect(HostPort("\(name253):1") != nil)
        #expect(HostPort("\(name253)b:1") == nil)
    }
}
