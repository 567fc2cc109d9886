//! The `metrics` feature, through the axum example's Prometheus rendering (`GET /metrics` on
//! its admin listener, and the last rendering printed at exit with
//! `HANDOVER_METRICS_AT_EXIT=1`): readiness, a failed restart, a restart that hands over while
//! a request is in flight and the old process's drain, then a shutdown by signal.

mod support;

use std::net::SocketAddr;

use rustix::process::Signal;
use support::*;

/// The value of the sample `series` (name and labels, as rendered) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

fn scrape(admin: SocketAddr) -> String {
    let reply = get(admin, "/metrics").expect("GET /metrics");
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.body
}

/// What process `pid` printed at exit, without the prefix.
fn at_exit(lines: &Lines, pid: u32) -> String {
    let prefix = format!("metrics at exit, pid {pid}: ");
    // The rendering ends with the last metric's lines; the drain histogram is always there.
    lines.wait_for(&format!("{prefix}handover_drain_seconds_count"), SOON);
    lines
        .all()
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn restarts_drains_and_readiness_are_recorded() {
    subreaper();
    let dir = scratch_dir("metrics");
    let exe = deploy_copy("axum", &dir);
    let notify = NotifySocket::new();
    let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut old = Spawn::new(&exe)
        .arg(web.to_string())
        .arg(admin.to_string())
        .env("NOTIFY_SOCKET", &notify.path)
        .env("HANDOVER_METRICS_AT_EXIT", "1")
        .start();
    assert_eq!(notify.wait_line("READY=1", SOON).pid, old.pid);

    let ready = scrape(admin);
    assert_eq!(
        sample(&ready, "handover_ready_seconds_count"),
        Some(1.0),
        "{ready}"
    );
    let age = sample(&ready, "handover_ready_seconds_sum").expect("a readiness time");
    assert!((0.0..SOON.as_secs_f64()).contains(&age), "{ready}");
    // The scrape's own connection is open while the rendering is made.
    assert_eq!(
        sample(&ready, "handover_connections_open"),
        Some(1.0),
        "{ready}"
    );
    assert!(
        ready.contains("# TYPE handover_ready_seconds histogram"),
        "{ready}"
    );

    // A restart that fails: the deployed binary exits before READY=1.
    replace_with_script(&exe, "exit 1");
    let failed = request(admin, "POST", "/restart").expect("POST /restart");
    assert_eq!(failed.status, 500, "{failed:?}");
    let after_failure = scrape(admin);
    assert_eq!(
        sample(
            &after_failure,
            "handover_restarts_total{outcome=\"failed\"}"
        ),
        Some(1.0),
        "{after_failure}"
    );
    assert_eq!(
        sample(&after_failure, "handover_handoff_seconds_count"),
        None,
        "{after_failure}"
    );

    // A restart that hands over while a 3 s request is in flight: the old process drains it.
    restore_binary("axum", &exe);
    let slow = get_in_background(web, "/slow?ms=3000", false);
    old.lines.wait_for("slow request: sleeping", SOON);
    let restarted = request(admin, "POST", "/restart").expect("POST /restart");
    assert_eq!(restarted.status, 200, "{restarted:?}");
    let new = notify
        .wait_nth(1, SOON, |n| n.text.contains("MAINPID="))
        .text
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse::<u32>().ok())
        .expect("MAINPID=");
    let slow = slow.join().expect("thread").expect("the slow request");
    assert_eq!((slow.status, slow.pid), (200, old.pid));
    assert_eq!(old.wait(SOON), Some(0));
    let old_metrics = at_exit(&old.lines, old.pid);
    for (series, value) in [
        ("handover_restarts_total{outcome=\"failed\"}", 1.0),
        ("handover_restarts_total{outcome=\"handed_over\"}", 1.0),
        ("handover_handoff_seconds_count", 1.0),
        ("handover_drain_seconds_count{reason=\"handed_over\"}", 1.0),
        ("handover_connections_cut_total", 0.0),
        ("handover_connections_open", 0.0),
    ] {
        assert_eq!(
            sample(&old_metrics, series),
            Some(value),
            "{series} in the old process's last metrics:\n{old_metrics}"
        );
    }
    // The drain lasted at least as long as the request still in flight.
    let drain = sample(
        &old_metrics,
        "handover_drain_seconds_sum{reason=\"handed_over\"}",
    )
    .expect("the drain's length");
    assert!(drain > 0.5, "{old_metrics}");

    // The new process: its own readiness, no restart of its own yet.
    let fresh = scrape(admin);
    assert_eq!(
        sample(&fresh, "handover_ready_seconds_count"),
        Some(1.0),
        "{fresh}"
    );
    assert!(!fresh.contains("handover_restarts_total"), "{fresh}");

    // A shutdown by signal.
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));
    let new_metrics = at_exit(&old.lines, new);
    assert_eq!(
        sample(
            &new_metrics,
            "handover_drain_seconds_count{reason=\"signal\"}"
        ),
        Some(1.0),
        "{new_metrics}"
    );
    assert_eq!(
        sample(&new_metrics, "handover_connections_open"),
        Some(0.0),
        "{new_metrics}"
    );
    assert_none_left([old.pid, new]);
}
