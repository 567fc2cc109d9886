//! Helpers for the tests of issue 14 ("the hand-off must never leave the service dark"): a
//! seccomp wrapper built from a few lines of C, who holds a socket (from /proc), abstract
//! socket names, and processes in a PID namespace seen from outside.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// The seccomp wrapper's C source: `seccomp-wrap MODE PROGRAM [ARGS...]` installs a filter,
/// then executes PROGRAM, which (and every process it starts) runs under it. Raw BPF, no
/// libseccomp. MODEs:
/// - `no-pidfd-open`: `pidfd_open` fails with ENOSYS (kernels < 5.3, strict profiles);
/// - `no-clone3`: `clone3` fails with ENOSYS (Docker's default profile does this);
/// - `no-clone3-no-clone-parent`: that, and `clone` with `CLONE_PARENT` fails with EPERM.
const SECCOMP_WRAP_C: &str = r#"
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

#if defined(__x86_64__)
#define ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define ARCH AUDIT_ARCH_AARCH64
#else
#error "seccomp-wrap: unsupported architecture"
#endif
#ifndef __NR_clone3
#define __NR_clone3 435
#endif
#ifndef __NR_pidfd_open
#define __NR_pidfd_open 434
#endif
#define CLONE_PARENT_FLAG 0x00008000

#define LOAD(field) BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, field))
#define RET(value) BPF_STMT(BPF_RET | BPF_K, (value))
#define ERRNO(e) RET(SECCOMP_RET_ERRNO | ((e) & SECCOMP_RET_DATA))

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODE PROGRAM [ARGS...]\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1];
    /* Every filter starts the same way: wrong architecture -> kill; load the syscall nr. */
    struct sock_filter no_pidfd_open[] = {
        LOAD(arch), BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ARCH, 1, 0), RET(SECCOMP_RET_KILL_PROCESS),
        LOAD(nr),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_pidfd_open, 0, 1), ERRNO(ENOSYS),
        RET(SECCOMP_RET_ALLOW),
    };
    struct sock_filter no_clone3[] = {
        LOAD(arch), BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ARCH, 1, 0), RET(SECCOMP_RET_KILL_PROCESS),
        LOAD(nr),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone3, 0, 1), ERRNO(ENOSYS),
        RET(SECCOMP_RET_ALLOW),
    };
    struct sock_filter no_clone3_no_clone_parent[] = {
        LOAD(arch), BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ARCH, 1, 0), RET(SECCOMP_RET_KILL_PROCESS),
        LOAD(nr),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone3, 0, 1), ERRNO(ENOSYS),
        /* clone: flags are the first argument (low 32 bits, little endian) on x86-64 and
           aarch64. Not clone -> allow (3 ahead). */
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone, 0, 3),
        LOAD(args[0]),
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, CLONE_PARENT_FLAG, 0, 1), ERRNO(EPERM),
        RET(SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog;
    if (strcmp(mode, "no-pidfd-open") == 0) {
        prog.len = sizeof(no_pidfd_open) / sizeof(no_pidfd_open[0]);
        prog.filter = no_pidfd_open;
    } else if (strcmp(mode, "no-clone3") == 0) {
        prog.len = sizeof(no_clone3) / sizeof(no_clone3[0]);
        prog.filter = no_clone3;
    } else if (strcmp(mode, "no-clone3-no-clone-parent") == 0) {
        prog.len = sizeof(no_clone3_no_clone_parent) / sizeof(no_clone3_no_clone_parent[0]);
        prog.filter = no_clone3_no_clone_parent;
    } else {
        fprintf(stderr, "seccomp-wrap: unknown mode %s\n", mode);
        return 2;
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        perror("seccomp-wrap: PR_SET_NO_NEW_PRIVS");
        return 1;
    }
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) {
        perror("seccomp-wrap: PR_SET_SECCOMP");
        return 1;
    }
    execv(argv[2], argv + 2);
    perror("seccomp-wrap: execv");
    return 127;
}
"#;

