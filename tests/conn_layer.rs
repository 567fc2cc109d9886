//! The connection layer with real processes: what issue 17's point 6 asks of closing a
//! listener. (tests/hostile.rs has one test per point of the issue; this file checks the
//! listener close from the accept side, under a bound address and `systemd-socket-activate`.)

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use support::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Answered (200).
    Answered,
    /// The connection was refused: nobody listens any more (the request was never sent).
    Refused,
    /// Connected and sent its request, then reset or closed without an answer.
    Lost,
}

/// One request on a new connection: how it went, and when its connection was established.
fn probe(addr: SocketAddr) -> (Outcome, Instant) {
    let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return (Outcome::Refused, Instant::now());
    };
    let connected = Instant::now();
    (request(s), connected)
}

fn request(mut s: TcpStream) -> Outcome {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return Outcome::Lost;
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    match out.starts_with(b"HTTP/1.1 200") {
        true => Outcome::Answered,
        false => Outcome::Lost,
    }
}

/// Eight clients open a connection per request, as fast as they can, until they are refused
/// (the listener is closed); `terminate` is called once `before` requests were answered.
/// Returns the outcomes of the connections established before `terminate` was called (the
/// ones queued or accepted when the server began to stop), and how many of the others (which
/// may have met the close itself) were lost.
fn probe_through_the_close(
    addr: SocketAddr,
    before: usize,
    terminate: impl FnOnce(),
) -> (Vec<Outcome>, usize) {
    let answered = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(60);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (answered, refused, outcomes) = (
                Arc::clone(&answered),
                Arc::clone(&refused),
                Arc::clone(&outcomes),
            );
            std::thread::spawn(move || {
                // Bounded in count and time.
                for _ in 0..100_000 {
                    if Instant::now() > deadline {
                        break;
                    }
                    let (o, connected) = probe(addr);
                    outcomes.lock().expect("outcomes").push((o, connected));
                    match o {
                        Outcome::Answered => {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        Outcome::Refused => {
                            refused.store(true, Ordering::Relaxed);
                            break;
                        }
                        Outcome::Lost => {}
                    }
                }
            })
        })
        .collect();
    while answered.load(Ordering::Relaxed) < before && Instant::now() < deadline {
        std::thread::yield_now();
    }
    let terminated = Instant::now();
    terminate();
    for t in threads {
        t.join().expect("probe thread");
    }
    assert!(
        refused.load(Ordering::Relaxed),
        "the listener was closed in the end"
    );
    let outcomes = outcomes.lock().expect("outcomes").clone();
    let before: Vec<Outcome> = outcomes
        .iter()
        .filter(|(_, at)| *at < terminated)
        .map(|(o, _)| *o)
        .collect();
    let lost_after = outcomes
        .iter()
        .filter(|(o, at)| *at >= terminated && *o == Outcome::Lost)
        .count();
    (before, lost_after)
}

fn assert_none_lost(outcomes: &[Outcome], log: &[String]) {
    let lost = lost(outcomes);
    assert_eq!(
        lost,
        0,
        "requests sent and never answered: {lost} of {}; the server's log ends with: {:#?}",
        outcomes.len(),
        &log[log.len().saturating_sub(30)..]
    );
}

fn lost(outcomes: &[Outcome]) -> usize {
    outcomes.iter().filter(|o| **o == Outcome::Lost).count()
}

#[test]
fn closing_a_bound_listener_resets_no_queued_client() {
    let notify = NotifySocket::new();
    let (mut server, addr) = ready_hello(&notify);
    let (outcomes, lost_after) = probe_through_the_close(addr, 200, || server.signal(Signal::TERM));
    eprintln!("lost among connections established after the signal: {lost_after}");
    assert_eq!(server.wait(SOON), Some(0));
    assert_none_left([server.pid]);
    assert_none_lost(&outcomes, &server.lines.all());
}

#[test]
fn closing_a_socket_activated_listener_resets_no_queued_client() {
    let notify = NotifySocket::new();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut activator = socket_activate(&listen, Some("web"), &notify, &[], "hello", &listen);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(probe(addr).0, Outcome::Answered);
    notify.wait_line("READY=1", SOON);
    let (outcomes, lost_after) =
        probe_through_the_close(addr, 200, || activator.signal(Signal::TERM));
    eprintln!("lost among connections established after the signal: {lost_after}");
    assert_eq!(activator.wait(SOON), Some(0));
    assert_none_left([activator.pid]);
    assert_none_lost(&outcomes, &activator.lines.all());
}
