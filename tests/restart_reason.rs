//! A new process that fails before `READY=1` says why, and the old one reports it: a panic and
//! an error from the server's start, in a real restart of the `faults` example (its
//! `PANIC_AT_START_IF` and `BAD_SERVICE_IF` files make the new binary fail, as a broken deploy
//! would). The reason is in `STATUS=` and in the old process's log; the old process keeps
//! serving; the axum example's `POST /restart` answers with it. (The certificate errors of the
//! `tls` example, through the handle, are in tests/tls.rs.)

mod support;

use std::net::SocketAddr;

use rustix::process::Signal;
use support::*;

#[test]
fn a_panic_or_a_start_error_before_ready_reaches_status_and_the_log() {
    let notify = NotifySocket::new();
    let dir = scratch_dir("restart-reason");
    let panic_file = dir.join("panic");
    let bad_file = dir.join("bad-service");
    let server = Spawn::new(example("faults"))
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("NOTIFY_SOCKET", &notify.path)
        .env("PANIC_AT_START_IF", &panic_file)
        .env("BAD_SERVICE_IF", &bad_file)
        .start();
    let addr = addr_in(&server.listen_line());
    let ready = notify.wait_line("READY=1", SOON);
    assert_eq!(ready.pid, server.pid);
    let pid = server.pid;

    // A panic in the new process.
    std::fs::write(&panic_file, "").expect("write");
    server.signal(Signal::USR1);
    let failed = notify.wait_nth(1, SOON, |n| n.text.contains("STATUS=Restart failed"));
    assert_eq!(failed.pid, pid);
    assert!(failed.has("READY=1"), "{failed:?}");
    let status = failed
        .lines()
        .into_iter()
        .find(|l| l.starts_with("STATUS="))
        .expect("STATUS=")
        .to_string();
    assert!(
        status.contains(
            "exited with status 101 before it reported READY=1: panicked at examples/faults.rs:"
        ) && status.contains(
            ": PANIC_AT_START_IF: the file exists, so this process panics; still serving as pid"
        ),
        "{status}"
    );
    let logged = server
        .lines
        .wait_for("restart failed; this process keeps serving", SOON);
    assert!(
        logged.contains("PANIC_AT_START_IF: the file exists"),
        "{logged}"
    );
    assert_eq!(get(addr, "/").expect("still serving").pid, pid);

    // The server fails to start (a service for a listener that does not exist).
    std::fs::remove_file(&panic_file).expect("rm");
    std::fs::write(&bad_file, "").expect("write");
    server.signal(Signal::USR1);
    let failed = notify.wait_nth(2, SOON, |n| n.text.contains("STATUS=Restart failed"));
    assert_eq!(failed.pid, pid);
    assert!(
        failed.text.contains(
            "exited with status 1 before it reported READY=1: a service is given for the listener \"no-such-listener\", but no listener has that name"
        ),
        "{failed:?}"
    );
    assert_eq!(get(addr, "/").expect("still serving").pid, pid);

    // Fixed: the next restart hands over.
    std::fs::remove_file(&bad_file).expect("rm");
    let new = restart_once(&notify, pid, 1);
    assert_eq!(wait_exit(pid, SOON), Some(0));
    assert_eq!(get(addr, "/").expect("the new process serves").pid, new);
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));
    assert_none_left([pid, new]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The axum example's `POST /restart` answers with the new process's own reason: a deploy
/// whose new binary panics before `READY=1` (here the `faults` example, put in the deployed
/// binary's place, finding its `PANIC_AT_START_IF` file) gets `500 restart failed: new process
/// N exited with status 101 before it reported READY=1: panicked at ...`.
#[test]
fn the_axum_restart_endpoint_returns_the_reason_of_the_new_process() {
    let notify = NotifySocket::new();
    let dir = scratch_dir("restart-reason-axum");
    let exe = deploy_copy("axum", &dir);
    let panic_file = dir.join("panic");
    std::fs::write(&panic_file, "").expect("write");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let server = Spawn::new(&exe)
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg(admin.to_string())
        .env("NOTIFY_SOCKET", &notify.path)
        .env("PANIC_AT_START_IF", &panic_file)
        .start();
    listen_line_of(&server.lines, "admin");
    notify.wait_line("READY=1", SOON);
    let pid = server.pid;

    // The broken deploy: a binary that panics at start-up.
    let tmp = exe.with_extension("new");
    std::fs::copy(example("faults"), &tmp).expect("copy");
    std::fs::rename(&tmp, &exe).expect("rename");
    let answer = request(admin, "POST", "/restart").expect("POST /restart");
    assert_eq!(answer.status, 500, "{answer:?}");
    assert!(
        answer.body.starts_with("restart failed: new process ")
            && answer.body.contains(
                "exited with status 101 before it reported READY=1: panicked at examples/faults.rs:"
            )
            && answer
                .body
                .contains("PANIC_AT_START_IF: the file exists, so this process panics")
            && answer
                .body
                .ends_with(&format!("this process (pid {pid}) keeps serving\n")),
        "{}",
        answer.body
    );
    assert_eq!(answer.pid, pid);
    signal(pid, Signal::TERM);
    assert_eq!(wait_exit(pid, SOON), Some(0));
    assert_none_left([pid]);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
