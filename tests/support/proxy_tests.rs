//! The proxy's own tests: a tiny server behind it (one connection, on a thread), plain
//! blocking sockets on the client side, times measured in this process.
//!
//! Included by `tests/handoff.rs` only: in `support/mod.rs` they would run again in every test
//! crate that shares the support.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::support::proxy::{Close, How, Latency, Proxy, Side};

const SOON: Duration = Duration::from_secs(10);
/// Upper bound on scheduling noise (two shared cores); the lower bounds are exact.
const SLACK: Duration = Duration::from_millis(150);

/// A server that accepts one connection (within `SOON`) and runs `f` on it, on a thread.
fn serve_one(f: impl FnOnce(TcpStream) + Send + 'static) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let thread = std::thread::spawn(move || {
        let mut fds = [rustix::event::PollFd::new(
            &listener,
            rustix::event::PollFlags::IN,
        )];
        let timeout = rustix::event::Timespec {
            tv_sec: SOON.as_secs() as i64,
            tv_nsec: 0,
        };
        let ready = rustix::event::poll(&mut fds, Some(&timeout)).expect("poll listener");
        assert_eq!(ready, 1, "the proxy did not connect within {SOON:?}");
        let (stream, _) = listener.accept().expect("accept");
        stream.set_read_timeout(Some(SOON)).expect("read timeout");
        f(stream);
    });
    (addr, thread)
}

fn connect(proxy: &Proxy) -> TcpStream {
    let stream = TcpStream::connect(proxy.addr()).expect("connect to the proxy");
    stream.set_read_timeout(Some(SOON)).expect("read timeout");
    stream
}

fn reset(stream: TcpStream) {
    rustix::net::sockopt::set_socket_linger(&stream, Some(Duration::ZERO)).expect("linger 0");
    drop(stream);
}

fn within(elapsed: Duration, latency: Duration, what: &str) {
    assert!(
        elapsed >= latency && elapsed < latency + SLACK,
        "{what} took {elapsed:?}, expected {latency:?} (+ at most {SLACK:?})"
    );
}

/// Waits for the connection's end and returns its first close.
fn first_close(proxy: &Proxy, client: &TcpStream) -> Close {
    proxy.wait_all_ended(SOON).expect("the proxy lets go");
    let conns = proxy.connections();
    assert_eq!(conns.len(), 1, "{conns:?}");
    let port = client.local_addr().expect("client addr").port();
    assert_eq!(conns[0].client_port, port, "{conns:?}");
    assert!(conns[0].upstream_port.is_some(), "{conns:?}");
    assert_eq!(proxy.open(), 0);
    conns[0].first_close.expect("a close was seen")
}

#[test]
fn each_direction_is_delayed_by_its_own_latency() {
    let latency = Latency {
        to_server: Duration::from_millis(20),
        to_client: Duration::from_millis(40),
    };
    let (arrived_tx, arrived) = std_mpsc::channel();
    let (addr, server) = serve_one(move |mut s| {
        for _ in 0..3 {
            let mut buf = [0u8; 1];
            s.read_exact(&mut buf).expect("ping");
            let arrived = Instant::now();
            s.write_all(&buf).expect("pong");
            let _ = arrived_tx.send(arrived);
        }
    });
    let proxy = Proxy::with_latency(addr, latency);
    let mut client = connect(&proxy);
    for i in 0..3u8 {
        let sent = Instant::now();
        client.write_all(&[i]).expect("write");
        let mut buf = [0u8; 1];
        client.read_exact(&mut buf).expect("read");
        let back = Instant::now();
        assert_eq!(buf, [i]);
        let at_server = arrived.recv_timeout(SOON).expect("server time");
        within(at_server - sent, latency.to_server, "client to server");
        within(back - at_server, latency.to_client, "server to client");
    }
    server.join().expect("server");
}

