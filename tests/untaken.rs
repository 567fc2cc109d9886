//! An inherited socket that nothing takes is an error at start-up, not a socket nobody accepts
//! on: the axum example (which takes `web` and `admin`) under
//! `systemd-socket-activate --fdname=http`, a name it does not use, on an address of its own.

mod support;

use std::net::{SocketAddr, TcpStream};

use rustix::process::Signal;
use support::*;

/// The axum example under `systemd-socket-activate -l SOCKET --fdname=http`, its own `web` and
/// `admin` on other free ports, started by a first connection to the socket; returns the
/// process, the socket's address, and the example's web address.
fn activate_with_http(env: &[&str], notify: &NotifySocket) -> (Proc, SocketAddr, SocketAddr) {
    let socket = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut spawn = Spawn::new("systemd-socket-activate")
        .arg("-l")
        .arg(socket.to_string())
        .arg("--fdname=http")
        .arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", notify.path.display()))
        .arg("-E")
        .arg("RUST_LOG=info");
    for var in env {
        spawn = spawn.arg("-E").arg(var);
    }
    let activator = spawn
        .arg(example("axum"))
        .arg(web.to_string())
        .arg(admin.to_string())
        .start();
    activator.lines.wait_for("Listening on", SOON);
    // The first connection starts the program (systemd-socket-activate execs it: same pid).
    let _client = TcpStream::connect(socket).expect("connect to the activation socket");
    activator.lines.wait_for("inherited listener", SOON);
    (activator, socket, web)
}

#[test]
fn an_inherited_socket_no_service_takes_is_an_error_naming_it() {
    subreaper();
    let notify = NotifySocket::new();
    let (mut server, socket, _) = activate_with_http(&[], &notify);
    assert_eq!(server.wait(SOON), Some(1), "exit status");
    let error = server.lines.wait_for("server error", SOON);
    let named = format!("inherited listener(s) not served: fd 3 (name \"http\", http://{socket})");
    assert!(
        error.contains(&named),
        "the error names the fd, the name and the address ({named}): {error}"
    );
    for advice in [
        "Listeners::take_or_bind(\"http\", ..)",
        "systemd-socket-activate --fdname=NAME",
        "Listeners::close_unused()",
    ] {
        assert!(error.contains(advice), "the error says {advice:?}: {error}");
    }
    assert!(
        notify.all().iter().all(|n| !n.has("READY=1")),
        "nothing may report READY=1: {:?}",
        notify.all()
    );
    assert_none_left([server.pid]);
}

#[test]
fn closing_unused_inherited_sockets_is_an_opt_in_with_a_warning() {
    subreaper();
    let notify = NotifySocket::new();
    let (mut server, socket, web) = activate_with_http(&["HANDOVER_CLOSE_UNUSED=1"], &notify);
    let warning = server
        .lines
        .wait_for("inherited listener not served by this process", SOON);
    assert!(
        warning.contains("fd=3")
            && warning.contains("name=http")
            && warning.contains(&format!("url=http://{socket}")),
        "the warning names the fd, the name and the address: {warning}"
    );
    assert_eq!(notify.wait_line("READY=1", SOON).pid, server.pid);
    // Served where the example binds, and the passed socket is closed (it was the only copy:
    // systemd-socket-activate execs the program), so a client is refused at once.
    assert_eq!(get(web, "/").expect("web").body, "Hello world");
    let refused = TcpStream::connect(socket).expect_err("the unused socket is closed");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    assert_none_left([server.pid]);
}
