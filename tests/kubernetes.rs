//! `deploy/kubernetes/`: the manifest of the axum example. Its YAML parses and has what the
//! README relies on (probe paths and ports, a grace period that covers the lame duck and the
//! drain with a margin, the variables set, the server as PID 1 without a shell), the example
//! run with exactly that container's environment behaves as the manifest's comments say, and
//! the manifest passes a strict schema check (`kubernetes-validate`, from PyPI, with the
//! Kubernetes schemas bundled: no network needed; `.ci/run` installs it).
//!
//! The schema check runs when `kubernetes-validate` is found: at `$HANDOVER_KUBERNETES_VALIDATE`
//! (then it must work: `.ci/run` sets it), else on `PATH`; otherwise it prints `SKIPPED`.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use support::*;
use yaml_rust2::{Yaml, YamlLoader};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");
const MANIFEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/kubernetes/handover-axum.yaml"
);
const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
/// What the grace period must leave after the lame duck and the drain: the process's exit,
/// and a slow node.
const MARGIN: Duration = Duration::from_secs(5);
/// The Kubernetes versions the manifest is checked against: the oldest and the newest that
/// kubernetes-validate 1.37 bundles schemas for.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.25.0", "1.37.0"];

// ---------------------------------------------------------------------------------------------
// Reading the manifest.

/// Every document of every `*.yaml` file in `deploy/kubernetes/`, with its file's name.
fn documents() -> Vec<(PathBuf, Yaml)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(DIR)
        .unwrap_or_else(|e| panic!("{DIR}: {e}"))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML file in {DIR}");
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{file:?}: {e}"));
        let parsed = YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not valid YAML: {e}", file.display()));
        for doc in parsed {
            if !doc.is_null() {
                docs.push((file.clone(), doc));
            }
        }
    }
    docs
}

/// The one document of `kind` (and `apiVersion`) named `name`.
fn object<'a>(docs: &'a [(PathBuf, Yaml)], api: &str, kind: &str, name: &str) -> &'a Yaml {
    let found: Vec<&Yaml> = docs
        .iter()
        .map(|(_, d)| d)
        .filter(|d| {
            d["apiVersion"].as_str() == Some(api)
                && d["kind"].as_str() == Some(kind)
                && d["metadata"]["name"].as_str() == Some(name)
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {api} {kind} named {name} in {DIR}"
    );
    found[0]
}

/// The node at a dotted `path` (`spec.template.spec.containers.0.image`); panics, naming the
/// path, when it is missing.
fn at<'a>(node: &'a Yaml, path: &str) -> &'a Yaml {
    let mut here = node;
    for key in path.split('.') {
        here = match key.parse::<usize>() {
            Ok(i) => &here[i],
            Err(_) => &here[key],
        };
        assert!(!here.is_badvalue(), "the manifest has no {path}");
    }
    here
}

fn str_at<'a>(node: &'a Yaml, path: &str) -> &'a str {
    at(node, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string: {:?}", at(node, path)))
}

fn int_at(node: &Yaml, path: &str) -> i64 {
    at(node, path)
        .as_i64()
        .unwrap_or_else(|| panic!("{path} is not an integer: {:?}", at(node, path)))
}

