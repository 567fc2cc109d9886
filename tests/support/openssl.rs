//! `openssl s_client` as a TLS client that saves and resumes sessions (`-sess_out`,
//! `-sess_in`), for the tests of TLS sessions across restarts (tests/tls.rs, tests/systemd.rs).

use std::net::SocketAddr;
use std::path::Path;

/// Whether `openssl` is installed (CI must have it).
pub fn have_openssl() -> bool {
    let found = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found || std::env::var_os("CI").is_none(),
        "openssl is not installed, and CI must run this test"
    );
    found
}

/// How an `openssl s_client` connection went: whether it resumed its session, and which pid
/// answered its request.
#[derive(Debug, PartialEq, Eq)]
pub struct SClient {
    pub reused: bool,
    pub version: String,
    pub pid: u32,
}

/// One `GET /` with `openssl s_client` (`-tls1_3` or `-tls1_2`), saving the session to
/// `session` (`-sess_out`), or resuming it from there (`-sess_in`, `resume`).
pub fn s_client(addr: SocketAddr, version: &str, session: &Path, resume: bool) -> SClient {
    use std::io::Write;
    let mut child = std::process::Command::new("timeout")
        .arg("20")
        .arg("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .arg("-servername")
        .arg("localhost")
        .arg(version)
        .arg(if resume { "-sess_in" } else { "-sess_out" })
        .arg(session)
        // Read until the server closes (after the response): TLS 1.3 tickets come after the
        // handshake, and are in the session file only once read.
        .arg("-ign_eof")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run openssl s_client");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("write the request");
    let out = child.wait_with_output().expect("openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("New, ") || l.starts_with("Reused, "))
        .unwrap_or_else(|| panic!("no New/Reused line from s_client: {text}"));
    let pid = text
        .lines()
        .find_map(|l| l.strip_prefix("x-pid: "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no response from s_client: {text}"));
    SClient {
        reused: line.starts_with("Reused, "),
        version: line.split(", ").nth(1).unwrap_or_default().to_string(),
        pid,
    }
}
