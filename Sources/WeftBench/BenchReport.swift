import Foundation

/// Self-contained HTML reports of bench results (`weft bench push --html-out FILE`): the figures as
/// tables and charts as inline SVG drawn here — no script, font or file from elsewhere, so the page
/// opens anywhere and can be kept next to the JSON it was made from.
public enum BenchReport {
    /// Colours of the rate steps, in order (then again).
    static let palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]

    /// The push bench's report: targets, figures, latency over time, latency histogram, idle sessions.
    public static func pushHTML(_ r: ClusterBench.PushResult) -> String {
        var body = "<h1>Weft: WebSocket delivery benchmark</h1>\n"
        body += "<p class=\"meta\">\(esc(r.date)) · \(r.nodes) nodes, \(r.shards) shards, replication \(r.replication), fsync \(esc(r.fsync)) · "
        body += "\(r.users) users, one device each · sends \(r.send_via == .ws ? "over the sender's WebSocket" : "with POST /api/v1/messages") · "
        body += "\(fmt(r.step_seconds)) s per rate · cluster and load generator on one machine</p>\n"
        if let command = r.command { body += "<pre class=\"cmd\">\(esc(command))</pre>\n" }
        body += targets(r)
        if !r.steps.isEmpty {
            body += "<h2>Push latency per rate</h2>\n"
            body += "<p>Latency is from each message's intended send time (open loop: a late send keeps its stamp) to the moment the "
            body += "recipient's socket read the event. \"Lost\" counts messages the server acknowledged but never pushed within "
            body += "\(fmt(r.push_timeout_s)) s of the step's last send; \"never pushed\" those still missing at the end of the sweep (after one more "
            body += "timeout): the difference arrived late.</p>\n"
            body += stepsTable(r)
            body += "<h2>Latency over time</h2>\n<p>Per 100 ms of send time: median, p99 and maximum push latency (log scale). "
            body += "Shaded bands are the rate steps; red marks are windows with lost pushes.</p>\n"
            body += timeChart(r.steps.map { ("\(Int($0.target_rate)) msgs/s", $0.series) })
            body += "<h2>Latency histogram</h2>\n<p>Share of each step's pushes per latency bucket (10 buckets per decade, log scale).</p>\n"
            body += histogramChart(edges: r.histogram_edges_us, bands: r.steps.map { ("\(Int($0.target_rate)) msgs/s", $0.histogram_counts) })
        }
        if let idle = r.idle { body += idleSection(idle) }
        return page(title: "Weft push benchmark \(r.date)", body: body)
    }

    /// The page around a report's body: inline style only.
    static func page(title: String, body: String) -> String {
        """
            <!DOCTYPE html>
            <html lang="en"><head><meta charset="utf-8"><title>\(esc(title))</title>
            <style>
            body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 980px; margin: 2em auto; padding: 0 1em; }
            h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
            .meta { color: #555; } pre.cmd { background: #f5f5f5; padding: .6em; overflow-x: auto; font-size: 13px; }
            table { border-collapse: collapse; margin: .6em 0; font-variant-numeric: tabular-nums; }
            th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; } th { background: #f3f3f3; }
            td.l, th.l { text-align: left; } .met { color: #1a7f37; font-weight: 600; } .missed { color: #c62828; font-weight: 600; }
            svg { display: block; margin: .5em 0; } svg text { font: 12px system-ui, sans-serif; fill: #333; }
            </style></head><body>
            \(body)
            </body></html>

            """
    }

    /// Rewrites the report of a `--json-out` result (for example after a change to this page).
    public static func pushHTML(fromJSON path: String) throws -> String {
        pushHTML(try JSONDecoder().decode(ClusterBench.PushResult.self, from: Data(contentsOf: URL(fileURLWithPath: path))))
    }

    // MARK: Sections

    static func targets(_ r: ClusterBench.PushResult) -> String {
        var rows: [String] = []
        if let s = r.steps.first(where: { $0.target_rate == 2000 }) ?? r.steps.max(by: { $0.target_rate < $1.target_rate }) {
            let met = s.target_rate >= 2000 && s.push_latency_us.p99 <= 10_000 && s.lost_pushes == 0 && s.achieved_rate >= 0.95 * s.target_rate
            rows.append(
                row([
                    "push p99 ≤ 10 ms at 2 000 msgs/s",
                    "p99 \(ms(s.push_latency_us.p99)) ms at \(Int(s.target_rate)) msgs/s offered, \(Int(s.achieved_rate)) achieved, \(s.lost_pushes) lost",
                    verdict(met),
                ]))
        }
        if let m = r.max_rate_p99_under_100ms {
            rows.append(row(["highest rate with push p99 under 100 ms", "\(Int(m)) msgs/s", ""]))
        } else if !r.steps.isEmpty {
            rows.append(row(["highest rate with push p99 under 100 ms", "none of the rates run", ""]))
        }
        if let i = r.idle {
            let perSession = i.server_bytes_per_session
            let met = i.sessions_ready >= 100_000 && perSession <= 8192
            let fewer = i.sessions_ready < 100_000 ? " (measured with \(i.sessions_ready) sessions, not 100 000)" : ""
            rows.append(
                row([
                    "100 000 idle sessions, ≤ 8 KiB each (server)",
                    "\(i.sessions_ready) sessions, \(fmt(perSession / 1024)) KiB each; 100 000 would take \(fmt(perSession * 100_000 / 1_073_741_824)) GiB",
                    verdict(met) + fewer,
                ]))
        }
        guard !rows.isEmpty else { return "" }
        return "<h2>Targets</h2>\n<table><tr><th class=\"l\">target</th><th class=\"l\">measured</th><th class=\"l\">met?</th></tr>\n"
            + rows.joined(separator: "\n") + "</table>\n"
    }

    static func stepsTable(_ r: ClusterBench.PushResult) -> String {
        var t = "<table><tr><th>rate offered</th><th>sent/s</th><th>achieved/s</th><th>acked</th><th>refused</th><th>unanswered</th>"
        t += "<th>lost</th><th>never pushed</th><th>dup</th><th>push p50</th><th>p99</th><th>p99.9</th><th>max</th><th>ack p50</th><th>ack p99</th>"
        t += "<th>send lag p99</th><th>server cores</th><th>client cores</th></tr>\n"
        for (i, s) in r.steps.enumerated() {
            let swatch = "<span style=\"color:\(palette[i % palette.count])\">■</span> "
            t += "<tr><td>\(swatch)\(Int(s.target_rate))</td><td>\(Int(s.sent_rate))</td><td>\(Int(s.achieved_rate))</td><td>\(s.acked)</td>"
            t += "<td>\(s.refused)</td><td>\(s.unanswered)</td><td>\(s.lost_pushes)</td><td>\(s.never_pushed.map(String.init) ?? "–")</td><td>\(s.duplicate_pushes)</td>"
            t += "<td>\(ms(s.push_latency_us.p50))</td><td>\(ms(s.push_latency_us.p99))</td><td>\(ms(s.push_latency_us.p999))</td><td>\(ms(s.push_latency_us.max))</td>"
            t += "<td>\(ms(s.ack_latency_us.p50))</td><td>\(ms(s.ack_latency_us.p99))</td><td>\(ms(s.send_lag_us.p99))</td>"
            t += "<td>\(s.server_cores_busy.map { fmt($0) } ?? "?")</td><td>\(fmt(s.client_cores_busy))</td></tr>\n"
        }
        return t + "</table>\n<p>Latencies in ms. Messages: \(r.steps.map { "\($0.messages)" }.joined(separator: ", ")).</p>\n"
    }

    static func idleSection(_ i: ClusterBench.IdleResult) -> String {
        var t = "<h2>Idle sessions</h2>\n<p>\(i.sessions_ready) of \(i.sessions_target) sessions connected, authenticated and resumed "
        t += "(\(i.failed) failed\(i.first_failure.map { "; first: " + esc($0) } ?? "")), from \(i.source_addresses) loopback source addresses, "
        t += "\(i.connect_concurrency) being opened at a time, \(i.users) users; then held idle (a ping a minute).</p>\n"
        t += "<table><tr><th class=\"l\">figure</th><th>value</th></tr>\n"
        let rows: [(String, String)] = [
            ("connect rate (to ready)", "\(Int(i.connect_rate)) sessions/s (\(fmt(i.connect_seconds)) s)"),
            ("server memory per session (VmRSS growth, all nodes)", "\(Int(i.server_bytes_per_session)) bytes = \(fmt(i.server_bytes_per_session / 1024)) KiB"),
            ("node VmRSS before → after (MiB)", zip(i.rss_before_kib, i.rss_after_kib).map { "\($0 / 1024) → \($1 / 1024)" }.joined(separator: ", ")),
            ("client memory per session", "\(Int(i.client_bytes_per_session)) bytes"),
            ("kernel slab growth per session (both ends: sockets, files, epoll)", "\(Int(i.kernel_slab_bytes_per_session)) bytes"),
            ("servers' CPU while idle (before any session)", "\(i.server_cores_busy_idle.map { fmt($0) } ?? "?") cores (\(i.server_cores_busy_baseline.map { fmt($0) } ?? "?"))"),
            ("closed by the servers while held", "\(i.closed_while_held) \(i.close_codes.isEmpty ? "" : esc("\(i.close_codes)"))"),
            ("open files limit (bench and nodes)", "\(i.open_file_limit)"),
        ]
        for (k, v) in rows { t += "<tr><td class=\"l\">\(k)</td><td>\(v)</td></tr>\n" }
        return t + "</table>\n"
    }

    // MARK: Charts

    /// p50, p99 and max per 100 ms window against time since the sweep began, log latency axis; one
    /// shaded band per step (`label`), a dashed line at the target (µs).
    static func timeChart(
        _ steps: [(label: String, series: [ClusterBench.SeriesPoint])], targetUS: Double = 10_000, targetLabel: String = "target p99 10 ms",
        lostLabel: String = "✕ lost pushes in the window"
    ) -> String {
        let points = steps.flatMap(\.series)
        guard let tEnd = points.map({ $0.t_ms + 100 }).max(), tEnd > 0 else { return "<p>No pushes.</p>" }
        let values = points.flatMap { [$0.p50_us, $0.p99_us, $0.max_us] }.filter { $0 > 0 }
        let axis = LogAxis(lowUS: values.min() ?? 100, highUS: values.max() ?? 1000)
        let plot = Plot(width: 940, height: 360, left: 60, right: 20, top: 24, bottom: 64)
        func x(_ tms: Double) -> Double { plot.left + tms / tEnd * plot.innerWidth }
        func y(_ us: Double) -> Double { plot.top + (1 - axis.position(us)) * plot.innerHeight }
        var svg = plot.open(label: "push latency over time")
        // Steps: shaded bands with their rate.
        for (i, s) in steps.enumerated() {
            guard let a = s.series.first?.t_ms, let b = s.series.last?.t_ms else { continue }
            let c = palette[i % palette.count]
            svg += "<rect x=\"\(f(x(a)))\" y=\"\(f(plot.top))\" width=\"\(f(max(1, x(b + 100) - x(a))))\" height=\"\(f(plot.innerHeight))\" fill=\"\(c)\" fill-opacity=\"0.07\"/>"
            svg += "<text x=\"\(f(x(a) + 2))\" y=\"\(f(plot.top - 6))\" fill=\"\(c)\">\(esc(s.label))</text>"
        }
        svg += axis.yGrid(plot: plot, y: y)
        // The issue's target (push: p99 ≤ 10 ms at 2 000 msgs/s).
        if axis.position(targetUS) >= 0, axis.position(targetUS) <= 1 {
            svg += "<line x1=\"\(f(plot.left))\" x2=\"\(f(plot.left + plot.innerWidth))\" y1=\"\(f(y(targetUS)))\" y2=\"\(f(y(targetUS)))\" stroke=\"#2e7d32\" stroke-dasharray=\"6 4\"/>"
            svg += "<text x=\"\(f(plot.left + plot.innerWidth - 4))\" y=\"\(f(y(targetUS) - 4))\" text-anchor=\"end\" fill=\"#2e7d32\">\(esc(targetLabel))</text>"
        }
        // x axis: seconds.
        let step = niceStep(tEnd / 1000 / 10)
        var t = 0.0
        while t <= tEnd / 1000 {
            svg += "<line x1=\"\(f(x(t * 1000)))\" x2=\"\(f(x(t * 1000)))\" y1=\"\(f(plot.top + plot.innerHeight))\" y2=\"\(f(plot.top + plot.innerHeight + 4))\" stroke=\"#888\"/>"
            svg += "<text x=\"\(f(x(t * 1000)))\" y=\"\(f(plot.top + plot.innerHeight + 18))\" text-anchor=\"middle\">\(tickLabel(t, step: step))</text>"
            t += step
        }
        svg += "<text x=\"\(f(plot.left + plot.innerWidth / 2))\" y=\"\(f(plot.top + plot.innerHeight + 36))\" text-anchor=\"middle\">seconds since the sweep began (by intended send time)</text>"
        svg += "<text transform=\"translate(14 \(f(plot.top + plot.innerHeight / 2))) rotate(-90)\" text-anchor=\"middle\">push latency (ms)</text>"
        // One polyline per step and figure, so that the lines do not join across the pauses between steps.
        let lines: [(KeyPath<ClusterBench.SeriesPoint, Double>, String, Double, String)] = [
            (\.max_us, "#9e9e9e", 1, "max"), (\.p99_us, "#e65100", 1.6, "p99"), (\.p50_us, "#0d47a1", 1.6, "p50"),
        ]
        for s in steps {
            for (key, colour, width, _) in lines {
                let pts = s.series.filter { $0[keyPath: key] > 0 }.map { "\(f(x($0.t_ms + 50))),\(f(y($0[keyPath: key])))" }
                if !pts.isEmpty {
                    svg += "<polyline fill=\"none\" stroke=\"\(colour)\" stroke-width=\"\(width)\" points=\"\(pts.joined(separator: " "))\"/>"
                }
            }
            for p in s.series where p.lost > 0 {
                svg += "<text x=\"\(f(x(p.t_ms + 50)))\" y=\"\(f(plot.top + 28))\" text-anchor=\"middle\" fill=\"#c62828\">✕<title>\(p.lost) lost</title></text>"
            }
        }
        svg += plot.legend(lines.reversed().map { ($0.1, $0.3) } + [("#c62828", lostLabel)])
        return svg + "</svg>\n"
    }

    /// Share of each step's pushes per log bucket (upper `edges`, µs), one line per step (`label`).
    static func histogramChart(edges: [Double], bands: [(label: String, counts: [Int])], xLabel: String = "push latency (ms, log scale)") -> String {
        let used = bands.flatMap { s in s.counts.enumerated().filter { $0.element > 0 }.map(\.offset) }
        guard let lo = used.min(), let hi = used.max(), !edges.isEmpty else { return "<p>No pushes.</p>" }
        let first = max(0, lo - 1)
        let last = min(edges.count - 1, hi + 1)
        let lower = first == 0 ? edges[0] / pow(10, 0.1) : edges[first - 1]
        let axis = LogAxis(lowUS: lower, highUS: edges[last], pad: false)
        let shares = bands.map { s -> [Double] in
            let total = Double(max(1, s.counts.reduce(0, +)))
            return s.counts.map { Double($0) / total * 100 }
        }
        let peak = max(0.1, shares.flatMap { $0 }.max() ?? 1)
        let gridStep = niceStep(peak / 4)
        let top = ceil(peak / gridStep) * gridStep
        let plot = Plot(width: 940, height: 320, left: 60, right: 20, top: 16, bottom: 64)
        func x(_ us: Double) -> Double { plot.left + axis.position(us) * plot.innerWidth }
        func y(_ pct: Double) -> Double { plot.top + (1 - pct / top) * plot.innerHeight }
        var svg = plot.open(label: "push latency histogram")
        for k in 0...Int((top / gridStep).rounded()) {
            let v = gridStep * Double(k)
            svg += "<line x1=\"\(f(plot.left))\" x2=\"\(f(plot.left + plot.innerWidth))\" y1=\"\(f(y(v)))\" y2=\"\(f(y(v)))\" stroke=\"#e0e0e0\"/>"
            svg += "<text x=\"\(f(plot.left - 6))\" y=\"\(f(y(v) + 4))\" text-anchor=\"end\">\(tickLabel(v, step: gridStep)) %</text>"
        }
        svg += axis.xTicks(plot: plot, x: x)
        svg += "<text x=\"\(f(plot.left + plot.innerWidth / 2))\" y=\"\(f(plot.top + plot.innerHeight + 36))\" text-anchor=\"middle\">\(esc(xLabel))</text>"
        for i in bands.indices {
            var pts: [String] = []
            for b in first...last {
                let a = b == 0 ? edges[0] / pow(10, 0.1) : edges[b - 1]
                let v = b < shares[i].count ? shares[i][b] : 0
                pts.append("\(f(x(a))),\(f(y(v)))")
                pts.append("\(f(x(edges[b]))),\(f(y(v)))")
            }
            svg += "<polyline fill=\"none\" stroke=\"\(palette[i % palette.count])\" stroke-width=\"1.8\" points=\"\(pts.joined(separator: " "))\"/>"
        }
        svg += plot.legend(bands.enumerated().map { (palette[$0.offset % palette.count], $0.element.label) })
        return svg + "</svg>\n"
    }

    /// A chart's frame: sizes and margins (pixels).
    struct Plot {
        var width: Double
        var height: Double
        var left: Double
        var right: Double
        var top: Double
        var bottom: Double
        var innerWidth: Double { width - left - right }
        var innerHeight: Double { height - top - bottom }

        /// A row of coloured line samples and names along the bottom edge.
        func legend(_ items: [(colour: String, name: String)]) -> String {
            var s = ""
            var x = left
            let y = height - 10
            for (colour, name) in items {
                s += "<line x1=\"\(f(x))\" x2=\"\(f(x + 18))\" y1=\"\(f(y - 4))\" y2=\"\(f(y - 4))\" stroke=\"\(colour)\" stroke-width=\"2\"/>"
                s += "<text x=\"\(f(x + 22))\" y=\"\(f(y))\">\(esc(name))</text>"
                x += 40 + Double(name.count) * 7
            }
            return s
        }

        func open(label: String) -> String {
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(f(width))\" height=\"\(f(height))\" viewBox=\"0 0 \(f(width)) \(f(height))\" role=\"img\" aria-label=\"\(label)\">"
                + "<rect x=\"\(f(left))\" y=\"\(f(top))\" width=\"\(f(innerWidth))\" height=\"\(f(innerHeight))\" fill=\"none\" stroke=\"#bbb\"/>"
        }
    }

    /// A log10 axis over latencies given in µs, labelled in ms, from a decade (or half) below to one above.
    struct LogAxis {
        let low: Double
        let high: Double

        init(lowUS: Double, highUS: Double, pad: Bool = true) {
            let lo = log10(max(1, lowUS))
            let hi = log10(max(lowUS * 1.01, highUS))
            low = pad ? floor(lo) : lo
            high = pad ? max(ceil(hi), low + 1) : max(hi, lo + 0.1)
        }

        /// 0 at the bottom (left), 1 at the top (right).
        func position(_ us: Double) -> Double { (log10(max(1, us)) - low) / (high - low) }

        /// The latencies (µs) to draw a line at: 1, 2 and 5 of every decade in range.
        var ticks: [(us: Double, major: Bool)] {
            var out: [(Double, Bool)] = []
            for d in Int(floor(low))...Int(ceil(high)) {
                for m in [1.0, 2, 5] {
                    let us = m * pow(10, Double(d))
                    let l = log10(us)
                    if l >= low - 1e-9, l <= high + 1e-9 { out.append((us, m == 1)) }
                }
            }
            return out
        }

        func yGrid(plot: Plot, y: (Double) -> Double) -> String {
            var s = ""
            for (us, major) in ticks {
                s += "<line x1=\"\(f(plot.left))\" x2=\"\(f(plot.left + plot.innerWidth))\" y1=\"\(f(y(us)))\" y2=\"\(f(y(us)))\" stroke=\"\(major ? "#cfcfcf" : "#ececec")\"/>"
                s += "<text x=\"\(f(plot.left - 6))\" y=\"\(f(y(us) + 4))\" text-anchor=\"end\"\(major ? "" : " fill-opacity=\"0.6\"")>\(label(us))</text>"
            }
            return s
        }

        func xTicks(plot: Plot, x: (Double) -> Double) -> String {
            var s = ""
            for (us, major) in ticks {
                s += "<line x1=\"\(f(x(us)))\" x2=\"\(f(x(us)))\" y1=\"\(f(plot.top))\" y2=\"\(f(plot.top + plot.innerHeight))\" stroke=\"\(major ? "#cfcfcf" : "#ececec")\"/>"
                s += "<text x=\"\(f(x(us)))\" y=\"\(f(plot.top + plot.innerHeight + 18))\" text-anchor=\"middle\"\(major ? "" : " fill-opacity=\"0.6\"")>\(label(us))</text>"
            }
            return s
        }

        func label(_ us: Double) -> String {
            let msValue = us / 1000
            return msValue >= 1 ? String(Int(msValue.rounded())) : fmt(msValue)
        }
    }

    // MARK: Formatting

    static func row(_ cells: [String]) -> String { "<tr>" + cells.map { "<td class=\"l\">\($0)</td>" }.joined() + "</tr>" }

    static func verdict(_ met: Bool) -> String { met ? "<span class=\"met\">met</span>" : "<span class=\"missed\">not met</span>" }

    /// A latency in µs as ms with three significant figures at most.
    static func ms(_ us: UInt64) -> String { fmt(Double(us) / 1000) }

    static func fmt(_ v: Double) -> String {
        if v == 0 { return "0" }
        if abs(v) >= 100 { return String(Int(v.rounded())) }
        if abs(v) >= 10 { return fixed(v, 1) }
        if abs(v) >= 1 { return fixed(v, 2) }
        return fixed(v, 3)
    }

    /// An axis label: as many decimals as the tick step needs.
    static func tickLabel(_ v: Double, step: Double) -> String {
        let places = step >= 1 ? 0 : Int(ceil(-log10(step)))
        return places == 0 ? String(Int(v.rounded())) : fixed(v, places)
    }

    /// SVG coordinates: one decimal.
    static func f(_ v: Double) -> String { fixed(v, 1) }

    /// 1, 2 or 5 times a power of ten, at least `raw`.
    static func niceStep(_ raw: Double) -> Double {
        guard raw > 0 else { return 1 }
        let p = pow(10, floor(log10(raw)))
        return [1.0, 2, 5, 10].map { $0 * p }.first { $0 >= raw } ?? 10 * p
    }

    static func esc(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
            .replacingOccurrences(of: "\"", with: "&quot;")
    }
}