/// A mapping of strings (labels, selectors) as pairs.
fn string_map(node: &Yaml, path: &str) -> Vec<(String, String)> {
    at(node, path)
        .as_hash()
        .unwrap_or_else(|| panic!("{path} is not a mapping"))
        .iter()
        .map(|(k, v)| {
            let k = k.as_str().unwrap_or_else(|| panic!("{path}: key {k:?}"));
            let v = v.as_str().unwrap_or_else(|| panic!("{path}.{k}: {v:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The container's environment, in order, as `(name, value)`.
fn env_of(container: &Yaml) -> Vec<(String, String)> {
    at(container, "env")
        .as_vec()
        .expect("env is a list")
        .iter()
        .map(|e| {
            (
                str_at(e, "name").to_string(),
                // Kubernetes wants strings here: a bare 5000 is a schema error.
                str_at(e, "value").to_string(),
            )
        })
        .collect()
}

fn env_ms(env: &[(String, String)], name: &str) -> Duration {
    let value = env
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("the container does not set {name}"));
    Duration::from_millis(
        value
            .parse()
            .unwrap_or_else(|e| panic!("{name}={value:?} is not a number of milliseconds: {e}")),
    )
}

/// The container port a probe or a Service names (`http`, or a number), as a number.
fn resolve_port(container: &Yaml, port: &Yaml) -> i64 {
    if let Some(n) = port.as_i64() {
        return n;
    }
    let name = port
        .as_str()
        .unwrap_or_else(|| panic!("a port is a name or a number: {port:?}"));
    at(container, "ports")
        .as_vec()
        .expect("ports is a list")
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .map(|p| int_at(p, "containerPort"))
        .unwrap_or_else(|| panic!("no container port named {name:?}"))
}

/// The one container of the Deployment.
fn the_container(deployment: &Yaml) -> &Yaml {
    let containers = at(deployment, "spec.template.spec.containers")
        .as_vec()
        .expect("containers is a list");
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

// ---------------------------------------------------------------------------------------------

/// What the README and the manifest's own comments promise, read from the manifest.
#[test]
fn the_manifest_has_what_the_docs_rely_on() {
    let docs = documents();
    let deployment = object(&docs, "apps/v1", "Deployment", "handover-axum");
    let service = object(&docs, "v1", "Service", "handover-axum");
    let pod = at(deployment, "spec.template");
    let container = the_container(deployment);

    // The selectors find the pods.
    let labels = string_map(pod, "metadata.labels");
    for (path, node) in [
        ("spec.selector.matchLabels", deployment),
        ("spec.selector", service),
    ] {
        for pair in string_map(node, path) {
            assert!(labels.contains(&pair), "{path} {pair:?} is not a pod label");
        }
    }

    // The server is PID 1, started without a shell or an init in between.
    let command = at(container, "command")
        .as_vec()
        .expect("command is a list");
    assert_eq!(
        command.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
        [Some("/usr/local/bin/handover-axum")],
        "the container's command"
    );
    // The web listener on the pod's addresses, on the port the probes and the Service use.
    let args: Vec<&str> = at(container, "args")
        .as_vec()
        .expect("args is a list")
        .iter()
        .map(|a| a.as_str().expect("an argument is a string"))
        .collect();
    assert_eq!(args.len(), 2, "WEB_ADDR ADMIN: {args:?}");
    let web: SocketAddr = args[0].parse().expect("WEB_ADDR is an address");
    assert!(web.ip().is_unspecified(), "probes reach the pod IP: {web}");
    let admin: SocketAddr = args[1].parse().expect("ADMIN is an address");
    assert!(
        admin.ip().is_loopback(),
        "admin stays inside the pod: {admin}"
    );
    let web_port = i64::from(web.port());

    let readiness = at(container, "readinessProbe");
    assert_eq!(str_at(readiness, "httpGet.path"), "/healthz");
    assert_eq!(
        resolve_port(container, at(readiness, "httpGet.port")),
        web_port
    );
    let liveness = at(container, "livenessProbe");
    assert_eq!(str_at(liveness, "httpGet.path"), "/livez");
    assert_eq!(
        resolve_port(container, at(liveness, "httpGet.port")),
        web_port
    );
    let service_ports = at(service, "spec.ports").as_vec().expect("ports");
    assert!(
        service_ports
            .iter()
            .any(|p| resolve_port(container, at(p, "targetPort")) == web_port),
        "the Service targets the web port {web_port}"
    );

    // The timing: the lame duck and the drain fit into the grace period, with a margin; the
    // lame duck lasts at least as long as the readiness probe takes to fail.
    let env = env_of(container);
    let delay = env_ms(&env, "HANDOVER_SHUTDOWN_DELAY_MS");
    let drain = env_ms(&env, "HANDOVER_DRAIN_TIMEOUT_MS");
    assert!(!delay.is_zero(), "a lame duck is set");
    let grace = Duration::from_secs(
        u64::try_from(int_at(pod, "spec.terminationGracePeriodSeconds")).expect("positive"),
    );
    assert!(
        grace >= delay + drain + MARGIN,
        "terminationGracePeriodSeconds {grace:?} < delay {delay:?} + drain {drain:?} + margin \
         {MARGIN:?}"
    );
    let fails_after = Duration::from_secs(
        u64::try_from(int_at(readiness, "periodSeconds") * int_at(readiness, "failureThreshold"))
            .expect("positive"),
    );
    assert!(
        delay >= fails_after,
        "the lame duck ({delay:?}) ends before the readiness probe can fail ({fails_after:?})"
    );
    // No preStop hook: the lame duck does its work (see the manifest's comment for one).
    assert!(
        container["lifecycle"]["preStop"].is_badvalue(),
        "a preStop hook: its time must be added to the grace period"
    );
    // Restarts off in the container, so a stray SIGUSR1 or POST /restart cannot end the pod.
    assert!(env.contains(&("HANDOVER_RESTARTS".into(), "0".into())));
    // The image is a placeholder, and says so.
    let image = str_at(container, "image");
    let text = std::fs::read_to_string(MANIFEST).expect("read the manifest");
    assert!(
        image.contains(".invalid/") && text.contains("PLACEHOLDER"),
        "{image}"
    );
    // A rolling update never goes below the replica count.
    assert_eq!(
        int_at(deployment, "spec.strategy.rollingUpdate.maxUnavailable"),
        0
    );
}

/// The README's excerpt of the manifest is the manifest: each of its lines is in the file, in
/// the same order.
#[test]
fn the_readme_shows_the_manifest_as_it_is() {
    let readme = std::fs::read_to_string(README).expect("read the README");
    let section = readme
        .split("## Behind a load balancer / in Kubernetes")
        .nth(1)
        .expect("the README has a section \"Behind a load balancer / in Kubernetes\"");
    let excerpt = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a yaml block in that section");
    let manifest = std::fs::read_to_string(MANIFEST).expect("read the manifest");
    let mut lines = manifest.lines().map(str::trim_end);
    for wanted in excerpt.lines().map(str::trim_end) {
        let trimmed = wanted.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue; // the README's own comments, and elisions ("# ...")
        }
        assert!(
            lines.any(|l| l == wanted),
            "README line {wanted:?} is not in {MANIFEST} (in this order)"
        );
    }
}

/// The example with exactly the container's environment (the addresses moved to free loopback
/// ports): ready and live, `POST /restart` refused (restarts are off), and on SIGTERM a lame
/// duck as long as the manifest says, with readiness failing and liveness not, then an exit 0
/// well within `terminationGracePeriodSeconds`.
#[test]
fn the_container_behaves_as_the_manifest_says() {
    let docs = documents();
    let deployment = object(&docs, "apps/v1", "Deployment", "handover-axum");
    let container = the_container(deployment);
    let env = env_of(container);
    let delay = env_ms(&env, "HANDOVER_SHUTDOWN_DELAY_MS");
    let grace = Duration::from_secs(
        u64::try_from(int_at(
            deployment,
            "spec.template.spec.terminationGracePeriodSeconds",
        ))
        .expect("positive"),
    );
    let readiness = str_at(container, "readinessProbe.httpGet.path");
    let liveness = str_at(container, "livenessProbe.httpGet.path");

    let notify = NotifySocket::new();
    let mut spawn = Spawn::new(example("axum"))
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("NOTIFY_SOCKET", &notify.path);
    for (k, v) in &env {
        spawn = spawn.env(k, v);
    }
    let mut server = spawn.start();
    let web = addr_in(&listen_line_of(&server.lines, "web"));
    let admin = addr_in(&listen_line_of(&server.lines, "admin"));
    notify.wait_line("READY=1", SOON);

    let ready = get(web, readiness).expect("readiness probe");
    assert_eq!((ready.status, ready.body.as_str()), (200, "ok (serving)\n"));
    assert_eq!(get(web, liveness).expect("liveness probe").status, 200);
    // No in-place restart in a container: refused, and the same process serves on.
    let restart = request(admin, "POST", "/restart").expect("POST /restart");
    assert_eq!(restart.status, 500, "{restart:?}");
    assert!(
        restart.body.contains("restarts are disabled"),
        "{}",
        restart.body
    );
    assert_eq!(get(web, "/").expect("still serving").pid, server.pid);

    // The kubelet's SIGTERM.
    let term = Instant::now();
    server.signal(Signal::TERM);
    notify.wait_line("STOPPING=1", SOON);
    server.lines.wait_for("lame duck: still accepting", SOON);
    let probe = get(web, readiness).expect("readiness during the lame duck");
    assert_eq!((probe.status, probe.body.as_str()), (503, "lame duck\n"));
    let probe = get(web, liveness).expect("liveness during the lame duck");
    assert_eq!(probe.status, 200);
    let hello = get(web, "/").expect("a new connection during the lame duck");
    assert_eq!((hello.status, hello.pid), (200, server.pid));
    assert!(hello.connection_close, "{hello:?}");
    assert!(
        !server
            .lines
            .all()
            .iter()
            .any(|l| l.contains("lame duck over")),
        "checked within the delay"
    );
    server
        .lines
        .wait_for("lame duck over: no longer accepting", grace);
    let lame_duck = term.elapsed();
    assert!(lame_duck >= delay, "{lame_duck:?} < {delay:?}");
    assert_eq!(server.wait(grace), Some(0));
    let took = term.elapsed();
    eprintln!(
        "SIGTERM -> exit: {took:?} (lame duck {delay:?}; terminationGracePeriodSeconds {grace:?})"
    );
    assert!(took + MARGIN <= grace, "{took:?}");
    assert_none_left([server.pid]);
}

// ---------------------------------------------------------------------------------------------
// Schema check.

/// `kubernetes-validate`, if this machine has it (see the file's documentation).
fn validator() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("HANDOVER_KUBERNETES_VALIDATE") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "HANDOVER_KUBERNETES_VALIDATE={} is not a file",
            path.display()
        );
        return Some(path);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("kubernetes-validate"))
            .find(|p| p.is_file())
    })
}

