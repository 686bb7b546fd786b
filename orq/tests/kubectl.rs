//! The real kubectl (1.27, the oldest supported, and 1.33, the newest) against a real
//! `orq server` process: the commands that work today, each checked by what kubectl prints.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Server;

const KUBECTL_1_27: &str = "/usr/lib/google-cloud-sdk/bin/kubectl.1.27";
const KUBECTL_1_33: &str = "/usr/lib/google-cloud-sdk/bin/kubectl.1.33";

/// Runs kubectl; returns (success, stdout, stderr).
fn kubectl(
    bin: &str,
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> (bool, String, String) {
    let mut child = Command::new(bin)
        .env("KUBECONFIG", kubeconfig)
        .env("HOME", kubeconfig.parent().unwrap()) // its discovery cache goes here
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{bin}: {e}"));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(bin: &str, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let (success, stdout, stderr) = kubectl(bin, kubeconfig, args, stdin);
    assert!(success, "kubectl {args:?} failed:\n{stdout}\n{stderr}");
    stdout
}

const CONFIGMAP: &str = "apiVersion: v1
kind: ConfigMap
metadata:
  name: demo
  labels: {app: demo}
data:
  a: \"1\"
";

const CRD: &str = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wg]}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            description: What the widget should be.
            properties:
              size: {type: string, description: How big the widget is.}
    additionalPrinterColumns:
    - {name: Size, type: string, jsonPath: .spec.size}
";

const WIDGET: &str = "apiVersion: example.com/v1
kind: Widget
metadata: {name: w1}
spec: {size: big}
";

const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: \"nginx:1.27\"}]
";

