import ClusterConfig
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// `weft status`: asks the nodes of a config file for `/api/v1/cluster/status` and prints tables.
public enum StatusCommand {
    typealias Status = HTTPAPI.StatusResponse

    public static func run(configPath: String) async throws -> String {
        let config = try ClusterConfiguration.load(path: configPath)
        var answers: [UInt64: Status] = [:]
        var errors: [String] = []
        for n in config.nodes {
            guard let url = URL(string: "http://\(n.apiAddress.host):\(n.apiAddress.port)/api/v1/cluster/status") else { continue }
            var req = URLRequest(url: url)
            req.timeoutInterval = 3
            req.setValue("Bearer \(config.operatorToken)", forHTTPHeaderField: "Authorization")
            do {
                let (data, _) = try await URLSession.shared.data(for: req)
                answers[n.id.rawValue] = try JSONDecoder().decode(Status.self, from: data)
            } catch {
                errors.append("node \(n.id) (\(n.apiAddress)): \(error.localizedDescription)")
            }
        }
        var out = "NODE  API                    ANSWERS\n"
        for n in config.nodes {
            out += pad("\(n.id)", 6) + pad("\(n.apiAddress)", 23) + (answers[n.id.rawValue] != nil ? "yes" : "no") + "\n"
        }
        out += "\nSHARD  LEADER  TERM    COMMIT      APPLIED     REPLICAS (node:match)\n"
        for shard in 0..<UInt64(config.shards) {
            // The leader's own view has the match indexes; otherwise any replica's.
            let views = answers.values.compactMap { a in a.shards.first { $0.id == shard } }
            guard let s = views.first(where: { $0.role == "leader" }) ?? views.first else {
                out += pad("\(shard)", 7) + "no answer\n"
                continue
            }
            let reps = s.replicas.map { "\($0.node):\($0.match_index)\($0.role == "learner" ? "(learner)" : "")" }.joined(separator: " ")
            out += pad("\(shard)", 7) + pad(s.leader.map(String.init) ?? "-", 8) + pad("\(s.term)", 8) + pad("\(s.commit_index)", 12)
                + pad("\(s.applied_index)", 12) + reps + "\n"
        }
        // Replicas repairing damaged storage (Docs/faults.md), from each node's own view.
        var repairing: [String] = []
        for (node, a) in answers.sorted(by: { $0.key < $1.key }) {
            for sh in a.shards where sh.repair?.recovering == true {
                repairing.append("shard \(sh.id) on node \(node): recovering (\(sh.repair?.events.last ?? ""))")
            }
        }
        if !repairing.isEmpty { out += "\nREPAIRING\n" + repairing.joined(separator: "\n") + "\n" }
        for e in errors { out += "unreachable: \(e)\n" }
        return out
    }

    static func pad(_ s: String, _ w: Int) -> String { s + String(repeating: " ", count: max(1, w - s.count)) }
}
