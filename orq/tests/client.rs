//! `orq`'s own client commands (get, apply, delete, run, describe, logs, version,
//! cluster-info, completion) run as the real binary against a real `orq server` process,
//! each checked by what it prints and its exit status.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Server;

/// What one `orq` run did.
struct Run {
    success: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// An `orq` with no kubeconfig to find but the one passed: HOME and ORQ_DATA_DIR point at
/// empty directories, KUBECONFIG is unset.
fn orq_command(home: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_orq"));
    command
        .env("HOME", home)
        .env("ORQ_DATA_DIR", home.join("no-server"))
        .env_remove("KUBECONFIG")
        .env_remove("RUST_LOG");
    command
}

fn orq(home: &Path, kubeconfig: Option<&Path>, args: &[&str], stdin: Option<&str>) -> Run {
    let mut command = orq_command(home);
    if let Some(kubeconfig) = kubeconfig {
        command.arg_kubeconfig(kubeconfig, args);
    } else {
        command.args(args);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    Run {
        success: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

trait KubeconfigArg {
    fn arg_kubeconfig(&mut self, kubeconfig: &Path, args: &[&str]) -> &mut Self;
}

impl KubeconfigArg for Command {
    /// The subcommand, then `--kubeconfig`, then the rest (before any `--`).
    fn arg_kubeconfig(&mut self, kubeconfig: &Path, args: &[&str]) -> &mut Self {
        let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        self.args(&args[..split])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(&args[split..])
    }
}

/// Runs `orq`, expecting success; returns stdout.
fn ok(home: &Path, kubeconfig: &Path, args: &[&str]) -> String {
    let run = orq(home, Some(kubeconfig), args, None);
    assert!(
        run.success,
        "orq {args:?} failed:\n{}\n{}",
        run.stdout, run.stderr
    );
    run.stdout
}

/// Runs `orq`, expecting it to fail with exit status 1; returns stderr.
fn fails(home: &Path, kubeconfig: Option<&Path>, args: &[&str]) -> String {
    let run = orq(home, kubeconfig, args, None);
    assert_eq!(
        run.code,
        Some(1),
        "orq {args:?} should fail:\n{}\n{}",
        run.stdout,
        run.stderr
    );
    assert!(run.stderr.starts_with("error: "), "{}", run.stderr);
    run.stderr
}

const APP: &str = "# a ConfigMap and a Deployment
apiVersion: v1
kind: ConfigMap
metadata:
  name: demo
  labels: {app: demo}
data:
  a: \"1\"
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: \"nginx:1.27\"}]
";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The rows of a table whose first cell is `name`, split into cells.
fn row<'a>(table: &'a str, name: &str) -> Option<Vec<&'a str>> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&name))
}

#[test]
fn without_a_server() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();

    // Nothing to connect to: every client command says where it looked and what to do.
    let stderr = fails(home, None, &["get", "pods"]);
    assert!(
        stderr.contains("no kubeconfig found")
            && stderr.contains("start a server with `orq server` or pass --kubeconfig"),
        "{stderr}"
    );
    // version prints the client's version anyway, then fails.
    let run = orq(home, None, &["version"], None);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stdout
            .starts_with(concat!("Client Version: v", env!("CARGO_PKG_VERSION"))),
        "{}",
        run.stdout
    );
    assert!(run.stderr.contains("no kubeconfig found"), "{}", run.stderr);
    let run = orq(home, None, &["version", "--client", "-o", "json"], None);
    assert!(run.success, "{}", run.stderr);
    let version: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert!(version["clientVersion"]["gitVersion"].is_string());
    assert!(version.get("serverVersion").is_none());

