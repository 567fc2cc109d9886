//! What a new user does with only the README: an empty project that depends on handover with
//! the README's dependency line, the README's `src/main.rs`, `cargo build`, then the program
//! under `systemd-socket-activate --fdname=web`, restarted with `SIGUSR1` and stopped with
//! `SIGTERM`.
//!
//! The dependency is the *packaged* crate (`cargo package`, unpacked): so this also proves
//! that the package builds from its own files, and that the README's example needs nothing
//! the package leaves out. The project is built in `target/newcomer/` (kept between runs, so
//! only the first build is slow); its dependencies come from crates.io like a user's would,
//! starting from this repository's `Cargo.lock`, so the versions are the tested ones.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::process::Signal;
use support::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The fenced block of `lang` that follows the first occurrence of `after` in the README.
fn readme_block(after: &str, lang: &str) -> String {
    let readme = std::fs::read_to_string(format!("{ROOT}/README.md")).expect("read README.md");
    let rest = readme
        .split_once(after)
        .unwrap_or_else(|| panic!("README.md has no {after:?}"))
        .1;
    let fence = format!("```{lang}\n");
    let block = rest
        .split_once(&fence)
        .unwrap_or_else(|| panic!("no {fence:?} block after {after:?} in README.md"))
        .1;
    block
        .split_once("```")
        .expect("the block ends")
        .0
        .to_string()
}

fn run(cmd: &mut Command, what: &str) {
    try_run(cmd, what).unwrap_or_else(|e| panic!("{e}"));
}

fn try_run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let output = cmd
        .output()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// `cargo package`, unpacked: the directory of the packaged crate.
fn packaged_crate(work: &Path) -> PathBuf {
    run(
        Command::new(env!("CARGO"))
            .current_dir(ROOT)
            .args([
                "package",
                "--no-verify",
                "--allow-dirty",
                "--locked",
                "--quiet",
            ])
            .arg("--target-dir")
            .arg(work),
        "cargo package",
    );
    let name = format!("handover-{}", env!("CARGO_PKG_VERSION"));
    let size = std::fs::metadata(work.join("package").join(format!("{name}.crate")))
        .expect("the .crate file")
        .len();
    assert!(
        size < 256 * 1024,
        "the package is {size} bytes; it should hold the library, not the tests and benches"
    );
    let unpacked = work.join("unpacked");
    let _ = std::fs::remove_dir_all(&unpacked);
    std::fs::create_dir_all(&unpacked).expect("mkdir");
    run(
        Command::new("tar")
            .arg("-xzf")
            .arg(work.join("package").join(format!("{name}.crate")))
            .arg("-C")
            .arg(&unpacked),
        "unpacking the crate",
    );
    unpacked.join(name)
}

