//! Connection hand-off at the limits: a new process that cannot take every connection (out of
//! file descriptors, so the kernel truncates a batch of sockets) refuses the rest, and the old
//! process serves them to the end. No connection is closed by both, or served by neither.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rustix::process::{Resource, Rlimit, Signal};
use support::*;

/// Sends one request on `s` and reads its answer: the pid that answered and whether it said
/// `Connection: close`; an error if the connection ended first.
fn request_on(s: &mut TcpStream) -> Result<(u32, bool), String> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + SOON;
    loop {
        let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
        if let Some(end) = text.find("\r\n\r\n") {
            if text[end + 4..].len() >= "hello world".len() {
                let pid = text
                    .split("x-pid: ")
                    .nth(1)
                    .and_then(|r| r.split("\r\n").next())
                    .and_then(|p| p.trim().parse().ok())
                    .ok_or_else(|| format!("no x-pid in {text:?}"))?;
                return Ok((pid, text[..end].contains("connection: close")));
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no full answer within {SOON:?}: {text:?}"));
        }
        match s.read(&mut buf) {
            Ok(0) => return Err(format!("EOF after {:?}", String::from_utf8_lossy(&got))),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

#[test]
fn a_new_process_out_of_fds_refuses_what_it_cannot_take_and_the_old_one_serves_it() {
    const OPEN: usize = 300;
    const HOLES: usize = 40;
    const LIMIT: u64 = 150;
    let notify = NotifySocket::new();
    let port = free_port();
    let mut server = Spawn::new(example("hello"))
        .arg(format!("127.0.0.1:{port}"))
        .env("NOTIFY_SOCKET", &notify.path)
        .env("HANDOVER_DRAIN_TIMEOUT_MS", "5000")
        .nofile(4096)
        .start();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    notify.wait_line("READY=1", SOON);
    let mut conns = Vec::with_capacity(OPEN);
    for _ in 0..OPEN {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(SOON)).expect("timeout");
        assert_eq!(request_on(&mut s).expect("first answer").0, server.pid);
        conns.push(s);
    }
    // Free some low fd numbers in the server (the first connections), then lower its soft fd
    // limit below what it holds: it can still make the few fds a restart needs (in those
    // holes), and its successor inherits the limit, so it cannot take every connection.
    conns.drain(..HOLES);
    let deadline = Instant::now() + SOON;
    while fds_of(server.pid).len() > OPEN - HOLES + 40 {
        assert!(
            Instant::now() < deadline,
            "the server did not close the holes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = rustix::process::Pid::from_raw(server.pid as i32).expect("pid");
    rustix::process::prlimit(
        Some(pid),
        Resource::Nofile,
        Rlimit {
            current: Some(LIMIT),
            maximum: Some(4096),
        },
    )
    .expect("prlimit");

    server.signal(Signal::USR1);
    let new = mainpid(&notify.wait_nth(1, SOON, |n| n.text.contains("MAINPID=")));
    let finished = server
        .lines
        .wait_for("connection hand-off finished", Duration::from_secs(30));
    assert!(finished.contains("kept="), "{finished}");
    // Every connection still works: on the new process (passed), or on the old one (kept,
    // told to close after this answer).
    let (mut on_new, mut on_old) = (0, 0);
    for (i, s) in conns.iter_mut().enumerate() {
        match request_on(s) {
            Ok((pid, _)) if pid == new => on_new += 1,
            Ok((pid, close)) if pid == server.pid => {
                assert!(close, "connection {i}: a kept connection is told to close");
                on_old += 1;
            }
            Ok((pid, _)) => panic!("connection {i}: answered by an unknown pid {pid}"),
            Err(e) => panic!(
                "connection {i} lost ({on_new} on the new process, {on_old} on the old so far): {e}\n{}",
                server.lines.all().join("\n")
            ),
        }
    }
    eprintln!("{on_new} connections on the new process, {on_old} kept by the old one; {finished}");
    assert!(on_new > 0, "some were passed");
    assert!(on_old > 0, "some were refused by the new process and kept");
    drop(conns);
    assert_eq!(server.wait(SOON), Some(0), "the old process exits 0");
    let closed = server.lines.wait_for("reason: HandedOver", SOON);
    assert!(closed.contains("cut: 0,"), "nothing was cut: {closed}");
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));
    assert_none_left([server.pid, new]);
}
