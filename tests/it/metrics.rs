//! The metrics endpoint scraped during real runs against the fake API: every metric present
//! with its type, the figures agreeing with what the fake API and the handler saw and with
//! `status`, and the exposition accepted by the real promtool.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use sunopoll::metrics::{METRICS, MetricType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

/// `GET /metrics`, the body only.
pub async fn scrape(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("send");
    let mut out = String::new();
    tokio::time::timeout(PATIENCE, s.read_to_string(&mut out))
        .await
        .expect("a scrape answered in time")
        .expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n").expect("a body").1.to_owned()
}

/// Every sample line: series (name and labels) → value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of every sample of `name` whose labels contain all of `labels`.
fn sum(samples: &HashMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let base = series.split('{').next().unwrap_or("");
            base == name && labels.iter().all(|l| series.contains(l))
        })
        .map(|(_, v)| v)
        .sum()
}

fn promtool_accepts(text: &str) {
    let Some(promtool) = sunopoll::testing::real_tool("promtool") else {
        return;
    };
    use std::io::Write;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool ran");
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const TASKS: [&str; 3] = [
    "aaaa0000000000000000000000000001",
    "aaaa0000000000000000000000000002",
    "aaaa0000000000000000000000000003",
];
const FAILING: &str = "ffff0000000000000000000000000001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_during_a_run_agrees_with_the_api_the_handler_and_status() {
    let api = FakeApi::start().await;
    for t in TASKS {
        api.script_statuses(t, &EVERY_STAGE);
    }
    api.script_statuses(FAILING, &TEXT_THEN_FAILURE);
    let handler = Receiver::start().await;
    let url = handler.url();
    let d = TestDaemon::start(&api, |c| {
        c.metrics.listen = Some("127.0.0.1:0".parse().expect("addr"));
        c.forward.targets = vec![target("app", &url)];
    })
    .await;
    let addr = d
        .daemon
        .as_ref()
        .and_then(|d| d.metrics_addr())
        .expect("the endpoint is up");

    // Before any task: every metric with a value the daemon already knows is there.
    let first = scrape(addr).await;
    assert!(first.contains("sunopoll_build_info{version=\""), "{first}");

    let mut all: Vec<&str> = TASKS.to_vec();
    all.push(FAILING);
    d.add(&all).await;
    for t in TASKS {
        d.wait_state(t, "done").await;
    }
    d.wait_state(FAILING, "failed").await;
    // 3 × (text, first, complete) + (text, error) = 11 deliveries.
    wait_until(Deadline::patience(), "every event delivered", || {
        handler.count() >= 11
    })
    .await;
    let status = poll_until(
        Deadline::patience(),
        "status to see every delivery made",
        Duration::from_millis(20),
        || async {
            let s = d.request(json!({"cmd": "status"})).await;
            (s["targets"][0]["delivered"] == 11).then_some(s)
        },
    )
    .await;

    let text = scrape(addr).await;
    for m in METRICS {
        let kind = match m.kind {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Histogram => "histogram",
        };
        assert!(
            text.contains(&format!("# TYPE {} {kind}\n", m.name)),
            "{} is missing or not a {kind}:\n{text}",
            m.name
        );
    }
    let s = samples(&text);
    // Polls: every request the fake API saw was sent, answered and counted once.
    let seen = api.total_calls() as f64;
    assert_eq!(sum(&s, "sunopoll_api_requests_total", &[]), seen);
    assert_eq!(sum(&s, "sunopoll_polls_total", &[]), seen);
    assert!(sum(&s, "sunopoll_polls_total", &["outcome=\"progress\""]) >= 4.0);
    // Events and tasks, as the store and `status` have them.
    assert_eq!(
        sum(&s, "sunopoll_events_total", &["stage=\"complete\""]),
        3.0
    );
    assert_eq!(sum(&s, "sunopoll_events_total", &["stage=\"error\""]), 1.0);
    assert_eq!(sum(&s, "sunopoll_events_total", &[]), 11.0);
    for (state, n) in [("done", 3.0), ("failed", 1.0), ("active", 0.0)] {
        assert_eq!(
            sum(&s, "sunopoll_tasks", &[&format!("state=\"{state}\"")]),
            n,
            "{state}"
        );
        assert_eq!(status["tasks"][state].as_f64(), Some(n), "status {state}");
    }
    assert_eq!(
        sum(
            &s,
            "sunopoll_task_duration_seconds_count",
            &["kind=\"music\""]
        ),
        4.0
    );
    // Deliveries, as the handler saw them.
    assert_eq!(
        sum(
            &s,
            "sunopoll_deliveries_total",
            &["target=\"app\"", "result=\"delivered\""]
        ),
        handler.count() as f64
    );
    assert_eq!(
        sum(&s, "sunopoll_deliveries_pending", &["target=\"app\""]),
        0.0
    );
    assert_eq!(
        sum(&s, "sunopoll_delivery_oldest_pending_seconds", &[]),
        0.0
    );
    assert_eq!(sum(&s, "sunopoll_polls_due", &[]), 0.0);
    assert!(sum(&s, "sunopoll_store_commit_duration_seconds_count", &[]) > 0.0);
    assert_eq!(sum(&s, "sunopoll_store_errors_total", &[]), 0.0);
    assert_eq!(sum(&s, "sunopoll_api_paused", &[]), 0.0);
    promtool_accepts(&text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_shows_as_a_pause_with_time_left() {
    let api = FakeApi::start().await;
    api.set_override(Some(Reply::fixture("error.405.rate-limit-exceeded.json")));
    let d = TestDaemon::start(&api, |c| {
        c.metrics.listen = Some("127.0.0.1:0".parse().expect("addr"));
        // The first pause lasts one interval: long enough to be seen with time left.
        c.poll.interval = Duration::from_secs(5);
        c.poll.backoff_max = Duration::from_secs(60);
    })
    .await;
    let addr = d
        .daemon
        .as_ref()
        .and_then(|d| d.metrics_addr())
        .expect("the endpoint is up");
    d.add(&[TASK]).await;
    let text = poll_until(
        Deadline::patience(),
        "the scrape to show the pause",
        Duration::from_millis(20),
        || async {
            let t = scrape(addr).await;
            let paused = samples(&t)
                .get("sunopoll_api_paused{account=\"default\",kind=\"throttled\"}")
                .copied();
            (paused == Some(1.0)).then_some(t)
        },
    )
    .await;
    let s = samples(&text);
    let left = sum(&s, "sunopoll_api_pause_seconds_left", &[]);
    assert!(left > 0.0 && left <= 60.0, "{left}");
    assert_eq!(
        sum(&s, "sunopoll_api_paused", &["kind=\"unauthorized\""]),
        0.0
    );
    assert!(sum(&s, "sunopoll_polls_total", &["outcome=\"throttled\""]) >= 1.0);
    assert_eq!(sum(&s, "sunopoll_api_backoff_max_seconds", &[]), 60.0);
    assert_eq!(sum(&s, "sunopoll_tasks", &["state=\"active\""]), 1.0);
    promtool_accepts(&text);
}
