//! Helm 3 (the pinned release scripts/install-deps.sh installs) against a real `orq server`:
//! install a chart with a CRD, a custom resource, a ConfigMap, a Secret and a Service; upgrade
//! it; list; uninstall.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

mod common;

use std::path::Path;
use std::process::Command;

use common::Server;

fn run(program: &str, kubeconfig: &Path, args: &[&str]) -> String {
    let out = Command::new(program)
        .env("KUBECONFIG", kubeconfig)
        .env("HOME", kubeconfig.parent().unwrap())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (is it installed? scripts/install-deps.sh)"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn helm_install_upgrade_list_uninstall() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    server.wait_ready();
    let kc = server.kubeconfig();
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/demo-chart");
    let helm = |args: &[&str]| run("helm", &kc, args);
    let kubectl = |args: &[&str]| run("kubectl", &kc, args);
    let field = |kind: &str, name: &str, path: &str| {
        kubectl(&["get", kind, name, "-o", &format!("jsonpath={{{path}}}")])
    };

    assert!(helm(&["version", "--short"]).starts_with("v3."));
    let installed = helm(&["install", "demo", chart, "--wait", "--timeout", "60s"]);
    assert!(installed.contains("STATUS: deployed"), "{installed}");
    assert_eq!(field("cm", "demo-config", ".data.greeting"), "hello");
    // stringData became data.
    assert_eq!(field("secret", "demo-secret", ".data.token"), "czNjcjN0");
    assert!(field("svc", "demo-svc", ".spec.clusterIP").starts_with("10.43."));
    assert!(kubectl(&["get", "gadgets"]).contains("demo-gadget"));

    let upgraded = helm(&["upgrade", "demo", chart, "--set", "greeting=hola", "--wait"]);
    assert!(upgraded.contains("REVISION: 2"), "{upgraded}");
    assert_eq!(field("cm", "demo-config", ".data.greeting"), "hola");
    let list = helm(&["list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("demo") && l.contains("deployed") && l.contains('2')),
        "{list}"
    );

    assert!(helm(&["uninstall", "demo", "--wait"]).contains("uninstalled"));
    let left = kubectl(&["get", "cm,svc,secret", "-o", "name"]);
    assert!(
        !left.contains("demo-"),
        "resources left after uninstall: {left}"
    );
    assert!(helm(&["list", "-q"]).trim().is_empty());
    assert!(server.terminate().success());
}

/// `charts/orquestra` lints clean, and values that break its schema are refused by helm,
/// naming the field.
#[test]
fn the_orquestra_chart_lints_clean_and_refuses_bad_values() {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/orquestra");
    let helm = |args: &[&str]| {
        Command::new("helm")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("helm: {e} (is it installed? scripts/install-deps.sh)"))
    };
    let lint = helm(&["lint", chart]);
    let out = String::from_utf8_lossy(&lint.stdout);
    assert!(lint.status.success(), "{out}");
    assert!(
        !out.contains("[WARNING]") && !out.contains("[ERROR]"),
        "{out}"
    );
    for (value, field) in [
        ("operator.replicas=-1", "/operator/replicas"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("operator.replica=2", "'replica' not allowed"),
        (
            "webhooks.failurePolicy=Sometimes",
            "/webhooks/failurePolicy",
        ),
    ] {
        let out = helm(&["template", "x", chart, "--set", value]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{value} accepted");
        assert!(stderr.contains(field), "{value}: {stderr}");
    }
}
