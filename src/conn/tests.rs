//! One connection driven in-process, over a Unix socket pair, through random splits of
//! pipelined requests and bodies, with directives raised at random points.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::either::Either;

use super::control::Directive;
use super::service::AppService;
use super::{ConnContext, TrackedIo};
use crate::conn_info::{ConnectionInfo, Local, Peer};
use crate::registry::Connections;

/// What looks like a request but is a body: must never be answered.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

#[derive(Debug, Clone)]
enum Framing {
    None,
    Length,
    Chunked,
}

#[derive(Debug, Clone)]
struct Req {
    /// The handler answers before reading the body (and reads it in a task of its own).
    early: bool,
    framing: Framing,
    /// How many times the smuggled request is repeated in the body.
    body_repeats: usize,
}

fn encode(i: usize, r: &Req) -> Vec<u8> {
    let path = if r.early {
        format!("/early{i}")
    } else {
        format!("/r{i}")
    };
    let body = SMUGGLED.repeat(r.body_repeats);
    let mut out = format!("POST {path} HTTP/1.1\r\nHost: t\r\n").into_bytes();
    match r.framing {
        Framing::None => out.extend_from_slice(b"\r\n"),
        Framing::Length => {
            out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            out.extend_from_slice(body.as_bytes());
        }
        Framing::Chunked => {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            for piece in body.as_bytes().chunks(17) {
                out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                out.extend_from_slice(piece);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
        }
    }
    out
}

fn body_len(r: &Req) -> usize {
    match r.framing {
        Framing::None => 0,
        _ => SMUGGLED.len() * r.body_repeats,
    }
}

fn req() -> impl Strategy<Value = Req> {
    (
        any::<bool>(),
        prop_oneof![
            Just(Framing::None),
            Just(Framing::Length),
            Just(Framing::Chunked)
        ],
        0..3usize,
    )
        .prop_map(|(early, framing, body_repeats)| Req {
            early,
            framing,
            body_repeats,
        })
}

fn directive() -> impl Strategy<Value = Option<Directive>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some(Directive::CloseIdle)),
        1 => Just(Some(Directive::CloseResponses)),
        1 => Just(Some(Directive::HandOff)),
        1 => Just(Some(Directive::Drain)),
    ]
}

/// A response as read by the client: its body, and whether it said `Connection: close`.
#[derive(Debug)]
struct Answer {
    body: String,
    close: bool,
}

/// Parses the complete responses at the start of `buf` (hyper's, with `content-length`).
fn parse(buf: &mut Vec<u8>) -> Vec<Answer> {
    let mut out = Vec::new();
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            return out;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("hyper's responses have a content-length");
        if buf.len() < end + 4 + len {
            return out;
        }
        let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
        out.push(Answer {
            body,
            close: head.contains("connection: close"),
        });
        buf.drain(..end + 4 + len);
    }
}

/// Counts the polls of a future.
struct Counted<F: ?Sized> {
    inner: Pin<Box<F>>,
    polls: Arc<AtomicUsize>,
}

impl<F: Future + ?Sized> Future for Counted<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.fetch_add(1, Ordering::Relaxed);
        self.inner.as_mut().poll(cx)
    }
}