fn exercise(bin: &str) {
    let dir = tempfile::tempdir().unwrap();
    // No scheduler: the Deployments below stay Pending, because this server's node is the
    // machine itself, whose network the tests leave alone (a pod would get a bridge there).
    let server = Server::start(dir.path(), &["--controllers=*,-scheduler"]);
    server.wait_ready();
    let kc = server.kubeconfig();
    let k = |args: &[&str]| ok(bin, &kc, args, None);

    let version: serde_json::Value = serde_json::from_str(&k(&["version", "-o", "json"])).unwrap();
    let server_version = version["serverVersion"]["gitVersion"].as_str().unwrap();
    assert!(server_version.starts_with("v1.36.0+orquestra"), "{version}");
    let info = k(&["cluster-info"]); // 1.27 colours it
    assert!(
        info.contains("is running at") && info.contains("https://127.0.0.1:"),
        "{info}"
    );
    // kubectl ≥ 1.30 discovers through one aggregated document, which it must be given.
    let (success, resources, log) = kubectl(bin, &kc, &["api-resources", "-v=8"], None);
    assert!(success, "{log}");
    if bin != KUBECTL_1_27 {
        assert!(
            log.contains(
                "Content-Type: application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
            ),
            "aggregated discovery: {log}"
        );
    }
    for line in [
        "deployments",
        "deploy",
        "configmaps",
        "cm",
        "customresourcedefinitions",
    ] {
        assert!(resources.contains(line), "{line} in {resources}");
    }
    let namespaces = k(&["get", "ns"]);
    assert!(
        namespaces.starts_with("NAME") && namespaces.contains("STATUS"),
        "a server-side table: {namespaces}"
    );
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(
            namespaces
                .lines()
                .any(|l| l.starts_with(ns) && l.contains("Active")),
            "{namespaces}"
        );
    }
    // Paging: kubectl follows `continue` one item at a time and gets every namespace; a
    // limited page says how many are left, as kube-apiserver's does.
    let paged = k(&["get", "ns", "--chunk-size=1", "-o", "name"]);
    let count = paged.lines().count();
    assert!(
        count >= 4 && paged.contains("namespace/kube-node-lease"),
        "{paged}"
    );
    let page: serde_json::Value =
        serde_json::from_str(&k(&["get", "--raw", "/api/v1/namespaces?limit=1"])).unwrap();
    assert_eq!(page["metadata"]["remainingItemCount"], count - 1, "{page}");
    assert!(page["metadata"]["continue"].is_string(), "{page}");

    // The server's local node agent registers this host as a Ready node.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let nodes = k(&["get", "nodes"]);
        if nodes.starts_with("NAME") && nodes.lines().skip(1).any(|l| l.contains(" Ready ")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a Ready node: {nodes}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // create -f, then apply twice: the second apply changes nothing.
    assert!(
        ok(bin, &kc, &["create", "-f", "-"], Some(CONFIGMAP)).contains("configmap/demo created")
    );
    let (_, _, stderr) = kubectl(bin, &kc, &["create", "-f", "-"], Some(CONFIGMAP));
    assert!(
        stderr.contains("AlreadyExists") || stderr.contains("already exists"),
        "{stderr}"
    );
    let applied = CONFIGMAP.replace("a: \"1\"", "a: \"2\"");
    assert!(
        ok(bin, &kc, &["apply", "-f", "-"], Some(&applied)).contains("configmap/demo configured")
    );
    assert!(
        ok(bin, &kc, &["apply", "-f", "-"], Some(&applied)).contains("configmap/demo unchanged")
    );

    // Server-side apply: creates, then applies again.
    let ssa = CONFIGMAP.replace("name: demo", "name: ssa");
    assert!(
        ok(bin, &kc, &["apply", "--server-side", "-f", "-"], Some(&ssa))
            .contains("configmap/ssa serverside-applied")
    );
    let ssa2 = ssa.replace("a: \"1\"", "a: \"9\"");
    assert!(
        ok(
            bin,
            &kc,
            &["apply", "--server-side", "-f", "-"],
            Some(&ssa2)
        )
        .contains("serverside-applied")
    );
    assert_eq!(k(&["get", "cm", "ssa", "-o", "jsonpath={.data.a}"]), "9");
    // Another manager changes the field; applying over it is a conflict kubectl explains,
    // and --force-conflicts takes it over.
    k(&[
        "patch",
        "cm",
        "ssa",
        "--type=merge",
        "-p",
        r#"{"data":{"a":"5"}}"#,
    ]);
    let ssa3 = ssa.replace("a: \"1\"", "a: \"7\"");
    let (success, _, stderr) = kubectl(
        bin,
        &kc,
        &["apply", "--server-side", "-f", "-"],
        Some(&ssa3),
    );
    assert!(!success);
    assert!(
        stderr.contains("conflict") && stderr.contains(".data.a"),
        "{stderr}"
    );
    assert_eq!(k(&["get", "cm", "ssa", "-o", "jsonpath={.data.a}"]), "5");
    ok(
        bin,
        &kc,
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        Some(&ssa3),
    );
    assert_eq!(k(&["get", "cm", "ssa", "-o", "jsonpath={.data.a}"]), "7");

    // Output formats.
    let yaml = k(&["get", "cm", "demo", "-o", "yaml"]);
    assert!(
        yaml.contains("a: \"2\"") && yaml.contains("resourceVersion:"),
        "{yaml}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&k(&["get", "cm", "demo", "-o", "json"])).unwrap();
    assert_eq!(json["metadata"]["labels"]["app"], "demo");
    assert_eq!(
        k(&["get", "cm", "demo", "-o", "name"]).trim(),
        "configmap/demo"
    );
    let wide = k(&["get", "cm", "-o", "wide"]);
    assert!(wide.contains("DATA") && wide.contains("demo"), "{wide}");

    // A watch sees a change made while it runs.
    let mut watch = Command::new(bin)
        .env("KUBECONFIG", &kc)
        .env("HOME", dir.path())
        .args([
            "get",
            "cm",
            "demo",
            "-w",
            "-v=6",
            "-o",
            "jsonpath={.metadata.labels.tier}{\"\\n\"}",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });

    // kubectl prints the object (no tier yet), then starts its watch. A change made in
    // between shows up only as the watch's initial state, which kubectl skips as already
    // printed — kubectl's own race, not the server's — so keep changing until one arrives.
    let first = lines
        .recv_timeout(Duration::from_secs(20))
        .expect("kubectl get -w printed the object");
    assert_eq!(first.trim(), "");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut attempt = 0;
    'seen: loop {
        attempt += 1;
        let tier = format!("tier=web{attempt}");
        assert!(k(&["label", "--overwrite", "cm", "demo", &tier]).contains("labeled"));
        while let Ok(line) = lines.recv_timeout(Duration::from_secs(1)) {
            if line.trim().starts_with("web") {
                break 'seen;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no change seen by kubectl get -w"
        );
    }
    let _ = watch.kill(); // by PID: our own child
    let _ = watch.wait();

    // 1.27 prints "annotate", later versions "annotated".
    assert!(k(&["annotate", "cm", "demo", "note=hello"]).contains("configmap/demo annotate"));
    k(&[
        "patch",
        "cm",
        "demo",
        "--type=merge",
        "-p",
        r#"{"data":{"b":"2"}}"#,
    ]);
    k(&[
        "patch",
        "cm",
        "demo",
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/data/c","value":"3"}]"#,
    ]);
    k(&["patch", "cm", "demo", "-p", r#"{"data":{"d":"4"}}"#]); // strategic, kubectl's default
    let data = k(&["get", "cm", "demo", "-o", "jsonpath={.data}"]);
    let data: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(
        data,
        serde_json::json!({"a": "2", "b": "2", "c": "3", "d": "4"})
    );

    // An invalid object gets kubectl's usual message, and nothing is stored.
    let (success, _, stderr) = kubectl(
        bin,
        &kc,
        &["create", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: Not_Valid}\n"),
    );
    assert!(!success);
    assert!(
        stderr.contains("The ConfigMap \"Not_Valid\" is invalid"),
        "{stderr}"
    );

    // A schema violation too, with every cause listed.
    let (success, _, stderr) = kubectl(
        bin,
        &kc,
        &["apply", "-f", "-"],
        Some(
            &DEPLOYMENT
                .replace("metadata: {name: web}", "metadata: {name: typo}")
                .replace("  selector:", "  replicas: many\n  selector:"),
        ),
    );
    assert!(!success);
    assert!(
        stderr.contains("The Deployment \"typo\" is invalid")
            && stderr.contains("spec.replicas in body must be of type integer"),
        "{stderr}"
    );
    // Unknown fields: kubectl's default --validate=strict sends fieldValidation=Strict.
    let (success, _, stderr) = kubectl(
        bin,
        &kc,
        &["create", "-f", "-"],
        Some(
            &DEPLOYMENT
                .replace("metadata: {name: web}", "metadata: {name: typo}")
                .replace("  selector:", "  replica: 3\n  selector:"),
        ),
    );
    assert!(!success);
    assert!(
        stderr.contains("strict decoding error: unknown field \"spec.replica\""),
        "{stderr}"
    );
    // With --validate=warn the object is stored without the field, and kubectl says so.
    let (success, _, stderr) = kubectl(
        bin,
        &kc,
        &["create", "--validate=warn", "-f", "-"],
        Some(
            &DEPLOYMENT
                .replace("metadata: {name: web}", "metadata: {name: typo}")
                .replace("  selector:", "  replica: 3\n  selector:"),
        ),
    );
    assert!(success, "{stderr}");
    assert!(
        stderr.contains("unknown field \"spec.replica\""),
        "{stderr}"
    );
    k(&["delete", "deployment", "typo"]);
    // explain reads the schemas generated from k8s-openapi, descriptions included.
    let explained = k(&["explain", "deployment.spec.replicas"]);
    assert!(
        explained.contains("replicas <integer>") && explained.contains("Number of desired pods"),
        "{explained}"
    );

    // A CRD, then its custom resources: created, listed, deleted with it.
    assert!(ok(bin, &kc, &["apply", "-f", "-"], Some(CRD)).contains("created"));
    k(&[
        "wait",
        "--for=condition=Established",
        "crd/widgets.example.com",
        "--timeout=20s",
    ]);
    assert!(k(&["api-resources", "--api-group=example.com"]).contains("widgets"));
    // explain reads a CRD's published schema as soon as it is established.
    let explained = k(&["explain", "widgets.spec.size"]);
    assert!(
        explained.contains("size <string>") && explained.contains("How big the widget is."),
        "{explained}"
    );
    assert!(
        ok(bin, &kc, &["apply", "-f", "-"], Some(WIDGET)).contains("widget.example.com/w1 created")
    );
    let widget = WIDGET.replace("size: big", "size: small");
    assert!(ok(bin, &kc, &["apply", "-f", "-"], Some(&widget)).contains("configured"));
    let table = k(&["get", "wg"]);
    assert!(
        table.starts_with("NAME") && table.contains("SIZE"),
        "printer columns: {table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["w1", "small"]),
        "{table}"
    );
    assert_eq!(
        k(&["get", "widget", "w1", "-o", "jsonpath={.spec.size}"]),
        "small"
    );
    assert!(k(&["delete", "crd", "widgets.example.com"]).contains("deleted"));
    let (success, _, _) = kubectl(bin, &kc, &["get", "widgets.example.com"], None);
    assert!(!success, "widgets are gone with their CRD");

    // A Deployment, scaled through its scale subresource, listed with its wide columns.
    assert!(
        ok(bin, &kc, &["apply", "-f", "-"], Some(DEPLOYMENT))
            .contains("deployment.apps/web created")
    );
    assert!(k(&["scale", "deployment", "web", "--replicas=3"]).contains("scaled"));
    assert_eq!(
        k(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"]),
        "3"
    );
    let wide = k(&["get", "deploy", "-o", "wide"]);
    assert!(
        wide.contains("IMAGES") && wide.contains("nginx:1.27"),
        "{wide}"
    );

    // Typed `create` commands (kubectl 1.32+ send these as protobuf) and expose.
    assert!(k(&["create", "namespace", "team-a"]).contains("namespace/team-a created"));
    assert!(
        k(&[
            "create",
            "configmap",
            "typed",
            "-n",
            "team-a",
            "--from-literal=k=v"
        ])
        .contains("created")
    );
    assert_eq!(
        k(&[
            "get",
            "cm",
            "typed",
            "-n",
            "team-a",
            "-o",
            "jsonpath={.data.k}"
        ]),
        "v"
    );
    assert!(
        k(&[
            "create",
            "secret",
            "generic",
            "pw",
            "--from-literal=password=hunter2"
        ])
        .contains("created")
    );
    assert_eq!(
        k(&["get", "secret", "pw", "-o", "jsonpath={.data.password}"]),
        "aHVudGVyMg=="
    );
    assert!(
        k(&[
            "create",
            "deployment",
            "api",
            "--image=nginx:1.27",
            "--replicas=2"
        ])
        .contains("created")
    );
    assert_eq!(
        k(&["get", "deploy", "api", "-o", "jsonpath={.spec.replicas}"]),
        "2"
    );
    assert!(
        k(&[
            "expose",
            "deployment",
            "api",
            "--port=80",
            "--type=NodePort"
        ])
        .contains("exposed")
    );
    let svc = k(&["get", "svc", "api"]);
    assert!(
        svc.contains("NodePort") && svc.contains("10.43.") && svc.contains("80:3"),
        "{svc}"
    );

    // Cascading deletion: the garbage collector deletes the dependent; in the foreground
    // kubectl waits for the owner, which goes only after it.
    k(&["create", "configmap", "owner", "--from-literal=a=1"]);
    let uid = k(&["get", "cm", "owner", "-o", "jsonpath={.metadata.uid}"]);
    let dependent = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: dependent\n  ownerReferences:\n  \
         - {{apiVersion: v1, kind: ConfigMap, name: owner, uid: {uid}, blockOwnerDeletion: true}}\n"
    );
    ok(bin, &kc, &["apply", "-f", "-"], Some(&dependent));
    assert!(k(&["delete", "cm", "owner", "--cascade=foreground"]).contains("deleted"));
    let (success, _, stderr) = kubectl(bin, &kc, &["get", "cm", "dependent"], None);
    assert!(!success && stderr.contains("NotFound"), "{stderr}");

    // Deleting a namespace: Terminating while content is left (here held by a finalizer),
    // new content refused, then emptied and removed.
    k(&["create", "namespace", "doomed"]);
    let held = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: held\n  namespace: doomed\n  \
                finalizers: [example.com/hold]\n";
    ok(bin, &kc, &["apply", "-f", "-"], Some(held));
    k(&["create", "configmap", "plain", "-n", "doomed"]);
    k(&["delete", "namespace", "doomed", "--wait=false"]);
    assert!(k(&["get", "ns", "doomed"]).contains("Terminating"));
    let (success, _, stderr) = kubectl(
        bin,
        &kc,
        &["create", "configmap", "late", "-n", "doomed"],
        None,
    );
    assert!(
        !success
            && stderr.contains(
                "configmaps \"late\" is forbidden: unable to create new content in namespace \
                 doomed because it is being terminated"
            ),
        "{stderr}"
    );
    k(&[
        "patch",
        "cm",
        "held",
        "-n",
        "doomed",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    k(&["wait", "--for=delete", "namespace/doomed", "--timeout=60s"]);

    // auth can-i asks a SelfSubjectAccessReview: yes for the admin, no for a service
    // account nothing was granted to (whose token TokenRequest issues).
    assert_eq!(k(&["auth", "can-i", "create", "pods"]).trim(), "yes");
    assert_eq!(
        k(&["auth", "can-i", "*", "*", "--all-namespaces"]).trim(),
        "yes"
    );
    k(&["create", "serviceaccount", "nobody"]);
    let token = k(&["create", "token", "nobody"]);
    let (allowed, stdout, stderr) = kubectl(
        bin,
        &kc,
        &["auth", "can-i", "create", "pods", "--token", token.trim()],
        None,
    );
    assert_eq!((allowed, stdout.trim()), (false, "no"), "{stderr}");
    // auth whoami (GA from kubectl 1.28) asks a SelfSubjectReview.
    if bin != KUBECTL_1_27 {
        let whoami = k(&["auth", "whoami", "--token", token.trim()]);
        assert!(
            whoami.contains("system:serviceaccount:default:nobody")
                && whoami.contains("system:serviceaccounts:default"),
            "{whoami}"
        );
    }

    // --as/--as-group impersonate: the admin may, RBAC then judges the impersonated user;
    // a service account without the `impersonate` verb may not.
    let (listed, _, stderr) = kubectl(bin, &kc, &["get", "pods", "--as", "jane"], None);
    assert!(
        !listed && stderr.contains(r#"User "jane" cannot list resource "pods""#),
        "{stderr}"
    );
    assert_eq!(
        k(&[
            "auth",
            "can-i",
            "list",
            "pods",
            "--as",
            "jane",
            "--as-group",
            "system:masters"
        ])
        .trim(),
        "yes"
    );
    if bin != KUBECTL_1_27 {
        let whoami = k(&["auth", "whoami", "--as", "jane", "--as-group", "devs"]);
        assert!(
            whoami.contains("jane")
                && whoami.contains("devs")
                && whoami.contains("system:authenticated"),
            "{whoami}"
        );
    }
    let (listed, _, stderr) = kubectl(
        bin,
        &kc,
        &["get", "pods", "--token", token.trim(), "--as", "jane"],
        None,
    );
    assert!(
        !listed
            && stderr.contains(
                r#"User "system:serviceaccount:default:nobody" cannot impersonate resource "users""#
            ),
        "{stderr}"
    );

    // describe quota shows what is used against what is allowed, as the quota controller
    // counts it (the namespace's kube-root-ca.crt and one ConfigMap of ours), and admission
    // refuses what would go over.
    k(&["create", "namespace", "quota"]);
    k(&[
        "-n",
        "quota",
        "create",
        "quota",
        "q",
        "--hard=configmaps=2,pods=4",
    ]);
    k(&[
        "-n",
        "quota",
        "create",
        "configmap",
        "a",
        "--from-literal=k=v",
    ]);
    let mut described = String::new();
    for _ in 0..100 {
        described = k(&["-n", "quota", "describe", "quota", "q"]);
        if described
            .lines()
            .any(|l| l.split_whitespace().eq(["configmaps", "2", "2"]))
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        described.contains("Resource")
            && described
                .lines()
                .any(|l| l.split_whitespace().eq(["configmaps", "2", "2"]))
            && described
                .lines()
                .any(|l| l.split_whitespace().eq(["pods", "0", "4"])),
        "{described}"
    );
    let (created, _, stderr) =
        kubectl(bin, &kc, &["-n", "quota", "create", "configmap", "b"], None);
    assert!(!created && stderr.contains("exceeded quota"), "{stderr}");

    // delete waits until the object is gone.
    assert!(k(&["delete", "cm", "demo", "--wait"]).contains("deleted"));
    let (success, _, stderr) = kubectl(bin, &kc, &["get", "cm", "demo"], None);
    assert!(!success && stderr.contains("NotFound"), "{stderr}");
    assert!(server.terminate().success());
}

#[test]
fn kubectl_1_27() {
    exercise(KUBECTL_1_27);
}

#[test]
fn kubectl_1_33() {
    exercise(KUBECTL_1_33);
}