/// The seccomp wrapper, compiled once per test process with the machine's `cc`.
pub fn seccomp_wrapper() -> PathBuf {
    static BUILT: OnceLock<Mutex<Option<PathBuf>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(p) = built.as_ref() {
        return p.clone();
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("seccomp-wrap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("seccomp wrapper dir");
    let source = dir.join("seccomp-wrap.c");
    let binary = dir.join("seccomp-wrap");
    std::fs::write(&source, SECCOMP_WRAP_C).expect("write seccomp-wrap.c");
    let out = Command::new("cc")
        .arg("-O2")
        .arg("-Wall")
        .arg("-o")
        .arg(&binary)
        .arg(&source)
        .output()
        .expect("run cc (install gcc and linux-libc-dev; .ci/run does)");
    assert!(
        out.status.success(),
        "cc seccomp-wrap.c failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    *built = Some(binary.clone());
    binary
}

/// The inode of the TCP socket listening on `port` (IPv4 or IPv6), from /proc/net/tcp*.
pub fn listening_inode(port: u16) -> Option<u64> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is "ADDR:PORT" in hex; st 0A is LISTEN; inode is field 9.
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && *state == "0A" {
                return inode.parse().ok();
            }
        }
    }
    None
}

/// Every process holding the socket with `inode` (scanning /proc/*/fd).
pub fn socket_holders(inode: u64) -> Vec<u32> {
    let needle = format!("socket:[{inode}]");
    let mut holders = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return holders;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy() == needle))
        {
            holders.push(pid);
        }
    }
    holders
}

/// The service is really gone: nobody holds its listening socket any more, and the port can
/// be bound again.
pub fn assert_port_released(port: u16, inode: u64) {
    let holders = socket_holders(inode);
    assert!(
        holders.is_empty(),
        "processes still hold the listening socket {inode} of port {port}: {holders:?}"
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    if let Err(e) = TcpListener::bind(addr) {
        panic!("port {port} is not free after the server stopped: {e}");
    }
}

/// The parent pid of `pid`, from /proc/PID/stat.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split(' ').nth(1)?.parse().ok()
}

/// Every descendant of `root` alive now (children, their children, ...).
pub fn descendants(root: u32) -> Vec<u32> {
    let mut all: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            if let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() {
                if let Some(ppid) = parent_of(pid) {
                    all.push((pid, ppid));
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    // Bounded by the number of processes: each is added once.
    while let Some(p) = frontier.pop() {
        for (pid, ppid) in &all {
            if *ppid == p && !out.contains(pid) {
                out.push(*pid);
                frontier.push(*pid);
            }
        }
    }
    out
}

/// A process's pid inside its own PID namespace (the last `NSpid` entry).
pub fn ns_pid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// The names (without the leading `@`) of bound abstract Unix sockets that start with `prefix`,
/// from /proc/net/unix.
pub fn abstract_sockets(prefix: &str) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter_map(|path| path.strip_prefix('@'))
        .filter(|name| name.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// Sets another process's soft `RLIMIT_NOFILE` with prlimit(2), keeping its hard limit (so it
/// can be raised again). `None` restores the soft limit to the hard one.
pub fn set_nofile(pid: u32, limit: Option<u64>) {
    // The hard limit, from /proc/PID/limits ("Max open files  SOFT  HARD  files").
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let hard = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|h| h.parse::<u64>().ok());
    rustix::process::prlimit(
        Some(rustix::process::Pid::from_raw(pid as i32).expect("pid > 0")),
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: limit.or(hard),
            maximum: hard,
        },
    )
    .unwrap_or_else(|e| panic!("prlimit NOFILE {limit:?}: {e}"));
}

/// The `RLIMIT_NOFILE` at which `pid` can open exactly `extra` more fds now: new fds take the
/// lowest free numbers, and the limit bounds the number.
pub fn nofile_for_extra(pid: u32, extra: usize) -> u64 {
    let open: std::collections::BTreeSet<u32> =
        super::fds_of(pid).into_iter().map(|(fd, _)| fd).collect();
    let free = (0u32..).filter(|n| !open.contains(n));
    u64::from(free.take(extra + 1).last().expect("an unbounded range"))
}

impl super::Lines {
    /// How many lines there are now (a mark for [`super::Lines::wait_any_after`]).
    pub fn count(&self) -> usize {
        self.0.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Waits for a line after the first `start` that contains one of `needles`; returns it.
    pub fn wait_any_after(
        &self,
        start: usize,
        needles: &[&str],
        timeout: std::time::Duration,
    ) -> String {
        let deadline = std::time::Instant::now() + timeout;
        let (m, cv) = &*self.0;
        let mut lines = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(l) = lines
                .iter()
                .skip(start)
                .find(|l| needles.iter().any(|n| l.contains(n)))
            {
                return l.clone();
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                panic!(
                    "timed out waiting for a line containing one of {needles:?}; got:\n{}",
                    lines[start.min(lines.len())..].join("\n")
                );
            }
            lines = cv
                .wait_timeout(lines, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}