/// `kubernetes-validate --strict -k VERSION FILE`, without network where this process may make
/// a network namespace of its own (root: `unshare -n`), which proves the schemas are local.
fn validate(validator: &Path, version: &str, file: &Path) -> (bool, String) {
    let offline = Command::new("unshare")
        .args(["-n", "true"])
        .status()
        .is_ok_and(|s| s.success());
    let mut cmd = match offline {
        true => {
            let mut c = Command::new("unshare");
            c.arg("-n").arg(validator);
            c
        }
        false => Command::new(validator),
    };
    let out = cmd
        .args(["--strict", "-k", version])
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", validator.display()));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// Every file of `deploy/kubernetes/` passes the Kubernetes schemas in strict mode (no field
/// unknown to Kubernetes), for the oldest and newest versions checked; a misspelt field fails
/// (the check is really strict).
#[test]
fn the_manifest_passes_the_kubernetes_schema() {
    let Some(validator) = validator() else {
        eprintln!(
            "SKIPPED: kubernetes-validate not found (pip install kubernetes-validate==1.37.0, \
             or set HANDOVER_KUBERNETES_VALIDATE; .ci/run does)"
        );
        return;
    };
    let files: Vec<PathBuf> = {
        let mut seen: Vec<PathBuf> = documents().into_iter().map(|(f, _)| f).collect();
        seen.dedup();
        seen
    };
    for version in KUBERNETES_VERSIONS {
        for file in &files {
            let (ok, said) = validate(&validator, version, file);
            assert!(
                ok,
                "{} against Kubernetes {version}:\n{said}",
                file.display()
            );
            assert!(said.contains("passed"), "{said}");
            eprintln!("{}", said.trim());
        }
    }
    // The negative control: one misspelt field.
    let dir = scratch_dir("kubernetes-validate");
    let bad = dir.join("misspelt.yaml");
    let manifest = std::fs::read_to_string(MANIFEST).expect("read the manifest");
    assert!(manifest.contains("readinessProbe:"));
    std::fs::write(
        &bad,
        manifest.replacen("readinessProbe:", "readinesProbe:", 1),
    )
    .expect("write");
    let (ok, said) = validate(&validator, KUBERNETES_VERSIONS[1], &bad);
    assert!(
        !ok && said.contains("'readinesProbe' was unexpected"),
        "{said}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