#[test]
fn each_chunk_is_released_at_its_own_time_not_with_a_later_one() {
    let latency = Latency::each_way(Duration::from_millis(30));
    let (got_tx, got) = std_mpsc::channel();
    let (addr, server) = serve_one(move |mut s| {
        let mut seen = Vec::new();
        let mut buf = [0u8; 16];
        while seen.len() < 2 {
            let n = s.read(&mut buf).expect("read");
            assert!(n > 0, "EOF after {seen:?}");
            let now = Instant::now();
            seen.extend(buf[..n].iter().map(|b| (*b, now)));
        }
        let _ = got_tx.send(seen);
    });
    let proxy = Proxy::with_latency(addr, latency);
    let mut client = connect(&proxy);
    let first = Instant::now();
    client.write_all(b"a").expect("write a");
    // The stimulus: a second chunk 60 ms later (no event to wait for; this is the shape).
    std::thread::sleep(Duration::from_millis(60));
    let second = Instant::now();
    client.write_all(b"b").expect("write b");
    let seen = got.recv_timeout(SOON).expect("server saw both");
    server.join().expect("server");
    assert_eq!(
        seen.iter().map(|(b, _)| *b).collect::<Vec<u8>>(),
        b"ab",
        "in order"
    );
    within(seen[0].1 - first, latency.to_server, "first chunk");
    within(seen[1].1 - second, latency.to_server, "second chunk");
    assert!(
        seen[0].1 < second + latency.to_server,
        "the first chunk waited for the second: {seen:?}"
    );
}

#[test]
fn a_fin_from_the_server_arrives_one_latency_later_and_stays_a_half_close() {
    let latency = Latency::default();
    let (fin_tx, fin_at) = std_mpsc::channel();
    let (addr, server) = serve_one(move |mut s| {
        s.write_all(b"bye").expect("write");
        let _ = fin_tx.send(Instant::now());
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        // Still reading: the client may still send.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("read to the client's FIN");
        assert_eq!(rest, b"still here");
    });
    let proxy = Proxy::with_latency(addr, latency);
    let mut client = connect(&proxy);
    let mut got = Vec::new();
    client
        .read_to_end(&mut got)
        .expect("read to the server's FIN");
    let eof = Instant::now();
    assert_eq!(got, b"bye");
    let fin = fin_at.recv_timeout(SOON).expect("FIN time");
    within(eof - fin, latency.to_client, "the FIN");
    client
        .write_all(b"still here")
        .expect("the client still sends");
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("client FIN");
    server.join().expect("server");
    let close = first_close(&proxy, &client);
    assert_eq!((close.by, close.how), (Side::Server, How::Fin));
    assert!(proxy.connections()[0].server_closed_first());
}

#[test]
fn a_fin_from_the_client_is_a_half_close_too() {
    let latency = Latency::default();
    let (eof_tx, eof_at) = std_mpsc::channel();
    let (addr, server) = serve_one(move |mut s| {
        let mut req = Vec::new();
        s.read_to_end(&mut req).expect("read to the client's FIN");
        let _ = eof_tx.send(Instant::now());
        assert_eq!(req, b"request");
        s.write_all(b"response").expect("the server still sends");
    });
    let proxy = Proxy::with_latency(addr, latency);
    let mut client = connect(&proxy);
    client.write_all(b"request").expect("write");
    let fin = Instant::now();
    client.shutdown(std::net::Shutdown::Write).expect("FIN");
    let mut got = Vec::new();
    client
        .read_to_end(&mut got)
        .expect("read to the server's FIN");
    assert_eq!(got, b"response");
    within(
        eof_at.recv_timeout(SOON).expect("EOF time") - fin,
        latency.to_server,
        "the FIN",
    );
    server.join().expect("server");
    let close = first_close(&proxy, &client);
    assert_eq!((close.by, close.how), (Side::Client, How::Fin));
}

#[test]
fn a_reset_from_the_server_resets_the_client_one_latency_later() {
    let latency = Latency::default();
    let (rst_tx, rst_at) = std_mpsc::channel();
    let (addr, server) = serve_one(move |s| {
        let _ = rst_tx.send(Instant::now());
        reset(s);
    });
    let proxy = Proxy::with_latency(addr, latency);
    let mut client = connect(&proxy);
    let err = client.read(&mut [0u8; 8]).expect_err("the client is reset");
    let at = Instant::now();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    within(
        at - rst_at.recv_timeout(SOON).expect("reset time"),
        latency.to_client,
        "the reset",
    );
    server.join().expect("server");
    let close = first_close(&proxy, &client);
    assert_eq!((close.by, close.how), (Side::Server, How::Reset));
}