/// The README's project, built against `handover`; the path of its binary, or `None` where
/// crates.io cannot be reached for its dependencies (skipped loudly; never under `CI=true`).
fn build_readme_project(work: &Path, handover: &Path) -> Option<PathBuf> {
    let project = work.join("myapp");
    std::fs::create_dir_all(project.join("src")).expect("mkdir");
    let dependencies = readme_block("cargo new myapp", "toml").replace(
        "path = \"../handover\"",
        &format!("path = {:?}", handover.display().to_string()),
    );
    assert!(
        dependencies.contains(&handover.display().to_string()),
        "the README's dependency line is `path = \"../handover\"`: {dependencies}"
    );
    // `[workspace]`: the project is a workspace of its own, not part of this repository's.
    let manifest = format!(
        "[package]\nname = \"myapp\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[workspace]\n\n{dependencies}"
    );
    std::fs::write(project.join("Cargo.toml"), manifest).expect("write Cargo.toml");
    std::fs::write(
        project.join("src/main.rs"),
        readme_block("`src/main.rs`:", "rust,no_run"),
    )
    .expect("write main.rs");
    if !project.join("Cargo.lock").exists() {
        std::fs::copy(format!("{ROOT}/Cargo.lock"), project.join("Cargo.lock"))
            .expect("copy Cargo.lock");
    }
    let built = try_run(
        Command::new(env!("CARGO"))
            .current_dir(&project)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .args(["build", "--quiet"])
            .arg("--target-dir")
            .arg(work.join("target")),
        "cargo build of the README's project",
    );
    match built {
        Ok(()) => Some(work.join("target/debug/myapp")),
        Err(e)
            if std::env::var("CI").as_deref() != Ok("true")
                && [
                    "failed to download",
                    "resolve host",
                    "failed to query replaced source registry",
                    "failed to get `",
                    "--offline",
                ]
                .iter()
                .any(|w| e.contains(w)) =>
        {
            eprintln!("SKIPPED: the README's project needs crates.io, which is unreachable: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// "hello 127.0.0.1:PORT, from pid N" → N.
fn pid_of(reply: &Reply) -> u32 {
    assert_eq!(reply.status, 200, "{reply:?}");
    reply
        .body
        .trim_end()
        .rsplit_once("from pid ")
        .and_then(|(_, pid)| pid.parse().ok())
        .unwrap_or_else(|| panic!("not the README's hello: {reply:?}"))
}

#[test]
fn the_readme_axum_project_builds_from_the_package_and_restarts_under_socket_activation() {
    subreaper();
    let work = PathBuf::from(ROOT).join("target/newcomer");
    let handover = packaged_crate(&work);
    let Some(program) = build_readme_project(&work, &handover) else {
        return;
    };

    let notify = NotifySocket::new();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut activator = Spawn::new("systemd-socket-activate")
        .arg("-l")
        .arg(addr.to_string())
        .arg("--fdname=web")
        .arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", notify.path.display()))
        .arg(&program)
        .start();
    activator.lines.wait_for("Listening on", SOON);
    // The first connection starts the program (systemd-socket-activate execs it: same pid).
    let first = pid_of(&get(addr, "/").expect("a request through the activated socket"));
    assert_eq!(first, activator.pid);
    assert_eq!(notify.wait_line("READY=1", SOON).pid, first);
    assert_eq!(get(addr, "/healthz").expect("healthz").status, 200);

    // `kill -USR1`: a new process takes the socket and answers.
    let second = restart_once(&notify, first, 1);
    // The old process stops accepting a moment after the hand-off datagram (a connection it
    // accepted meanwhile is answered, with `Connection: close`, or passed on): once it has
    // exited, the new process answers alone.
    assert_eq!(activator.wait(SOON), Some(0), "the old process exits 0");
    assert_eq!(
        pid_of(&get(addr, "/").expect("a request after the restart")),
        second
    );

    // `kill`: graceful shutdown, exit 0.
    signal(second, Signal::TERM);
    assert_eq!(wait_exit(second, SOON), Some(0));
    assert_none_left([first, second]);
}

/// The package holds the library, the README and the pages it links to, the examples a user
/// runs and the systemd units the README says to copy; not the tests, the benches, CI, the
/// Kubernetes manifest or the examples only the tests and the bench use.
#[test]
fn the_package_holds_what_users_need_and_nothing_else() {
    let output = Command::new(env!("CARGO"))
        .current_dir(ROOT)
        .args(["package", "--list", "--allow-dirty", "--locked", "--quiet"])
        .output()
        .expect("cargo package --list");
    assert!(output.status.success(), "{output:?}");
    let listed = String::from_utf8(output.stdout).expect("utf-8");
    let files: Vec<&str> = listed.lines().collect();
    for wanted in [
        "Cargo.toml",
        "README.md",
        "src/lib.rs",
        "src/sys.rs",
        "docs/how-it-works.md",
        "examples/hello.rs",
        "examples/axum.rs",
        "examples/common/mod.rs",
        "systemd/handover-hello.service",
    ] {
        assert!(files.contains(&wanted), "{wanted} missing from {files:?}");
    }
    for file in &files {
        for unwanted in [
            "tests/",
            "benches/",
            ".ci/",
            "deploy/",
            "examples/faults.rs",
            "examples/plain.rs",
        ] {
            assert!(!file.starts_with(unwanted), "{file} is packaged");
        }
    }
    // Every page the README links to is in the package.
    let readme = std::fs::read_to_string(format!("{ROOT}/README.md")).expect("README");
    for page in readme.split("](docs/").skip(1) {
        let page = format!("docs/{}", &page[..page.find([')', '#']).expect("link end")]);
        assert!(
            files.contains(&page.as_str()),
            "{page} is linked but not packaged"
        );
    }
}
