//! The README and docs/ link to each other and into the source: every relative link (and its
//! `#anchor`) resolves. The check is `.ci/check-links.py` (python3), run here so that
//! `cargo test` catches a broken link too; without python3 it is skipped loudly, except under
//! `CI=true`, where it fails.

use std::process::Command;

#[test]
fn relative_links_in_readme_and_docs_resolve() {
    let root = env!("CARGO_MANIFEST_DIR");
    let script = format!("{root}/.ci/check-links.py");
    for args in [&["--self-test"][..], &[][..]] {
        let output = match Command::new("python3").arg(&script).args(args).output() {
            Ok(o) => o,
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("SKIPPED: python3 not found ({e}); the link check needs it");
                return;
            }
            Err(e) => panic!("python3 not found ({e}); CI must have it"),
        };
        assert!(
            output.status.success(),
            "{script} {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
