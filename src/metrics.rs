//! Metrics (feature `metrics`), recorded through the [`metrics`](https://docs.rs/metrics) crate:
//! install any recorder (a Prometheus exporter, statsd, OpenTelemetry...) before serving, and
//! handover's figures appear in it. Names and labels follow Prometheus's conventions (base
//! units, `_total` counters, `_seconds` durations).
//!
//! | name | type | labels | what |
//! | --- | --- | --- | --- |
//! | `handover_restarts_total` | counter | `outcome`: `handed_over`, `failed` | restarts this process began that handed over to a new process, or were rolled back (the new process missing, crashed, not ready in time...) |
//! | `handover_handoff_seconds` | histogram | — | a restart that handed over: from its start (the signal, or `Handle::restart`) to the new process's `READY=1` |
//! | `handover_ready_seconds` | histogram | — | this process: from its start (`exec`, as the kernel counts it, in 10 ms steps) to its `READY=1`; one sample per process |
//! | `handover_drain_seconds` | histogram | `reason`: `signal`, `requested`, `handed_over` | a shutdown, from its start (the lame duck included) to the last connection closed |
//! | `handover_connections_passed_total` | counter | — | connections passed to the new process after a hand-off |
//! | `handover_connections_kept_total` | counter | — | connections that could not be passed after all, and were served here to the end |
//! | `handover_connections_cut_total` | counter | — | connections cut at the drain deadline, or by a forced shutdown |
//! | `handover_connections_open` | gauge | — | connections open now (plaintext, TLS and upgraded alike) |
//!
//! Each process records its own: a process started by a restart begins at zero (Prometheus's
//! `rate` and `increase` treat that as a counter reset), and what the old process records at the
//! end of its drain (`handover_drain_seconds{reason="handed_over"}`, the connections passed,
//! kept and cut) reaches a push-based recorder before it exits, or a scrape while it drains. The
//! `axum` example serves a Prometheus rendering on its admin listener, `GET /metrics`.
//!
//! The names are constants here, for an exporter's settings (histogram buckets, for one).
//!
//! All recording is in this module; the lifecycle calls one function per event.

use std::time::Duration;

use crate::error::Error;
#[cfg(feature = "metrics")]
use crate::server::Reason;
use crate::server::Shutdown;

/// `handover_restarts_total{outcome}`: restarts, by outcome (`handed_over` or `failed`).
#[cfg(feature = "metrics")]
pub const RESTARTS_TOTAL: &str = "handover_restarts_total";
/// `handover_handoff_seconds`: from a restart's start to the new process's `READY=1`.
#[cfg(feature = "metrics")]
pub const HANDOFF_SECONDS: &str = "handover_handoff_seconds";
/// `handover_ready_seconds`: from this process's start to its `READY=1`.
#[cfg(feature = "metrics")]
pub const READY_SECONDS: &str = "handover_ready_seconds";
/// `handover_drain_seconds{reason}`: a shutdown's length, lame duck included.
#[cfg(feature = "metrics")]
pub const DRAIN_SECONDS: &str = "handover_drain_seconds";
/// `handover_connections_passed_total`: connections passed to the new process.
#[cfg(feature = "metrics")]
pub const CONNECTIONS_PASSED_TOTAL: &str = "handover_connections_passed_total";
/// `handover_connections_kept_total`: connections that could not be passed after all.
#[cfg(feature = "metrics")]
pub const CONNECTIONS_KEPT_TOTAL: &str = "handover_connections_kept_total";
/// `handover_connections_cut_total`: connections cut instead of finishing.
#[cfg(feature = "metrics")]
pub const CONNECTIONS_CUT_TOTAL: &str = "handover_connections_cut_total";
/// `handover_connections_open`: connections open now.
#[cfg(feature = "metrics")]
pub const CONNECTIONS_OPEN: &str = "handover_connections_open";

/// This server reported `READY=1`.
pub(crate) fn ready() {
    #[cfg(feature = "metrics")]
    {
        describe();
        if let Some(age) = process_age() {
            metrics::histogram!(READY_SECONDS).record(age.as_secs_f64());
        }
    }
}

