//! Registry credentials from `imagePullSecrets`: the `kubernetes.io/dockerconfigjson`
//! (`{"auths": {REGISTRY: …}}`) and legacy `kubernetes.io/dockercfg` (`{REGISTRY: …}`)
//! formats, each entry holding `auth` (base64 `user:password`) or `username`/`password`.

use base64::Engine;
use serde_json::Value;

/// The user and password `config` (a secret's raw JSON) holds for `registry`.
pub fn credentials(config: &[u8], registry: &str) -> Option<(String, String)> {
    let config: Value = serde_json::from_slice(config).ok()?;
    let auths = config.get("auths").unwrap_or(&config).as_object()?;
    let wanted = canonical(registry);
    let entry = auths
        .iter()
        .find(|(key, _)| canonical(key) == wanted)
        .map(|(_, v)| v)?;
    if let Some(auth) = entry.get("auth").and_then(Value::as_str) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth)
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, pass) = decoded.split_once(':')?;
        return Some((user.to_owned(), pass.to_owned()));
    }
    let user = entry.get("username").and_then(Value::as_str)?;
    let pass = entry.get("password").and_then(Value::as_str).unwrap_or("");
    Some((user.to_owned(), pass.to_owned()))
}

/// `https://index.docker.io/v1/` and `docker.io` name the same registry; schemes and paths
/// do not matter.
fn canonical(registry: &str) -> String {
    let host = registry
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("")
        .to_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".into(),
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerconfigjson_and_dockercfg() {
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        let json = format!(r#"{{"auths": {{"127.0.0.1:5000": {{"auth": "{auth}"}}}}}}"#);
        assert_eq!(
            credentials(json.as_bytes(), "127.0.0.1:5000"),
            Some(("alice".into(), "s3cret".into()))
        );
        assert_eq!(credentials(json.as_bytes(), "127.0.0.1:5001"), None);
        let cfg = br#"{"https://index.docker.io/v1/": {"username": "bob", "password": "pw"}}"#;
        assert_eq!(
            credentials(cfg, "docker.io"),
            Some(("bob".into(), "pw".into()))
        );
        assert_eq!(credentials(b"not json", "docker.io"), None);
    }
}