/// One connection served in-process: the client's end, and what to watch on the server's.
struct Harness {
    client: tokio::net::UnixStream,
    control: Arc<super::control::Control>,
    connections: Connections,
    seen: Arc<Mutex<Vec<String>>>,
    polls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    /// `header_timeout`: the sweeper runs with it (not zero).
    fn start(header_timeout: Duration, hand_off: Option<Arc<dyn super::HandOff>>) -> Harness {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let service = tower::service_fn(move |req: Request<Incoming>| {
            let log = Arc::clone(&log);
            async move {
                let path = req.uri().path().to_string();
                log.lock().expect("log").push(path.clone());
                let body = req.into_body();
                let len = if path.starts_with("/early") {
                    // Answer first; the body is read to its end meanwhile (a streaming proxy).
                    tokio::spawn(async move {
                        let _ = body.collect().await;
                    });
                    0
                } else {
                    body.collect()
                        .await
                        .map(|b| b.to_bytes().len())
                        .unwrap_or(usize::MAX)
                };
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(format!(
                    "{path}:{len}"
                )))))
            }
        });
        Harness::start_with(header_timeout, hand_off, seen, service)
    }

    /// [`Harness::start`] with another service; `seen` is what it records.
    fn start_with<S: AppService>(
        header_timeout: Duration,
        hand_off: Option<Arc<dyn super::HandOff>>,
        seen: Arc<Mutex<Vec<String>>>,
        service: S,
    ) -> Harness {
        let connections = Connections::new(header_timeout, true);
        if !header_timeout.is_zero() {
            tokio::spawn(connections.sweeper());
        }
        let (handle, _commands) = crate::handle::Handle::new();
        let slot = Arc::new(OnceLock::new());
        if let Some(h) = hand_off {
            let _ = slot.set(h);
        }
        let cx = ConnContext::new(
            crate::conn::Http::default(),
            connections.clone(),
            handle.clone(),
            slot,
        );
        let (server, client) = tokio::net::UnixStream::pair().expect("socket pair");
        let info = ConnectionInfo::new(
            Arc::from("t"),
            Peer::unix(None, None),
            Local::Unix(None),
            handle,
        );
        let io = TrackedIo::register(&connections, Either::Right(server), info, true);
        let control = Arc::clone(io.control());
        let polls = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(Counted {
            inner: super::serve::serve(io, Bytes::new(), service, None, cx),
            polls: Arc::clone(&polls),
        });
        Harness {
            client,
            control,
            connections,
            seen,
            polls,
            task,
        }
    }

    /// Reads until `n` more answers came, or the end (`None` then).
    async fn answers(&mut self, buf: &mut Vec<u8>, n: usize) -> Option<Vec<Answer>> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        while out.len() < n {
            out.extend(parse(buf));
            if out.len() >= n {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(10), self.client.read(&mut chunk))
                .await
                .expect("an answer or the end within 10 s")
            {
                Ok(0) | Err(_) => return None,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
        Some(out)
    }

    /// Waits for the server to close the connection (EOF or reset), without writing.
    async fn closed_within(&mut self, limit: Duration) -> bool {
        let mut chunk = [0u8; 1024];
        let until = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(until, self.client.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("log").clone()
    }
}

/// Drives one connection: returns the answers the client read, what the handler saw, and how
/// many times the connection's task was polled.
async fn run(
    reqs: &[Req],
    cuts: &[usize],
    directives: &[Option<Directive>],
) -> (Vec<Answer>, Vec<String>, usize) {
    let h = Harness::start(Duration::ZERO, None);
    let Harness {
        mut client,
        control,
        seen,
        polls,
        task,
        connections: _c,
    } = h;

    let bytes: Vec<u8> = reqs
        .iter()
        .enumerate()
        .flat_map(|(i, r)| encode(i, r))
        .collect();
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.push(bytes.len());
    cuts.sort_unstable();
    cuts.dedup();
    let (mut rd, mut wr) = client.split();
    let writer = async {
        let mut from = 0;
        for (k, to) in cuts.iter().copied().enumerate() {
            if wr.write_all(&bytes[from..to]).await.is_err() {
                break;
            }
            from = to;
            // Let the server read what was written before the directive comes, sometimes.
            tokio::task::yield_now().await;
            if let Some(d) = directives.get(k).copied().flatten() {
                control.raise(d);
            }
        }
        let _ = wr.shutdown().await;
    };
    let reader = async {
        let mut buf = Vec::new();
        let mut answers = Vec::new();
        let mut chunk = [0u8; 4096];
        while answers.len() < reqs.len() {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            answers.extend(parse(&mut buf));
        }
        answers
    };
    let ((), answers) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(writer, reader)
    })
    .await
    .expect("the connection answered or closed in time (no hang, no spin)");
    drop(client);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the connection's task ended once the client was gone")
        .expect("no panic");
    let seen = seen.lock().expect("log").clone();
    (answers, seen, polls.load(Ordering::Relaxed))
}

/// Point 1 of issue 17: a request and the first bytes of the next in one segment; the
/// connection is taken apart after the first (idle by hyper's count), and the bytes hyper had
/// read are replayed: the connection is reading from then on, not idle again at once (which
/// took it apart for ever, at 100 % CPU).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_head_replayed_after_a_take_apart_is_answered_not_spun_on() {
    let mut h = Harness::start(Duration::ZERO, None);
    h.client
        .write_all(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHos")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let a = h.answers(&mut buf, 1).await.expect("answer to /a");
    assert_eq!(a[0].body, "/a:0");
    h.control.raise(Directive::CloseIdle);
    // The take-apart and replay happen now; then the connection waits for the rest.
    let polls = h.polls.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let spent = h.polls.load(Ordering::Relaxed) - polls;
    assert!(
        spent < 10,
        "{spent} polls while waiting for the rest of a head"
    );
    assert!(!h.task.is_finished(), "closed with half a request received");
    // The truth the drain acts on: half a head is buffered, so the connection is reading (an
    // idle phase here is what made the old layer take it apart again and again).
    assert_eq!(h.control.phase().0, super::control::Phase::Reading);
    h.client.write_all(b"t: a\r\n\r\n").await.expect("write");
    let b = h.answers(&mut buf, 1).await.expect("answer to /b");
    assert_eq!(b[0].body, "/b:0");
    assert!(
        h.closed_within(Duration::from_secs(5)).await,
        "closed once idle"
    );
    assert_eq!(h.seen(), ["/a", "/b"]);
}