    // A kubeconfig naming a port nobody listens on: the error names the URL.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // closed again at once
    let kubeconfig = write(
        home,
        "unreachable.yaml",
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \
             http://127.0.0.1:{port}}}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: \
             c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n"
        ),
    );
    let stderr = fails(home, Some(&kubeconfig), &["get", "pods"]);
    assert!(
        stderr.contains(&format!(
            "cannot reach the API server at http://127.0.0.1:{port}"
        )),
        "{stderr}"
    );
    // KUBECONFIG is used when there is no flag.
    let run = orq_command(home)
        .env("KUBECONFIG", &kubeconfig)
        .args(["cluster-info"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("cannot reach the API server"));

    // A malformed manifest is reported with its file and line, before anything is sent.
    let bad = write(
        home,
        "bad.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: v1\nkind: \
         ConfigMap\nmetadata:\n  name: b\n labels: x\n",
    );
    let stderr = fails(
        home,
        Some(&kubeconfig),
        &["apply", "-f", bad.to_str().unwrap()],
    );
    assert!(
        stderr.contains(&format!("{}:9: invalid manifest", bad.display())),
        "{stderr}"
    );
    let stderr = fails(
        home,
        Some(&kubeconfig),
        &[
            "apply",
            "-f",
            write(home, "nokind.yaml", "apiVersion: v1\nmetadata: {name: a}\n")
                .to_str()
                .unwrap(),
        ],
    );
    assert!(
        stderr.contains("nokind.yaml:1: invalid manifest: the object has no `kind`"),
        "{stderr}"
    );

    // Completion scripts, and help on every command.
    let script = orq(home, None, &["completion", "bash"], None);
    assert!(script.success);
    assert!(
        script.stdout.contains("_orq()") && script.stdout.contains("complete -F _orq"),
        "{}",
        &script.stdout[..script.stdout.len().min(500)]
    );
    for shell in ["zsh", "fish"] {
        assert!(
            orq(home, None, &["completion", shell], None)
                .stdout
                .contains("orq")
        );
    }
    for command in [
        "get",
        "apply",
        "delete",
        "run",
        "logs",
        "describe",
        "version",
        "cluster-info",
    ] {
        let help = orq(home, None, &[command, "--help"], None);
        assert!(
            help.success && help.stdout.contains("--kubeconfig"),
            "{command}: {}",
            help.stdout
        );
    }
}

