//! The unit templates of `systemd/` under a real systemd: socket activation, `systemctl
//! reload` (zero-downtime restart) under load, a failed restart, and a graceful `systemctl
//! stop`, with the service manager as PID 1 of private namespaces (`tests/systemd-rig.sh`).
//!
//! Needs root, util-linux and systemd. Where the rig cannot run (not root, no cgroup2, no
//! namespaces) the tests print `SKIPPED: <reason>` and pass, unless
//! `HANDOVER_SYSTEMD_RIG=required`, which makes that a failure.

mod support;

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::*;

const RIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/systemd-rig.sh");
const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd");
const SERVICE: &str = "handover-hello.service";
const SOCKET: &str = "handover-hello.socket";
/// Exit code of the rig script when the machine cannot run it.
const RIG_SKIP: i32 = 77;
/// For the manager's answers and state changes; generous, the machine is shared.
const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Running the rig script.

/// Runs the rig script with `args`, bounded by `timeout`.
fn rig_script(args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(RIG).args(args);
    run_bounded(cmd, timeout)
}

/// Runs `cmd` with its output captured; kills it and panics after `timeout`.
fn run_bounded(mut cmd: Command, timeout: Duration) -> Output {
    let described = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{described}: {e}"));
    // Read both pipes on threads, so a chatty command cannot block on a full pipe.
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = read(child.stdout.take().map(|p| Box::new(p) as _));
    let err = read(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().expect("try_wait") {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{described} did not finish within {timeout:?}");
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

/// Whether the rig can run here; prints `SKIPPED: <reason>` when it cannot.
fn rig_available() -> bool {
    let out = rig_script(&["check"], Duration::from_secs(60));
    match out.status.code() {
        Some(0) => true,
        Some(RIG_SKIP) => {
            let reason = text(&out.stderr);
            assert!(
                std::env::var("HANDOVER_SYSTEMD_RIG").as_deref() != Ok("required"),
                "HANDOVER_SYSTEMD_RIG=required, but the systemd rig cannot run here: {reason}"
            );
            eprintln!("SKIPPED: the systemd rig cannot run here: {reason}");
            false
        }
        _ => panic!(
            "systemd-rig.sh check failed: {:?}\n{}\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The rig: a systemd manager in its namespaces, torn down on drop (also on panic).

struct Rig {
    workdir: PathBuf,
    /// `systemd-rig.sh boot`, which became `unshare`: our child, reaped by us.
    boot: Child,
    /// Host pid of the manager (PID 1 of the namespace).
    pid: u32,
    stopped: bool,
}

impl Rig {
    fn boot(workdir: &Path) -> Rig {
        let err = File::create(workdir.join("log/boot.err")).expect("create boot.err");
        let boot = Command::new("bash")
            .arg(RIG)
            .arg("boot")
            .arg(workdir)
            // Debug: the manager then logs every sd_notify message it gets, and what it does.
            .env("RIG_LOG_LEVEL", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start systemd-rig.sh boot");
        let mut rig = Rig {
            workdir: workdir.to_path_buf(),
            boot,
            pid: 0,
            stopped: false,
        };
        let wd = workdir.to_str().expect("UTF-8 path");
        let mut wait = Command::new("bash");
        wait.arg(RIG)
            .args(["wait", wd, "90"])
            .env("RIG_BOOT_PID", rig.boot.id().to_string());
        let out = run_bounded(wait, Duration::from_secs(120));
        assert!(
            out.status.success(),
            "the manager did not come up: {}\n{}",
            text(&out.stderr),
            rig.logs()
        );
        rig.pid = text(&out.stdout).parse().expect("manager pid");
        rig
    }

    /// Runs `args` inside the namespaces, bounded.
    fn exec(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("bash");
        cmd.arg(RIG).arg("exec").arg(&self.workdir).args(args);
        run_bounded(cmd, Duration::from_secs(60))
    }

    /// `systemctl ARGS`, which must succeed; its stdout.
    fn systemctl(&self, args: &[&str]) -> String {
        let mut all = vec!["systemctl", "--no-pager"];
        all.extend_from_slice(args);
        let out = self.exec(&all);
        assert!(
            out.status.success(),
            "systemctl {args:?} failed ({:?}): {}\n{}\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr),
            self.logs()
        );
        text(&out.stdout)
    }

    /// One property of the service.
    fn show(&self, property: &str) -> String {
        self.show_unit(SERVICE, property)
    }

    fn show_unit(&self, unit: &str, property: &str) -> String {
        self.systemctl(&["show", "-p", property, "--value", unit])
    }

    fn main_pid(&self) -> u32 {
        self.show("MainPID").parse().expect("MainPID is a number")
    }

    /// Polls until `cond` holds for the service's property, or panics after `timeout`.
    fn wait_show(&self, property: &str, timeout: Duration, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.show(property);
            if cond(&value) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{property} still {value:?} after {timeout:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process with this pid *of the namespace* runs (a zombie counts as gone).
    /// Read through the manager's root (`/proc/<manager>/root/proc`): the namespace's procfs.
    fn alive_inside(&self, pid: u32) -> bool {
        let stat = format!("/proc/{}/root/proc/{pid}/stat", self.pid);
        match std::fs::read_to_string(stat) {
            Ok(s) => !s
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
            Err(_) => false,
        }
    }

    fn wait_gone_inside(&self, pid: u32, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.alive_inside(pid) {
            assert!(
                Instant::now() < deadline,
                "pid {pid} still runs after {timeout:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pids (in the namespace) of the processes named handover-hello, not zombies, sorted.
    fn servers_inside(&self) -> Vec<u32> {
        let root = format!("/proc/{}/root/proc", self.pid);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&root)
            .expect("namespace procfs")
            .flatten()
        {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if comm.trim() == "handover-hello" && self.alive_inside(pid) {
                out.push(pid);
            }
        }
        out.sort_unstable();
        out
    }

    fn service_log(&self) -> String {
        std::fs::read_to_string(self.workdir.join("log/handover-hello.log")).unwrap_or_default()
    }

    /// The end of the manager's and the service's logs, for failure messages.
    fn logs(&self) -> String {
        let tail = |name: &str, keep: &dyn Fn(&str) -> bool| {
            let all =
                std::fs::read_to_string(self.workdir.join("log").join(name)).unwrap_or_default();
            let lines: Vec<&str> = all.lines().filter(|l| keep(l)).collect();
            lines[lines.len().saturating_sub(60)..].join("\n")
        };
        let any = |_: &str| true;
        format!(
            "--- manager, about handover-hello (log/console.log) ---\n{}\n\
             --- service (log/handover-hello.log) ---\n{}\n\
             --- rig (log/manager.log, log/boot.err) ---\n{}\n{}\n\
             (all logs are in {})",
            tail("console.log", &|l| l.contains("handover-hello")),
            tail("handover-hello.log", &any),
            tail("manager.log", &any),
            tail("boot.err", &any),
            self.workdir.join("log").display()
        )
    }

    /// Kills the namespace and checks that nothing is left; returns the script's report.
    fn stop(&mut self) -> Result<String, String> {
        self.stopped = true;
        let wd = self.workdir.to_str().expect("UTF-8 path");
        let out = rig_script(&["stop", wd], Duration::from_secs(60));
        // The unshare process is our child: reap it (it exits once the namespace is gone).
        let deadline = Instant::now() + Duration::from_secs(20);
        let reaped = loop {
            match self.boot.try_wait() {
                Ok(Some(_)) => break true,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    let _ = self.boot.kill();
                    let _ = self.boot.wait();
                    break false;
                }
            }
        };
        let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
        if !out.status.success() {
            return Err(report);
        }
        if !reaped {
            return Err(format!("{report}\nthe rig's unshare did not exit"));
        }
        if self.pid != 0 && alive(self.pid) {
            return Err(format!(
                "{report}\nthe manager (pid {}) still runs",
                self.pid
            ));
        }
        Ok(report)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        if !self.stopped {
            if let Err(e) = self.stop() {
                eprintln!("tearing down the systemd rig: {e}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP with a bound.

fn get_within(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Reply, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = path.to_string();
    std::thread::spawn(move || {
        let _ = tx.send(get(addr, &path));
    });
    rx.recv_timeout(timeout)
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

fn hello_from(addr: SocketAddr, path: &str) -> u32 {
    let reply = get_within(addr, path, WAIT).expect("request");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "Hello world", "{reply:?}");
    reply.pid
}

// ---------------------------------------------------------------------------------------------

/// `systemctl reload` and waits until the service has a new, answering main pid and the old
/// one is gone.
fn reload(rig: &Rig, load: &Load, old: u32) -> u32 {
    rig.systemctl(&["reload", SERVICE]);
    let new: u32 = rig
        .wait_show("MainPID", WAIT, |v| v != old.to_string() && v != "0")
        .parse()
        .expect("MainPID");
    load.wait_pid(new, WAIT);
    rig.wait_gone_inside(old, WAIT);
    assert_eq!(rig.show("ActiveState"), "active");
    new
}

/// A work directory with the unit templates, the rig's drop-ins (a free port, the log file)
/// and the hello example installed; and the address the socket unit listens on.
fn prepare(tag: &str) -> (PathBuf, SocketAddr) {
    let workdir = scratch_dir(tag);
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let binary = example("hello");
    let out = rig_script(
        &[
            "prepare",
            workdir.to_str().expect("UTF-8 path"),
            binary.to_str().expect("UTF-8 path"),
            &port.to_string(),
        ],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "prepare: {}", text(&out.stderr));
    (workdir, addr)
}

/// `systemctl stop` while a 1 s request is in flight: the request is answered by `pid`, and
/// the service ends cleanly.
fn stop_with_a_request_in_flight(rig: &Rig, addr: SocketAddr, pid: u32) {
    let slow_before = rig.service_log().matches("slow request: sleeping").count();
    let slow = get_in_background(addr, "/?sleep_ms=1000", false);
    let deadline = Instant::now() + WAIT;
    while rig.service_log().matches("slow request: sleeping").count() == slow_before {
        assert!(Instant::now() < deadline, "the slow request never arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    rig.systemctl(&["stop", SERVICE]);
    let stop_took = started.elapsed();
    let reply = slow
        .join()
        .expect("request thread")
        .unwrap_or_else(|e| panic!("the request in flight failed: {e}\n{}", rig.logs()));
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.pid, pid);
    assert_eq!(rig.show("ActiveState"), "inactive");
    assert_eq!(rig.show("Result"), "success");
    assert_eq!(rig.show("ExecMainStatus"), "0");
    assert_eq!(rig.show("ExecMainCode"), "1", "CLD_EXITED");
    assert_eq!(rig.show("MainPID"), "0");
    eprintln!("systemctl stop took {stop_took:?} (drained one request of 1 s)");
}

#[test]
fn socket_activation_reload_and_stop_under_systemd() {
    if !rig_available() {
        return;
    }
    let (workdir, addr) = prepare("systemd");
    let installed = workdir.join("bin/handover-hello");

    // The manager must not touch the host's /tmp (a naive boot's tmpfiles step empties it).
    let canary =
        std::env::temp_dir().join(format!("handover-systemd-canary-{}", std::process::id()));
    std::fs::write(&canary, "still here").expect("write canary");

    let mut rig = Rig::boot(&workdir);
    eprintln!("systemd rig up: manager pid {} (host)", rig.pid);

    // Socket activation: the socket listens, the service starts on the first connection.
    assert_eq!(rig.show_unit(SOCKET, "ActiveState"), "active");
    assert_eq!(rig.show("ActiveState"), "inactive");
    let first = hello_from(addr, "/");
    assert_eq!(rig.main_pid(), first, "MainPID is the pid that answered");
    assert_eq!(rig.show("ActiveState"), "active");
    let status = rig.show("StatusText");
    assert!(
        status.starts_with(&format!("Listening on http://{addr}")),
        "{status}"
    );

    // Two zero-downtime restarts under a keep-alive load: the second one is made by a process
    // that was itself started by a restart (it must still reach systemd's NOTIFY_SOCKET).
    let load = Load::start(addr, 4, "/", Duration::from_secs(120));
    load.wait_pid(first, WAIT);
    let second = reload(&rig, &load, first);
    let third = reload(&rig, &load, second);
    let report = load.stop();
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.errors);
    for pid in [first, second, third] {
        assert!(
            report.pids.contains(&pid),
            "pid {pid} never answered: {report:?}"
        );
    }
    assert_eq!(hello_from(addr, "/"), third);
    // `systemctl status` shows the new process's own status, relayed with MAINPID=.
    let status = rig.show("StatusText");
    assert!(status.starts_with("Listening on"), "{status}");

    // A broken deploy: the restart fails, the old process stays the service and keeps serving.
    replace_with_script(&installed, "exit 1");
    rig.systemctl(&["reload", SERVICE]);
    rig.wait_show("StatusText", WAIT, |v| v.contains("Restart failed"));
    assert_eq!(rig.main_pid(), third);
    assert_eq!(rig.show("ActiveState"), "active");
    assert_eq!(hello_from(addr, "/"), third);
    let shown = rig.systemctl(&["status", SERVICE]);
    assert!(shown.contains("Restart failed"), "{shown}");
    // The failed new process (the script, also named handover-hello) is gone.
    let deadline = Instant::now() + WAIT;
    loop {
        let servers = rig.servers_inside();
        if servers == [third] {
            break;
        }
        assert!(Instant::now() < deadline, "server processes: {servers:?}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Fixed deploy: restarting works again.
    restore_binary("hello", &installed);
    let load = Load::start(addr, 2, "/", Duration::from_secs(120));
    load.wait_pid(third, WAIT);
    let fourth = reload(&rig, &load, third);
    let report = load.stop();
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.errors);

    // Graceful stop with a request in flight, after a hand-off (the new process is systemd's
    // own child, not "alien", so systemd waits for it after SIGTERM):
    // the request is answered, the service ends cleanly.
    stop_with_a_request_in_flight(&rig, addr, fourth);
    for pid in [first, second, third, fourth] {
        assert!(!rig.alive_inside(pid), "pid {pid} is still there");
    }
    let left = rig.servers_inside();
    assert!(left.is_empty(), "server processes left: {left:?}");
    // The socket stays, ready to start the service again.
    assert_eq!(rig.show_unit(SOCKET, "ActiveState"), "active");

    let manager = rig.pid;
    let report = rig.stop().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{report}");
    assert!(
        report.contains("nothing left") || report.contains("no process left"),
        "{report}"
    );
    assert!(!alive(manager));
    drop(rig);
    assert_eq!(
        std::fs::read_to_string(&canary).ok().as_deref(),
        Some("still here"),
        "a file in the host's /tmp was changed"
    );
    let _ = std::fs::remove_file(&canary);
    let _ = std::fs::remove_dir_all(&workdir);
}

/// `systemd-analyze verify` accepts the templates (with the ExecStart= binary in place), and
/// `systemd-analyze security` rates the service at most 3.0 ("OK").
#[test]
fn unit_templates_verify_and_are_hardened() {
    if !rig_available() {
        return;
    }
    let binary = example("hello");
    let bin = binary.to_str().expect("UTF-8 path");
    let socket = format!("{UNITS}/handover-hello.socket");
    let service = format!("{UNITS}/{SERVICE}");
    let out = rig_script(&["verify", bin, &socket, &service], Duration::from_secs(60));
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "systemd-analyze verify failed: {said}"
    );
    assert!(said.is_empty(), "systemd-analyze verify complains: {said}");

    let out = rig_script(&["security", &service], Duration::from_secs(60));
    let table = text(&out.stdout);
    assert!(out.status.success(), "{table}\n{}", text(&out.stderr));
    let exposure: f64 = table
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for handover-hello.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{table}"));
    eprintln!("systemd-analyze security: exposure {exposure}");
    assert!(exposure <= 3.0, "exposure {exposure} > 3.0:\n{table}");

    // The systemd >= 253 drop-in: on older systemd the only complaints are about what it
    // introduces (Type=notify-reload, ReloadSignal=); on newer ones, none.
    let dir = scratch_dir("notify-reload");
    let dropins = dir.join(format!("{SERVICE}.d"));
    std::fs::create_dir_all(&dropins).expect("mkdir");
    for f in ["handover-hello.socket", SERVICE] {
        std::fs::copy(format!("{UNITS}/{f}"), dir.join(f)).expect("copy unit");
    }
    std::fs::copy(
        format!("{UNITS}/notify-reload.conf"),
        dropins.join("notify-reload.conf"),
    )
    .expect("copy drop-in");
    let unit = dir.join(SERVICE);
    let out = rig_script(
        &["verify", bin, unit.to_str().expect("UTF-8 path")],
        Duration::from_secs(60),
    );
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let version: u32 = text(
        &Command::new("systemctl")
            .arg("--version")
            .output()
            .expect("systemctl --version")
            .stdout,
    )
    .split_whitespace()
    .nth(1)
    .and_then(|v| v.parse().ok())
    .expect("systemd version");
    if version >= 253 {
        assert!(out.status.success() && said.is_empty(), "{said}");
    } else {
        for line in said.lines() {
            assert!(
                line.contains("notify-reload") || line.contains("ReloadSignal"),
                "unexpected complaint on systemd {version}: {line}"
            );
        }
        eprintln!(
            "notify-reload.conf needs systemd >= 253; systemd {version} says (expected):\n{said}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The major version of the manager the rig boots: `$RIG_SYSTEMD` (with
/// `$RIG_SYSTEMD_LIBRARY_PATH` for its libraries) or the installed one.
fn rig_systemd_version() -> Option<u32> {
    let manager = std::env::var_os("RIG_SYSTEMD").unwrap_or_else(|| "/lib/systemd/systemd".into());
    let mut cmd = Command::new(&manager);
    cmd.arg("--version");
    if let Some(libs) = std::env::var_os("RIG_SYSTEMD_LIBRARY_PATH") {
        cmd.env("LD_LIBRARY_PATH", libs);
    }
    let out = cmd.output().ok()?;
    text(&out.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
}

/// `systemd/notify-reload.conf` (Type=notify-reload, systemd >= 253): `systemctl reload`
/// returns only once the hand-off is done, or has failed. Runs when the rig's manager is
/// systemd >= 253: the installed one, or `RIG_SYSTEMD=<path of a newer systemd binary>` (and
/// `RIG_SYSTEMD_LIBRARY_PATH=<its libsystemd-shared directory>`), e.g. unpacked from
/// bookworm-backports with `apt-get download systemd libsystemd-shared` and `dpkg-deb -x`.
#[test]
fn notify_reload_dropin_under_systemd_253_or_later() {
    match rig_systemd_version() {
        Some(v) if v >= 253 => {}
        v => {
            eprintln!(
                "SKIPPED: Type=notify-reload needs systemd >= 253; the rig's manager is {v:?} \
                 (set RIG_SYSTEMD and RIG_SYSTEMD_LIBRARY_PATH to a newer build to run this)"
            );
            return;
        }
    }
    if !rig_available() {
        return;
    }
    let (workdir, addr) = prepare("notify-reload-rig");
    std::fs::copy(
        format!("{UNITS}/notify-reload.conf"),
        workdir.join("units/handover-hello.service.d/notify-reload.conf"),
    )
    .expect("copy drop-in");
    let installed = workdir.join("bin/handover-hello");
    let mut rig = Rig::boot(&workdir);
    assert_eq!(rig.show("Type"), "notify-reload");

    let first = hello_from(addr, "/");
    assert_eq!(rig.main_pid(), first);
    // Synchronous: when `systemctl reload` returns, the new process is the service.
    rig.systemctl(&["reload", SERVICE]);
    let second = rig.main_pid();
    assert_ne!(second, first, "{}", rig.logs());
    assert_eq!(hello_from(addr, "/"), second);
    rig.wait_gone_inside(first, WAIT);

    // A failed restart ends the reload too, with the old process still the service.
    replace_with_script(&installed, "exit 1");
    rig.systemctl(&["reload", SERVICE]);
    let status = rig.show("StatusText");
    assert!(status.contains("Restart failed"), "{status}");
    assert_eq!(rig.main_pid(), second);
    assert_eq!(hello_from(addr, "/"), second);
    restore_binary("hello", &installed);

    stop_with_a_request_in_flight(&rig, addr, second);
    let report = rig.stop().unwrap_or_else(|e| panic!("{e}"));
    assert!(report.contains("no process left"), "{report}");
    drop(rig);
    let _ = std::fs::remove_dir_all(&workdir);
}