/// Point 2: a handler answers before the body is in; the rest of the body (which looks like a
/// request) arrives after the server asked idle connections to close. It is body, not a
/// request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_still_arriving_after_the_response_is_no_request() {
    let mut h = Harness::start(Duration::ZERO, None);
    let len = SMUGGLED.len() + 10;
    h.client
        .write_all(
            format!("POST /early HTTP/1.1\r\nHost: a\r\nContent-Length: {len}\r\n\r\n0123456789")
                .as_bytes(),
        )
        .await
        .expect("write");
    let mut buf = Vec::new();
    let a = h.answers(&mut buf, 1).await.expect("early answer");
    assert_eq!(a[0].body, "/early:0");
    h.control.raise(Directive::CloseIdle);
    h.client
        .write_all(SMUGGLED.as_bytes())
        .await
        .expect("write");
    h.client
        .write_all(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let next = h.answers(&mut buf, 1).await.expect("answer to /next");
    assert_eq!(next[0].body, "/next:0");
    assert!(
        h.closed_within(Duration::from_secs(5)).await,
        "closed once idle"
    );
    assert_eq!(h.seen(), ["/early", "/next"]);
}

/// Point 4: one byte of what could be the HTTP/2 preface (or `POST`) waits for more like any
/// read, without a re-peek timer; the header-read timeout ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_waits_without_polling_and_the_header_read_timeout_ends_it() {
    let mut h = Harness::start(Duration::from_millis(300), None);
    h.client.write_all(b"P").await.expect("write");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let polls = h.polls.load(Ordering::Relaxed);
    assert!(polls <= 3, "{polls} polls for one byte");
    assert!(
        h.closed_within(Duration::from_secs(5)).await,
        "cut by the header-read timeout"
    );
    assert_eq!(h.connections.timed_out(), 1);
}

/// Point 4, and a client that then stops sending: `P` and the end of its bytes (its sending
/// side shut down) can never become a request; the connection ends at once, without waiting
/// for bytes that cannot come (the socket stays readable for good: waiting would spin).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_then_the_end_of_the_clients_bytes_ends_the_connection_without_spinning() {
    let mut h = Harness::start(Duration::from_secs(30), None);
    h.client.write_all(b"PRI * HTTP/2").await.expect("write");
    h.client.shutdown().await.expect("shutdown");
    assert!(
        h.closed_within(Duration::from_secs(5)).await,
        "ended without waiting for the header-read timeout"
    );
    tokio::time::timeout(Duration::from_secs(5), &mut h.task)
        .await
        .expect("the connection's task ended")
        .expect("no panic");
    let polls = h.polls.load(Ordering::Relaxed);
    assert!(polls <= 4, "{polls} polls");
    assert_eq!(h.connections.timed_out(), 0);
}

/// Point 3: the HTTP/2 preface without a SETTINGS frame is bounded by the header-read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_preface_without_settings_is_cut_by_the_header_read_timeout() {
    let mut h = Harness::start(Duration::from_millis(300), None);
    h.client
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("write");
    assert!(
        h.closed_within(Duration::from_secs(5)).await,
        "cut by the header-read timeout"
    );
    assert_eq!(h.connections.timed_out(), 1);
}

/// Point 3: an HTTP/2 connection with no open stream gets GOAWAY after the header-read
/// timeout (and is closed, the client having nothing in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed() {
    let h = Harness::start(Duration::from_millis(300), None);
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(h.client),
    )
    .await
    .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let res = sender
        .send_request(
            Request::get("http://t/x")
                .body(http_body_util::Empty::<Bytes>::new())
                .expect("request"),
        )
        .await
        .expect("response");
    let body = res.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"/x:0");
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the idle HTTP/2 connection was closed")
        .expect("no panic")
        .expect("closed cleanly (GOAWAY)");
}