#[test]
fn a_reset_from_the_client_resets_the_server_one_latency_later() {
    let latency = Latency::default();
    let (err_tx, err_at) = std_mpsc::channel();
    let (addr, server) = serve_one(move |mut s| {
        let mut buf = [0u8; 8];
        let err = loop {
            match s.read(&mut buf) {
                Ok(0) => panic!("a FIN, expected a reset"),
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        let _ = err_tx.send((Instant::now(), err.kind()));
    });
    let proxy = Proxy::with_latency(addr, latency);
    let mut client = connect(&proxy);
    let port = client.local_addr().expect("addr").port();
    client.write_all(b"x").expect("write");
    let at = Instant::now();
    reset(client);
    let (seen, kind) = err_at.recv_timeout(SOON).expect("the server saw the reset");
    assert_eq!(kind, ErrorKind::ConnectionReset);
    within(seen - at, latency.to_server, "the reset");
    server.join().expect("server");
    proxy.wait_all_ended(SOON).expect("the proxy lets go");
    let conn = &proxy.connections()[0];
    assert_eq!(conn.client_port, port);
    let close = conn.first_close.expect("closed");
    assert_eq!((close.by, close.how), (Side::Client, How::Reset));
}

/// A server that closed its socket answers later data with a reset: through the proxy the
/// client gets that reset too, a round trip after it wrote, as on a network.
#[test]
fn data_sent_to_a_server_that_closed_comes_back_as_a_reset() {
    let latency = Latency::default();
    let (addr, server) = serve_one(drop);
    let proxy = Proxy::with_latency(addr, latency);
    let mut client = connect(&proxy);
    let mut got = Vec::new();
    client.read_to_end(&mut got).expect("the server's FIN");
    server.join().expect("server");
    let wrote = Instant::now();
    client
        .write_all(b"late")
        .expect("writing after a FIN is allowed");
    // No events asked for: poll reports only an error or a hang-up, i.e. the reset.
    let mut fds = [rustix::event::PollFd::new(
        &client,
        rustix::event::PollFlags::empty(),
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: SOON.as_secs() as i64,
        tv_nsec: 0,
    };
    assert_eq!(
        rustix::event::poll(&mut fds, Some(&timeout)).expect("poll"),
        1
    );
    within(
        wrote.elapsed(),
        latency.to_server + latency.to_client,
        "the reset",
    );
    let err = client
        .take_error()
        .expect("SO_ERROR")
        .expect("the client was reset");
    // A reset in CLOSE_WAIT (after the peer's FIN) is EPIPE; in other states ECONNRESET.
    assert!(
        matches!(
            err.kind(),
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset
        ),
        "{err}"
    );
    let close = first_close(&proxy, &client);
    assert_eq!((close.by, close.how), (Side::Server, How::Fin));
}

#[test]
fn a_refused_connection_to_the_server_resets_the_client() {
    let gone = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let proxy = Proxy::start(gone);
    let mut client = connect(&proxy);
    let start = Instant::now();
    let err = client.read(&mut [0u8; 8]).expect_err("reset");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    assert!(start.elapsed() < proxy.latency().to_client + SLACK);
    proxy.wait_all_ended(SOON).expect("the proxy lets go");
    let conn = &proxy.connections()[0];
    let close = conn.first_close.expect("closed");
    assert_eq!((close.by, close.how), (Side::Server, How::Reset));
}

#[test]
fn dropping_the_proxy_closes_its_connections_and_its_port() {
    let (accepted_tx, accepted) = std_mpsc::channel();
    let (addr, server) = serve_one(move |mut s| {
        let _ = accepted_tx.send(());
        let mut rest = Vec::new();
        // Ends with the proxy: EOF (or a reset, if it had unread bytes).
        let _ = s.read_to_end(&mut rest);
    });
    let proxy = Proxy::start(addr);
    let proxy_addr = proxy.addr();
    let mut client = connect(&proxy);
    accepted
        .recv_timeout(SOON)
        .expect("the proxy connected to the server");
    drop(proxy);
    let mut buf = [0u8; 8];
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection closed, got {other:?}"),
    }
    server.join().expect("the server's connection ended too");
    let refused = TcpStream::connect(proxy_addr).expect_err("nothing listens any more");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
}
