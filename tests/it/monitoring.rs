//! The monitoring files a user imports (monitoring/): the alert rules pass the real promtool and
//! each fires in its own `promtool test rules` case; the dashboard asks only for metrics the
//! daemon exports; the README documents every metric.

use std::path::Path;
use std::process::Command;

use sunopoll::metrics::METRICS;
use sunopoll::testing::real_tool;

fn monitoring() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/monitoring"))
}

fn promtool(args: &[&str]) {
    let Some(promtool) = real_tool("promtool") else {
        return;
    };
    let out = Command::new(promtool)
        .args(args)
        .current_dir(monitoring())
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_alert_rules_are_valid_and_each_fires_in_its_test() {
    promtool(&["check", "rules", "sunopoll-alerts.yml"]);
    promtool(&["test", "rules", "sunopoll-alerts.test.yml"]);
    let rules = std::fs::read_to_string(monitoring().join("sunopoll-alerts.yml")).expect("rules");
    let tests =
        std::fs::read_to_string(monitoring().join("sunopoll-alerts.test.yml")).expect("tests");
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            assert!(
                tests.contains(&format!(
                    "alertname: {name}\n        exp_alerts:\n          - "
                )),
                "alert {name} has no promtool case where it fires"
            );
        }
    }
}

/// The metric names a PromQL expression mentions (`sunopoll_…`, histogram suffixes removed).
fn names_in(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("sunopoll_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let mut name = &tail[..end];
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && METRICS.iter().any(|m| m.name == base)
            {
                name = base;
            }
        }
        names.push(name.to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_dashboard_and_the_rules_use_only_exported_metrics() {
    let text =
        std::fs::read_to_string(monitoring().join("grafana-dashboard.json")).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "a dashboard worth importing");
    let mut used = 0;
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for name in names_in(expr) {
                assert!(
                    METRICS.iter().any(|m| m.name == name),
                    "panel {:?} asks for {name}, which sunopoll does not export",
                    panel["title"]
                );
                used += 1;
            }
        }
    }
    assert!(used > 0);
    let rules = std::fs::read_to_string(monitoring().join("sunopoll-alerts.yml")).expect("rules");
    for line in rules
        .lines()
        .filter(|l| l.trim_start().starts_with("expr:"))
    {
        for name in names_in(line) {
            assert!(
                METRICS.iter().any(|m| m.name == name),
                "an alert asks for {name}, which sunopoll does not export"
            );
        }
    }
}

#[test]
fn the_readme_documents_every_metric() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    for m in METRICS {
        assert!(
            readme.contains(&format!("`{}`", m.name)),
            "README.md does not document {}",
            m.name
        );
    }
}