#[test]
fn against_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    // No scheduler: Pods stay Pending, because this server's node is the machine itself,
    // whose network the tests leave alone.
    let server = Server::start(dir.path(), &["--controllers=*,-scheduler"]);
    server.wait_ready();
    let kc = server.kubeconfig();
    let k = |args: &[&str]| ok(home, &kc, args);

    // version and cluster-info.
    let version = k(&["version"]);
    assert!(
        version.contains("Client Version: v")
            && version.contains("Server Version: v1.36.0+orquestra"),
        "{version}"
    );
    let version: serde_json::Value = serde_json::from_str(&k(&["version", "-o", "json"])).unwrap();
    assert!(
        version["serverVersion"]["gitVersion"]
            .as_str()
            .unwrap()
            .starts_with("v1.36")
    );
    let info = k(&["cluster-info"]);
    assert!(
        info.contains(&format!(
            "Kubernetes control plane is running at https://{}",
            server.addr
        )),
        "{info}"
    );

    // apply: a multi-document file, then again (nothing changes), then a change.
    let app = write(home, "app.yaml", APP);
    let app = app.to_str().unwrap();
    assert_eq!(
        k(&["apply", "-f", app]),
        "configmap/demo created\ndeployment.apps/web created\n"
    );
    let again = k(&["apply", "-f", app]);
    assert!(
        again.starts_with("configmap/demo unchanged\ndeployment.apps/web "),
        "{again}"
    );
    let changed = write(home, "changed.yaml", &APP.replace("a: \"1\"", "a: \"2\""));
    let changed = changed.to_str().unwrap();
    assert!(k(&["apply", "-f", changed]).starts_with("configmap/demo configured\n"));
    // From stdin too.
    let run = orq(
        home,
        Some(&kc),
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: piped}\n"),
    );
    assert_eq!(run.stdout, "configmap/piped created\n", "{}", run.stderr);

    // Another field manager changing an applied field conflicts, until forced.
    let other = write(home, "other.yaml", &APP.replace("a: \"1\"", "a: \"3\""));
    let other = other.to_str().unwrap();
    let stderr = fails(
        home,
        Some(&kc),
        &["apply", "-f", other, "--field-manager", "other"],
    );
    assert!(
        stderr.contains("conflict") && stderr.contains("--force-conflicts"),
        "{stderr}"
    );
    k(&[
        "apply",
        "-f",
        other,
        "--field-manager",
        "other",
        "--force-conflicts",
    ]);
    let json: serde_json::Value =
        serde_json::from_str(&k(&["get", "configmap", "demo", "-o", "json"])).unwrap();
    assert_eq!(json["data"]["a"], "3");
    assert_eq!(json["metadata"]["labels"]["app"], "demo");
    assert_eq!(json["kind"], "ConfigMap");

    // A kind the server doesn't serve.
    let unknown = write(
        home,
        "unknown.yaml",
        "apiVersion: example.com/v1\nkind: Gadget\nmetadata: {name: g}\n",
    );
    let stderr = fails(home, Some(&kc), &["apply", "-f", unknown.to_str().unwrap()]);
    assert!(
        stderr.contains("unknown.yaml:1: no matches for kind \"Gadget\""),
        "{stderr}"
    );

    // get: server-side tables, by every name form.
    let table = k(&["get", "configmaps"]);
    assert!(table.starts_with("NAME"), "{table}");
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "DATA", "AGE"], "{table}");
    assert_eq!(row(&table, "demo").unwrap()[1], "1", "{table}");
    for kind in ["cm", "configmap", "ConfigMap", "configmaps", "cm/demo"] {
        assert!(row(&k(&["get", kind]), "demo").is_some(), "{kind}");
    }
    let deployments = k(&["get", "deploy"]);
    assert!(
        deployments.starts_with("NAME")
            && deployments.contains("READY")
            && !deployments.contains("IMAGES"),
        "{deployments}"
    );
    assert!(row(&deployments, "web").is_some(), "{deployments}");
    let wide = k(&["get", "deployments.apps", "web", "-o", "wide"]);
    assert!(
        wide.contains("IMAGES") && wide.contains("nginx:1.27"),
        "{wide}"
    );
    let all = k(&["get", "cm", "-A"]);
    assert!(all.starts_with("NAMESPACE"), "{all}");
    assert_eq!(row(&all, "default").map(|r| r.len()), Some(4), "{all}");
    assert!(
        all.lines()
            .any(|l| l.split_whitespace().take(3).eq(["default", "demo", "1"])),
        "{all}"
    );
    let namespaces = k(&["get", "ns"]);
    assert!(
        row(&namespaces, "kube-system").is_some_and(|r| r[1] == "Active"),
        "{namespaces}"
    );
    let labelled = k(&["get", "cm", "-l", "app=demo"]);
    assert!(
        row(&labelled, "demo").is_some() && row(&labelled, "piped").is_none(),
        "{labelled}"
    );

    // Other formats.
    let yaml: serde_json::Value =
        serde_yaml::from_str(&k(&["get", "cm", "demo", "-o", "yaml"])).unwrap();
    assert_eq!(yaml["metadata"]["name"], "demo");
    assert_eq!(yaml["apiVersion"], "v1");
    let list: serde_json::Value = serde_json::from_str(&k(&["get", "cm", "-o", "json"])).unwrap();
    assert_eq!(list["kind"], "List");
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["kind"] == "ConfigMap")
    );
    assert_eq!(
        k(&["get", "deploy", "web", "-o", "name"]),
        "deployment.apps/web\n"
    );

    // Errors: an unknown kind, a missing object.
    let run = orq(home, Some(&kc), &["get", "foo"], None);
    assert_eq!(run.code, Some(1));
    assert_eq!(
        run.stderr.trim(),
        "error: the server doesn't have a resource type \"foo\""
    );
    let stderr = fails(home, Some(&kc), &["get", "cm", "missing"]);
    assert!(
        stderr.contains("NotFound") && stderr.contains("missing"),
        "{stderr}"
    );
    let run = orq(
        home,
        Some(&kc),
        &["get", "secrets", "-n", "kube-public"],
        None,
    );
    assert!(run.success && run.stdout.is_empty(), "{}", run.stdout);
    assert_eq!(
        run.stderr.trim(),
        "No resources found in kube-public namespace."
    );

    // get -w prints the table, then each change.
    let mut watch = orq_command(home)
        .arg_kubeconfig(&kc, &["get", "cm", "-w"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let recv = || lines.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(recv().starts_with("NAME"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let run = orq(
        home,
        Some(&kc),
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: later}\ndata: {x: y}\n"),
    );
    assert!(run.success, "{}", run.stderr);
    loop {
        let line = recv();
        if line.starts_with("later") {
            break;
        }
        assert!(Instant::now() < deadline, "no row for the new ConfigMap");
    }
    let _ = watch.kill(); // by PID: our own child
    let _ = watch.wait();

    // run: a Pod with the image, port, arguments and run label.
    assert_eq!(
        k(&[
            "run",
            "box",
            "--image",
            "busybox:1.36",
            "--port",
            "8080",
            "--env",
            "A=b",
            "--",
            "sleep",
            "3600"
        ]),
        "pod/box created\n"
    );
    let pod: serde_json::Value =
        serde_json::from_str(&k(&["get", "po", "box", "-o", "json"])).unwrap();
    let container = &pod["spec"]["containers"][0];
    assert_eq!(container["image"], "busybox:1.36");
    assert_eq!(container["name"], "box");
    assert_eq!(container["args"], serde_json::json!(["sleep", "3600"]));
    assert_eq!(container["ports"][0]["containerPort"], 8080);
    assert_eq!(pod["metadata"]["labels"]["run"], "box");
    let stderr = fails(home, Some(&kc), &["run", "box", "--image", "busybox:1.36"]);
    assert!(
        stderr.contains("AlreadyExists") || stderr.contains("already exists"),
        "{stderr}"
    );
    // Without a scheduler the Pod never runs: --wait says why it gave up.
    let stderr = fails(
        home,
        Some(&kc),
        &[
            "run",
            "waits",
            "--image",
            "busybox:1.36",
            "--wait",
            "--timeout",
            "2s",
        ],
    );
    assert!(
        stderr.contains("timed out after 2s waiting for pod/waits to run: Pending, not scheduled"),
        "{stderr}"
    );
    // Nor is there a log to read.
    assert!(!orq(home, Some(&kc), &["logs", "box"], None).success);

    // describe: labels, containers, and the Events about the object.
    let uid = pod["metadata"]["uid"].as_str().unwrap();
    let event = format!(
        "apiVersion: v1\nkind: Event\nmetadata: {{name: box.1}}\ninvolvedObject: {{kind: Pod, \
         name: box, namespace: default, uid: {uid}}}\nreason: Testing\nmessage: hello from \
         the test\ntype: Normal\nsource: {{component: client-test}}\n"
    );
    let run = orq(home, Some(&kc), &["apply", "-f", "-"], Some(&event));
    assert!(run.success, "{}", run.stderr);
    let described = k(&["describe", "pod", "box"]);
    for expected in [
        "Name:         box",
        "Namespace:    default",
        "run=box",
        "Image:",
        "busybox:1.36",
        "Port:",
        "8080/TCP",
        "Status:       Pending",
        "Events:",
        "Testing",
        "hello from the test",
        "client-test",
    ] {
        assert!(described.contains(expected), "{expected} in:\n{described}");
    }
    let described = k(&["describe", "cm/demo"]);
    assert!(
        described.contains("Labels:       app=demo")
            && described.contains("Data:")
            && described.contains("Events:       <none>"),
        "{described}"
    );
    let described = k(&["describe", "deploy", "web"]);
    assert!(
        described.contains("Replicas:") || described.contains("Selector:"),
        "{described}"
    );

    // delete: by name (waiting until gone), by manifest, and a finalizer that holds it.
    assert_eq!(
        k(&["delete", "cm", "demo", "piped"]),
        "configmap \"demo\" deleted\nconfigmap \"piped\" deleted\n"
    );
    let stderr = fails(home, Some(&kc), &["get", "cm", "demo"]);
    assert!(stderr.contains("NotFound"), "{stderr}");
    let stderr = fails(home, Some(&kc), &["delete", "cm", "demo"]);
    assert!(stderr.contains("NotFound"), "{stderr}");
    k(&["delete", "cm", "demo", "--ignore-not-found"]);
    let deleted = k(&["delete", "-f", app, "--ignore-not-found"]);
    assert_eq!(deleted, "deployment.apps \"web\" deleted\n");
    let held = write(
        home,
        "held.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: held\n  finalizers: [example.com/hold]\n",
    );
    let held = held.to_str().unwrap();
    k(&["apply", "-f", held]);
    let stderr = fails(home, Some(&kc), &["delete", "-f", held, "--timeout", "1s"]);
    assert!(
        stderr.contains("timed out after 1s waiting for configmap \"held\" to be deleted (finalizers left: example.com/hold)"),
        "{stderr}"
    );
    // Applying it without the finalizer releases it (the field was orq's).
    let released = write(
        home,
        "released.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: held\n",
    );
    k(&["apply", "-f", released.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while orq(home, Some(&kc), &["get", "cm", "held"], None).success {
        assert!(Instant::now() < deadline, "held is gone once released");
        std::thread::sleep(Duration::from_millis(100));
    }
    k(&["delete", "pod", "box", "waits", "--wait=false"]);
    assert!(server.terminate().success());
}