/// A restart handed over, `after` its start.
pub(crate) fn handed_over(after: Duration) {
    #[cfg(feature = "metrics")]
    {
        metrics::counter!(RESTARTS_TOTAL, "outcome" => "handed_over").increment(1);
        metrics::histogram!(HANDOFF_SECONDS).record(after.as_secs_f64());
    }
    #[cfg(not(feature = "metrics"))]
    let _ = after;
}

/// A restart was rolled back.
pub(crate) fn restart_failed() {
    #[cfg(feature = "metrics")]
    metrics::counter!(RESTARTS_TOTAL, "outcome" => "failed").increment(1);
}

/// Serving ended, with this report.
pub(crate) fn ended(end: &Result<Shutdown, Error>) {
    #[cfg(feature = "metrics")]
    if let Ok(s) = end {
        let reason = match s.reason {
            Reason::Signal(_) => "signal",
            Reason::Requested => "requested",
            Reason::ListenersLost => "listeners_lost",
            Reason::HandedOver { .. } => "handed_over",
        };
        metrics::histogram!(DRAIN_SECONDS, "reason" => reason).record(s.elapsed.as_secs_f64());
        metrics::counter!(CONNECTIONS_PASSED_TOTAL).increment(s.passed as u64);
        metrics::counter!(CONNECTIONS_KEPT_TOTAL).increment(s.kept as u64);
        metrics::counter!(CONNECTIONS_CUT_TOTAL).increment(s.cut as u64);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = end;
}

/// A connection was registered (accepted, or taken over from the previous process).
pub(crate) fn connection_opened() {
    #[cfg(feature = "metrics")]
    metrics::gauge!(CONNECTIONS_OPEN).increment(1.0);
}

/// A registered connection is gone.
pub(crate) fn connection_closed() {
    #[cfg(feature = "metrics")]
    metrics::gauge!(CONNECTIONS_OPEN).decrement(1.0);
}

/// Units and help texts, once per process (a recorder shows them as `# HELP` lines).
#[cfg(feature = "metrics")]
fn describe() {
    use metrics::Unit;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        metrics::describe_counter!(
            RESTARTS_TOTAL,
            "Restarts this process began, by outcome: handed_over or failed (rolled back)."
        );
        metrics::describe_histogram!(
            HANDOFF_SECONDS,
            Unit::Seconds,
            "From a restart's start to the new process's READY=1."
        );
        metrics::describe_histogram!(
            READY_SECONDS,
            Unit::Seconds,
            "From this process's start to its READY=1."
        );
        metrics::describe_histogram!(
            DRAIN_SECONDS,
            Unit::Seconds,
            "A shutdown's length, lame duck included, by reason: signal, requested, handed_over."
        );
        metrics::describe_counter!(
            CONNECTIONS_PASSED_TOTAL,
            "Connections passed to the new process after a hand-off."
        );
        metrics::describe_counter!(
            CONNECTIONS_KEPT_TOTAL,
            "Connections that could not be passed to the new process, served here to the end."
        );
        metrics::describe_counter!(
            CONNECTIONS_CUT_TOTAL,
            "Connections cut at the drain deadline or by a forced shutdown."
        );
        metrics::describe_gauge!(CONNECTIONS_OPEN, "Connections open now.");
    });
}

/// How long this process has existed: `/proc/uptime` minus the process's start time in
/// `/proc/self/stat` (field 22, in clock ticks: `USER_HZ`, 100 on Linux). No clock of the
/// process itself starts earlier than `exec`.
#[cfg(feature = "metrics")]
fn process_age() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    age_from(&stat, &uptime)
}

