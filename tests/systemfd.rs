//! The local development loop: `systemfd` holds the socket, the program comes and goes.
//!
//! `systemfd` comes from crates.io (`cargo install systemfd`; `.ci/run` installs it). Where it
//! is not installed the tests say so and pass, except under CI (`CI=true`), where they fail.

mod support;

use std::net::SocketAddr;

use rustix::process::Signal;
use support::*;

fn systemfd() -> Option<&'static str> {
    let found = std::process::Command::new("systemfd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("systemfd");
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "systemfd is not installed (cargo install systemfd); CI must have it"
    );
    eprintln!("SKIPPED: systemfd is not installed (cargo install systemfd)");
    None
}

/// `systemfd --no-pid` with a shell in between, as with `cargo watch`: the program is stopped
/// and started again while systemfd keeps the socket, and a handover restart works there too.
#[test]
fn no_pid_mode_keeps_the_socket_across_program_restarts() {
    let Some(systemfd) = systemfd() else { return };
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let hello = example("hello");
    let script = format!("\"$0\" {addr}; exec \"$0\" {addr}");
    let mut tool = Spawn::new(systemfd)
        .arg("--no-pid")
        .arg("-b")
        .arg("128")
        .arg("-s")
        .arg(format!("http::{addr}"))
        .arg("--")
        .arg("sh")
        .arg("-c")
        .arg(script)
        .arg(&hello)
        .start();
    // The address argument is the port systemfd holds: binding it again would fail, so
    // serving proves the inherited socket is used.
    let first = pid_in(&tool.lines.wait_count("listen on:", 1, SOON));
    let inherited = tool.lines.wait_for("inherited listener", SOON);
    assert!(inherited.contains("fd=3"), "{inherited}");
    assert_eq!(get(addr, "/").expect("first program").pid, first);

    // Stop the program: the socket stays open in systemfd, so a client connecting meanwhile is
    // queued, not refused, and answered by the next program.
    signal(first, Signal::TERM);
    // The shell is its parent and reaps it; the log says it closed gracefully.
    wait_exit(first, SOON);
    tool.lines.wait_for("reason: Signal(15)", SOON);
    let queued = get_in_background(addr, "/", false);
    let second = pid_in(&tool.lines.wait_count("listen on:", 2, SOON));
    assert_eq!(
        queued.join().expect("client").expect("queued request").pid,
        second
    );

    // A handover restart under systemfd: the child gets LISTEN_PID = its own pid.
    signal(second, Signal::USR1);
    let third = pid_in(&tool.lines.wait_count("listen on:", 3, SOON));
    tool.lines.wait_for("handed over", SOON);
    assert_eq!(get(addr, "/").expect("restarted program").pid, third);
    assert_eq!(wait_exit(second, SOON), Some(0));
    signal(third, Signal::TERM);
    assert_eq!(wait_exit(third, SOON), Some(0));
    tool.wait(SOON);
    assert_none_left([tool.pid, first, second, third]);
}

/// Without `--no-pid`, systemfd sets LISTEN_PID to the program it starts: handover checks it.
#[test]
fn pid_mode_serves_the_direct_child() {
    let Some(systemfd) = systemfd() else { return };
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut tool = Spawn::new(systemfd)
        .arg("-s")
        .arg(format!("http::{addr}"))
        .arg("--")
        .arg(example("hello"))
        .arg(addr.to_string())
        .start();
    let program = pid_in(&tool.lines.wait_for("listen on:", SOON));
    assert_eq!(get(addr, "/").expect("served").pid, program);
    signal(program, Signal::TERM);
    assert_eq!(wait_exit(program, SOON), Some(0));
    tool.wait(SOON);
    assert_none_left([tool.pid, program]);
}