/// Point 5: a connection that was to be passed and was given back (no successor takes it) is
/// served here: not closed at once, its next request answered with `Connection: close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_given_back_by_a_failed_hand_off_is_served_not_closed() {
    let mut h = Harness::start(Duration::ZERO, None);
    h.control.raise(Directive::HandOff);
    // Let the connection try (and fail) to pass itself.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!h.task.is_finished(), "closed at once on give-back");
    h.client
        .write_all(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let a = h.answers(&mut buf, 1).await.expect("answer");
    assert_eq!(a[0].body, "/a:0");
    assert!(a[0].close, "Connection: close after a failed hand-off");
}

/// A request whose bytes are in the socket before the runtime has reported them (its driver
/// runs between polls), when a directive's wake-up comes first: the connection is not closed
/// as idle under it (the request would be lost); it is answered.
#[tokio::test(flavor = "current_thread")]
async fn a_request_the_runtime_has_not_reported_yet_is_not_closed_as_idle() {
    let mut h = Harness::start(Duration::ZERO, None);
    // The connection's task polls once: nothing to read, idle.
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    // Written without yielding, then the directive at once: the task is woken by the
    // directive and polled before the runtime's driver sees the bytes.
    let request = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n";
    assert_eq!(h.client.try_write(request).expect("write"), request.len());
    h.control.raise(Directive::CloseIdle);
    let mut buf = Vec::new();
    let a = h.answers(&mut buf, 1).await.expect("answered, not closed");
    assert_eq!(a[0].body, "/a:0");
    assert_eq!(h.seen(), ["/a"]);
}

/// The same after a request, on a keep-alive connection: the next request's bytes are in the
/// socket, not yet reported, when the directive comes. The connection is taken apart with
/// nothing read, and bytes waiting: it is `Reading` from then on (it was taken apart again at
/// once, in a loop inside one poll that never yielded to the runtime's driver: a hang at 100 %
/// CPU). On a runtime of its own, so that such a hang fails the test instead of hanging it.
#[test]
fn a_request_not_reported_yet_when_a_keep_alive_connection_is_taken_apart_is_answered() {
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let answers = rt.block_on(async {
            let mut h = Harness::start(Duration::ZERO, None);
            let mut buf = Vec::new();
            h.client
                .write_all(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
                .await
                .expect("write");
            let mut answers = h.answers(&mut buf, 1).await.expect("first answer");
            let request = b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n";
            assert_eq!(h.client.try_write(request).expect("write"), request.len());
            h.control.raise(Directive::CloseIdle);
            answers.extend(h.answers(&mut buf, 1).await.expect("second answer"));
            answers
        });
        let _ = done.send(answers);
    });
    let answers = outcome
        .recv_timeout(Duration::from_secs(20))
        .expect("both answered within 20 s (not stuck in a loop that never yields)");
    assert_eq!(answers[0].body, "/a:0");
    assert_eq!(answers[1].body, "/b:0");
}

/// A service that is not ready until its gate opens, or whose readiness fails.
#[derive(Clone)]
struct Gate {
    open: Arc<std::sync::atomic::AtomicBool>,
    waker: Arc<Mutex<Option<std::task::Waker>>>,
    fail: bool,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Gate {
    fn new(fail: bool, seen: &Arc<Mutex<Vec<String>>>) -> Gate {
        Gate {
            open: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            waker: Arc::new(Mutex::new(None)),
            fail,
            seen: Arc::clone(seen),
        }
    }

    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        if let Some(w) = self.waker.lock().expect("waker").take() {
            w.wake();
        }
    }
}

impl tower::Service<Request<Incoming>> for Gate {
    type Response = Response<Full<Bytes>>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Response<Full<Bytes>>, std::io::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        if self.fail {
            return Poll::Ready(Err(std::io::Error::other("not today")));
        }
        *self.waker.lock().expect("waker") = Some(cx.waker().clone());
        match self.open.load(Ordering::SeqCst) {
            true => Poll::Ready(Ok(())),
            false => Poll::Pending,
        }
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let path = req.uri().path().to_string();
        self.seen.lock().expect("log").push(path.clone());
        std::future::ready(Ok(Response::new(Full::new(Bytes::from(format!(
            "{path}:0"
        ))))))
    }
}

/// A service that is not ready is called once it is (tower's contract), and its answer sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_not_ready_is_called_once_it_is() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let gate = Gate::new(false, &seen);
    let mut h = Harness::start_with(Duration::ZERO, None, seen, gate.clone());
    h.client
        .write_all(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    // The request is parsed and waits for the service.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while gate.waker.lock().expect("waker").is_none() {
        assert!(tokio::time::Instant::now() < until, "readiness asked");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(h.seen().is_empty(), "called before it was ready");
    gate.open();
    let mut buf = Vec::new();
    let a = h.answers(&mut buf, 1).await.expect("answer");
    assert_eq!(a[0].body, "/a:0");
    assert_eq!(h.seen(), ["/a"]);
}