/// The arithmetic of [`process_age`]: `stat` is `/proc/self/stat`, `uptime` `/proc/uptime`.
#[cfg(feature = "metrics")]
fn age_from(stat: &str, uptime: &str) -> Option<Duration> {
    const USER_HZ: f64 = 100.0;
    // After "pid (comm) ": the comm may hold spaces and parentheses, so split at the last ')'.
    let fields = &stat[stat.rfind(')')? + 2..];
    // Fields from the third on: state is field 3, starttime field 22.
    let start_ticks: f64 = fields.split(' ').nth(22 - 3)?.parse().ok()?;
    let uptime: f64 = uptime.split(' ').next()?.parse().ok()?;
    let age = uptime - start_ticks / USER_HZ;
    (age.is_finite() && age >= 0.0).then(|| Duration::from_secs_f64(age))
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use super::*;
    use crate::hooks::HooksReport;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    /// name, labels ("k=v,..."), value, for everything recorded.
    fn captured(f: impl FnOnce()) -> Vec<(String, String, DebugValue)> {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, f);
        let mut out: Vec<_> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let key = key.key();
                let labels: Vec<String> = key
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                (key.name().to_string(), labels.join(","), value)
            })
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }

    fn shutdown(reason: Reason, passed: usize, kept: usize, cut: usize) -> Shutdown {
        Shutdown {
            reason,
            hooks: HooksReport::default(),
            lame_duck: Duration::ZERO,
            lame_duck_requests: 0,
            drained: passed + kept + cut,
            passed,
            kept,
            cut,
            forced: false,
            elapsed: Duration::from_millis(250),
        }
    }

    #[test]
    fn a_restart_and_its_drain_are_recorded_under_the_documented_names() {
        let got = captured(|| {
            restart_failed();
            handed_over(Duration::from_millis(40));
            connection_opened();
            connection_opened();
            connection_closed();
            ended(&Ok(shutdown(Reason::HandedOver { pid: 42 }, 7, 1, 0)));
        });
        let expected: Vec<(String, String, DebugValue)> = vec![
            ("handover_connections_cut_total", "", DebugValue::Counter(0)),
            (
                "handover_connections_kept_total",
                "",
                DebugValue::Counter(1),
            ),
            (
                "handover_connections_open",
                "",
                DebugValue::Gauge(1.0.into()),
            ),
            (
                "handover_connections_passed_total",
                "",
                DebugValue::Counter(7),
            ),
            (
                "handover_drain_seconds",
                "reason=handed_over",
                DebugValue::Histogram(vec![0.25.into()]),
            ),
            (
                "handover_handoff_seconds",
                "",
                DebugValue::Histogram(vec![0.04.into()]),
            ),
            (
                "handover_restarts_total",
                "outcome=failed",
                DebugValue::Counter(1),
            ),
            (
                "handover_restarts_total",
                "outcome=handed_over",
                DebugValue::Counter(1),
            ),
        ]
        .into_iter()
        .map(|(n, l, v)| (n.to_string(), l.to_string(), v))
        .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn a_shutdown_by_signal_is_labelled_so_and_errors_record_nothing() {
        let got = captured(|| {
            ended(&Ok(shutdown(Reason::Signal(15), 0, 0, 2)));
            ended(&Err(Error::config("not served")));
        });
        assert!(got.contains(&(
            "handover_drain_seconds".to_string(),
            "reason=signal".to_string(),
            DebugValue::Histogram(vec![0.25.into()])
        )));
        assert!(got.contains(&(
            "handover_connections_cut_total".to_string(),
            String::new(),
            DebugValue::Counter(2)
        )));
    }

    #[test]
    fn the_process_age_is_read_from_proc() {
        // comm with a space and a parenthesis; starttime (field 22) = 250 ticks = 2.5 s.
        let stat = "1234 (my (app)) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 250 20";
        assert_eq!(
            age_from(stat, "12.75 40.00\n"),
            Some(Duration::from_secs_f64(10.25))
        );
        assert_eq!(age_from(stat, "1.00 40.00\n"), None, "negative");
        assert_eq!(age_from("garbage", "12.75 40.00"), None);
        let age = process_age().expect("this process has an age");
        assert!(age < Duration::from_secs(24 * 3600), "{age:?}");
    }
}
