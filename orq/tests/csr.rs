//! Client certificates through CertificateSigningRequests, against a real `orq server` with
//! the real kubectl: a manual request approved with `kubectl certificate approve` is signed
//! by the cluster CA and its certificate authenticates (CN the user, O the groups) and is
//! authorized by RBAC like any user; a node's own request for a node identity is approved
//! automatically; a kubelet request for another subject fails validation.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::Server;

fn kubectl(server: &Server, args: &[&str]) -> (bool, String) {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(server.kubeconfig())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A key and a PEM certificate request for `cn` in `orgs`, written to `dir/<cn>.key`.
fn request(dir: &Path, cn: &str, orgs: &[&str]) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    for org in orgs {
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, *org);
    }
    std::fs::write(dir.join(format!("{cn}.key")), key.serialize_pem()).unwrap();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn manifest(name: &str, signer: &str, pem: &str) -> String {
    serde_json::json!({
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"name": name},
        "spec": {"signerName": signer, "usages": ["client auth"],
                 "request": base64::engine::general_purpose::STANDARD.encode(pem)},
    })
    .to_string()
}

fn create(server: &Server, manifest: &str, dir: &Path) {
    let file = dir.join("csr.json");
    std::fs::write(&file, manifest).unwrap();
    let (ok, out) = kubectl(server, &["create", "-f", file.to_str().unwrap()]);
    assert!(ok, "{out}");
}

fn csr(server: &Server, name: &str) -> serde_json::Value {
    let (ok, out) = kubectl(server, &["get", "csr", name, "-o", "json"]);
    assert!(ok, "{out}");
    serde_json::from_str(&out).unwrap()
}

fn wait_csr(
    server: &Server,
    name: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let csr = csr(server, name);
        if done(&csr) {
            return csr;
        }
        assert!(Instant::now() < deadline, "csr {name}: {csr}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// GET `path` with a client certificate (no token): the HTTP status and body.
fn get_with_cert(server: &Server, cert: &Path, key: &Path, path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "-w", "\n%{http_code}", "--cacert"])
        .arg(server.data_dir.join("tls/ca.crt"))
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg(format!("https://{}{path}", server.addr))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_owned())
}

fn condition<'a>(csr: &'a serde_json::Value, kind: &str) -> Option<&'a serde_json::Value> {
    csr["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

#[test]
fn certificate_signing_requests_give_client_certificates_that_authenticate() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--no-agent"]);
    server.wait_ready();
    let work = tempfile::tempdir().unwrap();

    // A manual request waits for approval, then is signed.
    create(
        &server,
        &manifest(
            "alice",
            "kubernetes.io/kube-apiserver-client",
            &request(work.path(), "alice", &["devs"]),
        ),
        work.path(),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        csr(&server, "alice")["status"]["certificate"].is_null(),
        "not signed before approval"
    );
    let (ok, out) = kubectl(&server, &["certificate", "approve", "alice"]);
    assert!(ok, "{out}");
    let signed = wait_csr(&server, "alice", |c| c["status"]["certificate"].is_string());
    let pem = base64::engine::general_purpose::STANDARD
        .decode(signed["status"]["certificate"].as_str().unwrap())
        .unwrap();
    let cert = work.path().join("alice.crt");
    std::fs::write(&cert, &pem).unwrap();
    let text = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-subject",
            "-issuer",
            "-ext",
            "extendedKeyUsage",
            "-in",
        ])
        .arg(&cert)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("CN = alice") || text.contains("CN=alice"),
        "{text}"
    );
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    let verified = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(server.data_dir.join("tls/ca.crt"))
        .arg(&cert)
        .status()
        .unwrap();
    assert!(verified.success(), "signed by the cluster CA");

    // The certificate authenticates as alice in devs: forbidden until RBAC allows it.
    let key = work.path().join("alice.key");
    let (status, body) = get_with_cert(
        &server,
        &cert,
        &key,
        "/api/v1/namespaces/default/configmaps",
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("alice"), "the Status names the user: {body}");
    for args in [
        &[
            "create",
            "role",
            "cm-reader",
            "--verb=get,list",
            "--resource=configmaps",
        ][..],
        &[
            "create",
            "rolebinding",
            "devs",
            "--role=cm-reader",
            "--group=devs",
        ][..],
    ] {
        let (ok, out) = kubectl(&server, args);
        assert!(ok, "{out}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get_with_cert(
            &server,
            &cert,
            &key,
            "/api/v1/namespaces/default/configmaps",
        );
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "{status} {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A certificate of another CA is no identity at all.
    let stranger = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "system:admin");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:masters");
    let forged = params.self_signed(&stranger).unwrap();
    std::fs::write(work.path().join("forged.crt"), forged.pem()).unwrap();
    std::fs::write(work.path().join("forged.key"), stranger.serialize_pem()).unwrap();
    let (status, _) = get_with_cert(
        &server,
        &work.path().join("forged.crt"),
        &work.path().join("forged.key"),
        "/api/v1/namespaces",
    );
    assert!(
        status != 200,
        "a self-signed admin certificate is refused: {status}"
    );

    // A kubelet request for a subject that is not a node's: approved by hand, it fails.
    create(
        &server,
        &manifest(
            "not-a-node",
            "kubernetes.io/kube-apiserver-client-kubelet",
            &request(work.path(), "mallory", &["system:masters"]),
        ),
        work.path(),
    );
    let (ok, out) = kubectl(&server, &["certificate", "approve", "not-a-node"]);
    assert!(ok, "{out}");
    let failed = wait_csr(&server, "not-a-node", |c| condition(c, "Failed").is_some());
    assert_eq!(
        condition(&failed, "Failed").unwrap()["reason"],
        "SignerValidationFailure"
    );
    assert!(failed["status"]["certificate"].is_null());

    // A node asks for its own identity with the node token: approved and signed by itself.
    let node_token = std::fs::read_to_string(server.data_dir.join("node-token")).unwrap();
    let body = manifest(
        "node-worker-1",
        "kubernetes.io/kube-apiserver-client-kubelet",
        &request(work.path(), "system:node:worker-1", &["system:nodes"]),
    );
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
        ])
        .arg(server.data_dir.join("tls/ca.crt"))
        .args([
            "-H",
            &format!("Authorization: Bearer {}", node_token.trim()),
        ])
        .args([
            "-H",
            "Content-Type: application/json",
            "-X",
            "POST",
            "-d",
            &body,
        ])
        .arg(format!(
            "https://{}/apis/certificates.k8s.io/v1/certificatesigningrequests",
            server.addr
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "201");
    let signed = wait_csr(&server, "node-worker-1", |c| {
        c["status"]["certificate"].is_string()
    });
    assert_eq!(
        condition(&signed, "Approved").unwrap()["reason"],
        "AutoApproved"
    );
    let pem = base64::engine::general_purpose::STANDARD
        .decode(signed["status"]["certificate"].as_str().unwrap())
        .unwrap();
    let cert = work.path().join("worker-1.crt");
    std::fs::write(&cert, pem).unwrap();
    let (status, body) = get_with_cert(
        &server,
        &cert,
        &work.path().join("system:node:worker-1.key"),
        "/api/v1/nodes",
    );
    assert_eq!(
        status, 200,
        "a node lists nodes as system:node:worker-1: {body}"
    );
    assert!(server.terminate().success());
}