/// A service whose readiness fails is never called; hyper ends the connection (its error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_whose_readiness_fails_is_not_called_and_the_connection_ends() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let gate = Gate::new(true, &seen);
    let mut h = Harness::start_with(Duration::ZERO, None, seen, gate);
    h.client
        .write_all(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    assert!(h.closed_within(Duration::from_secs(10)).await, "ended");
    assert!(h.seen().is_empty(), "called although not ready");
    tokio::time::timeout(Duration::from_secs(10), h.task)
        .await
        .expect("the connection's task ended")
        .expect("no panic");
}

/// A plaintext HTTP/2 connection whose preface and first SETTINGS arrive one byte at a time:
/// they are only peeked at, each byte waits for the next without polling, and hyper then reads
/// them from the socket itself and serves the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_preface_split_at_every_byte_is_served() {
    let mut h = Harness::start(Duration::from_secs(10), None);
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS, empty, on stream 0.
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    for b in &hello {
        h.client.write_all(&[*b]).await.expect("write");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let polls = h.polls.load(Ordering::Relaxed);
    assert!(
        polls <= 3 * hello.len(),
        "{polls} polls for {} bytes",
        hello.len()
    );
    // HEADERS on stream 1, END_STREAM | END_HEADERS: GET, http, authority `t` and path `/h2`
    // (HPACK: static entries, and literals with incremental indexing).
    let block = [0x82, 0x86, 0x41, 0x01, b't', 0x44, 0x03, b'/', b'h', b'2'];
    let mut frame = vec![0, 0, block.len() as u8, 1, 0x5, 0, 0, 0, 1];
    frame.extend_from_slice(&block);
    h.client.write_all(&frame).await.expect("write");
    let mut body = Vec::new();
    let read = async {
        loop {
            let mut head = [0u8; 9];
            h.client.read_exact(&mut head).await.expect("a frame");
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            h.client
                .read_exact(&mut payload)
                .await
                .expect("its payload");
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            // DATA on stream 1; END_STREAM ends the answer.
            if head[3] == 0 && stream == 1 {
                body.extend_from_slice(&payload);
                if head[4] & 0x1 != 0 {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("answered within 10 s");
    assert_eq!(body, b"/h2:0");
    assert_eq!(h.seen(), ["/h2"]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn pipelined_requests_split_anywhere_with_directives_anywhere(
        reqs in prop::collection::vec(req(), 1..5),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        directives in prop::collection::vec(directive(), 0..9),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let (answers, seen, polls) = rt.block_on(run(&reqs, &cuts, &directives));

        // No body byte was ever parsed as a request.
        prop_assert!(!seen.iter().any(|p| p == "/smuggled"), "smuggled: {seen:?}");
        // Each request reached the handler at most once, in order.
        let expected: Vec<String> = reqs
            .iter()
            .enumerate()
            .map(|(i, r)| if r.early { format!("/early{i}") } else { format!("/r{i}") })
            .collect();
        prop_assert!(seen.len() <= expected.len() && seen[..] == expected[..seen.len()], "{seen:?}");
        // Every answer is the one to its request (exactly once, in order, whole body read);
        // nothing comes after `Connection: close`.
        for (i, a) in answers.iter().enumerate() {
            let len = if reqs[i].early { 0 } else { body_len(&reqs[i]) };
            prop_assert_eq!(&a.body, &format!("{}:{len}", expected[i]));
            prop_assert!(!a.close || i + 1 == answers.len(), "an answer after Connection: close");
        }
        // Every request the handler saw was answered (a close never cut a response).
        prop_assert_eq!(answers.len(), seen.len());
        // Without a directive that may end the connection, every request is answered; with
        // one, only requests begun after it may go unanswered, so whatever was closed was
        // closed between two requests.
        let may_end = directives.iter().flatten().any(|d| matches!(d, Directive::CloseIdle | Directive::CloseResponses | Directive::HandOff));
        if !may_end {
            prop_assert_eq!(answers.len(), reqs.len());
        }
        // Polls are bounded: a few per write, read and request, not a spin.
        prop_assert!(polls <= 40 * (reqs.len() + cuts.len() + 2), "{polls} polls");
    }
}
