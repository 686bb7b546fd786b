//! From a pod's container spec and its image to what the runtime runs: the process (image
//! entrypoint/cmd vs `command`/`args`, `$(VAR)` references), the environment (incl.
//! `valueFrom` and `envFrom` from ConfigMaps, Secrets and the downward API), the user, the
//! seccomp profile and the limits. (Volumes and their mounts are [`crate::volume`]'s.)
//!
//! A problem here is the user's (a missing ConfigMap key, `runAsNonRoot` with a root image)
//! and ends up as `CreateContainerConfigError` in the pod's status, with this module's
//! message.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::{Api, Client, ResourceExt};

use crate::container::Resources;
use crate::downward::{self, Addresses, Allocatable};
use crate::image::ImageConfig;
use orquestra_operator::quantity;

/// A configuration problem: the pod's fault, not the node's.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err(message: impl Into<String>) -> ConfigError {
    ConfigError(message.into())
}

/// Reads ConfigMaps and Secrets from the pod's namespace.
#[derive(Clone)]
pub struct Sources {
    config_maps: Api<ConfigMap>,
    secrets: Api<Secret>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").finish_non_exhaustive()
    }
}

impl Sources {
    /// Sources for `namespace`.
    pub fn new(client: Client, namespace: &str) -> Self {
        Sources {
            config_maps: Api::namespaced(client.clone(), namespace),
            secrets: Api::namespaced(client, namespace),
        }
    }

    /// The ConfigMap's data and binary data; empty when it is missing and `optional`.
    pub(crate) async fn config_map(
        &self,
        name: &str,
        optional: bool,
    ) -> Result<BTreeMap<String, Vec<u8>>, ConfigError> {
        match self.config_maps.get_opt(name).await {
            Ok(Some(cm)) => {
                let mut data: BTreeMap<String, Vec<u8>> = cm
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                for (k, v) in cm.binary_data.unwrap_or_default() {
                    data.insert(k, v.0);
                }
                Ok(data)
            }
            Ok(None) if optional => Ok(BTreeMap::new()),
            Ok(None) => Err(err(format!("configmap \"{name}\" not found"))),
            Err(e) => Err(err(format!("reading configmap \"{name}\": {e}"))),
        }
    }

    /// The Secret's data; empty when it is missing and `optional`.
    pub(crate) async fn secret(
        &self,
        name: &str,
        optional: bool,
    ) -> Result<BTreeMap<String, Vec<u8>>, ConfigError> {
        match self.secrets.get_opt(name).await {
            Ok(Some(secret)) => {
                let mut data: BTreeMap<String, Vec<u8>> = secret
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                for (k, v) in secret.string_data.unwrap_or_default() {
                    data.insert(k, v.into_bytes());
                }
                Ok(data)
            }
            Ok(None) if optional => Ok(BTreeMap::new()),
            Ok(None) => Err(err(format!("secret \"{name}\" not found"))),
            Err(e) => Err(err(format!("reading secret \"{name}\": {e}"))),
        }
    }
}

/// The container's environment: the image's, then `services` (the Services' variables),
/// then `envFrom`, then `env` (later wins), with `$(VAR)` references in `env` values
/// expanded against what precedes them.
pub async fn env(
    sources: &Sources,
    pod: &Pod,
    container: &Container,
    image: &ImageConfig,
    services: &[(String, String)],
    addresses: &Addresses,
    node: &Allocatable,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars: Vec<(String, String)> = Vec::new();
    let set = |vars: &mut Vec<(String, String)>, k: String, v: String| match vars
        .iter_mut()
        .find(|(name, _)| *name == k)
    {
        Some(slot) => slot.1 = v,
        None => vars.push((k, v)),
    };
    for kv in &image.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        set(&mut vars, k.to_owned(), v.to_owned());
    }
    if !vars.iter().any(|(k, _)| k == "PATH") {
        set(
            &mut vars,
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    set(
        &mut vars,
        "HOSTNAME".into(),
        crate::hosts::kernel_hostname(pod, crate::agent::CLUSTER_DOMAIN),
    );
    for (k, v) in services {
        set(&mut vars, k.clone(), v.clone());
    }
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(cm) = &from.config_map_ref {
            sources
                .config_map(&cm.name, cm.optional.unwrap_or(false))
                .await?
        } else if let Some(secret) = &from.secret_ref {
            sources
                .secret(&secret.name, secret.optional.unwrap_or(false))
                .await?
        } else {
            continue;
        };
        for (k, v) in data {
            set(
                &mut vars,
                format!("{prefix}{k}"),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
    }
    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => {
                let map: BTreeMap<String, String> = vars.iter().cloned().collect();
                expand(var.value.as_deref().unwrap_or(""), &map)
            }
            Some(from) => {
                if let Some(f) = &from.field_ref {
                    downward::field_ref(pod, &f.field_path, addresses)?
                } else if let Some(key) = &from.config_map_key_ref {
                    let optional = key.optional.unwrap_or(false);
                    let data = sources.config_map(&key.name, optional).await?;
                    match data.get(&key.key) {
                        Some(v) => String::from_utf8_lossy(v).into_owned(),
                        None if optional => continue,
                        None => {
                            return Err(err(format!(
                                "couldn't find key {} in ConfigMap {}/{}",
                                key.key,
                                pod.namespace().unwrap_or_default(),
                                key.name
                            )));
                        }
                    }
                } else if let Some(key) = &from.secret_key_ref {
                    let optional = key.optional.unwrap_or(false);
                    let data = sources.secret(&key.name, optional).await?;
                    match data.get(&key.key) {
                        Some(v) => String::from_utf8_lossy(v).into_owned(),
                        None if optional => continue,
                        None => {
                            return Err(err(format!(
                                "couldn't find key {} in Secret {}/{}",
                                key.key,
                                pod.namespace().unwrap_or_default(),
                                key.name
                            )));
                        }
                    }
                } else if let Some(r) = &from.resource_field_ref {
                    let target = match r.container_name.as_deref().filter(|n| !n.is_empty()) {
                        Some(name) => downward::container(pod, name).ok_or_else(|| {
                            err(format!("env {}: no container named {name:?}", var.name))
                        })?,
                        None => container,
                    };
                    downward::resource_field(
                        target,
                        &r.resource,
                        r.divisor.as_ref().map(|d| d.0.as_str()),
                        node,
                    )?
                } else {
                    return Err(err(format!("env {}: empty valueFrom", var.name)));
                }
            }
        };
        set(&mut vars, var.name.clone(), value);
    }
    Ok(vars)
}

/// Kubernetes' `$(VAR)` expansion: defined names are replaced, `$$` escapes, anything else
/// stays as written.
pub fn expand(input: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The process: `command` replaces the entrypoint (and drops the image's cmd), `args`
/// replace the cmd; `$(VAR)` references expand against the environment.
pub fn process_args(
    container: &Container,
    image: &ImageConfig,
    env: &[(String, String)],
) -> Result<Vec<String>, ConfigError> {
    let vars: BTreeMap<String, String> = env.iter().cloned().collect();
    let expand_all = |v: &Vec<String>| v.iter().map(|a| expand(a, &vars)).collect::<Vec<_>>();
    let args = match (&container.command, &container.args) {
        (Some(command), args) if !command.is_empty() => {
            let mut all = expand_all(command);
            all.extend(args.as_ref().map(expand_all).unwrap_or_default());
            all
        }
        (_, Some(args)) if !args.is_empty() => {
            let mut all = image.entrypoint.clone();
            all.extend(expand_all(args));
            all
        }
        _ => {
            let mut all = image.entrypoint.clone();
            all.extend(image.cmd.iter().cloned());
            all
        }
    };
    if args.is_empty() {
        return Err(err(
            "no command specified: the image has no entrypoint or cmd and the container no command",
        ));
    }
    Ok(args)
}

/// The user and groups: `securityContext.runAsUser/runAsGroup` (container, then pod) over
/// the image's `User`, names resolved against the image's `/etc/passwd` and `/etc/group`.
pub fn user(
    pod: &Pod,
    container: &Container,
    image: &ImageConfig,
    rootfs: &Path,
) -> Result<(u32, u32, Vec<u32>), ConfigError> {
    let psc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let csc = container.security_context.as_ref();
    let (image_user, image_group) = match image.user.split_once(':') {
        Some((u, g)) => (u.to_owned(), Some(g.to_owned())),
        None => (image.user.clone(), None),
    };
    let passwd = fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    let group = fs::read_to_string(rootfs.join("etc/group")).unwrap_or_default();
    let lookup = |db: &str, name: &str| -> Option<(u32, u32)> {
        db.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name)).then(|| {
                (
                    f.get(2).and_then(|v| v.parse().ok()).unwrap_or(0),
                    f.get(3).and_then(|v| v.parse().ok()).unwrap_or(0),
                )
            })
        })
    };
    let (mut uid, mut gid) = if image_user.is_empty() {
        (0, 0)
    } else if let Ok(uid) = image_user.parse::<u32>() {
        (uid, lookup_by_uid(&passwd, uid).unwrap_or(0))
    } else {
        lookup(&passwd, &image_user).ok_or_else(|| {
            err(format!(
                "user {image_user:?} not found in the image's /etc/passwd"
            ))
        })?
    };
    if let Some(g) = image_group.filter(|g| !g.is_empty()) {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup(&group, &g)
                .map(|(gid, _)| gid)
                .ok_or_else(|| err(format!("group {g:?} not found in the image's /etc/group")))?,
        };
    }
    if let Some(u) = csc
        .and_then(|c| c.run_as_user)
        .or(psc.and_then(|p| p.run_as_user))
    {
        uid = u as u32;
        gid = lookup_by_uid(&passwd, uid).unwrap_or(0);
    }
    if let Some(g) = csc
        .and_then(|c| c.run_as_group)
        .or(psc.and_then(|p| p.run_as_group))
    {
        gid = g as u32;
    }
    if csc
        .and_then(|c| c.run_as_non_root)
        .or(psc.and_then(|p| p.run_as_non_root))
        == Some(true)
        && uid == 0
    {
        return Err(err("container has runAsNonRoot and image will run as root"));
    }
    let mut groups: Vec<u32> = psc
        .and_then(|p| p.supplemental_groups.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|g| g as u32)
        .collect();
    if let Some(fs_group) = psc.and_then(|p| p.fs_group) {
        groups.push(fs_group as u32);
    }
    Ok((uid, gid, groups))
}

fn lookup_by_uid(passwd: &str, uid: u32) -> Option<u32> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.get(2).and_then(|v| v.parse::<u32>().ok()) == Some(uid))
            .then(|| f.get(3).and_then(|v| v.parse().ok()).unwrap_or(0))
    })
}

/// The RuntimeClass handlers this node runs: every container here runs through
/// libcontainer, which is what `runc` (the name charts and RuntimeClasses use) means too.
pub const RUNTIME_HANDLERS: &[&str] = &["runc", "libcontainer"];

/// Checks the handler of the pod's `runtimeClassName`, if any: a class this node has no
/// runtime for keeps the pod from starting (`FailedCreatePodSandBox`), as the kubelet does.
pub async fn runtime_handler(client: &Client, pod: &Pod) -> Result<(), String> {
    let Some(class) = pod
        .spec
        .as_ref()
        .and_then(|s| s.runtime_class_name.as_deref())
        .filter(|c| !c.is_empty())
    else {
        return Ok(());
    };
    let classes: Api<k8s_openapi::api::node::v1::RuntimeClass> = Api::all(client.clone());
    let handler = match classes.get_opt(class).await {
        Ok(Some(rc)) => rc.handler,
        Ok(None) => return Err(format!("RuntimeClass \"{class}\" not found")),
        Err(e) => return Err(format!("reading RuntimeClass \"{class}\": {e}")),
    };
    if RUNTIME_HANDLERS.contains(&handler.as_str()) {
        Ok(())
    } else {
        Err(format!(
            "failed to get sandbox runtime: no runtime for \"{handler}\" is configured (this node runs: {})",
            RUNTIME_HANDLERS.join(", ")
        ))
    }
}

/// Whether the host enforces AppArmor.
pub fn host_has_apparmor() -> bool {
    fs::read_to_string("/sys/module/apparmor/parameters/enabled").is_ok_and(|v| v.trim() == "Y")
}

/// The AppArmor profile for `container` (its `securityContext.appArmorProfile`, else the
/// pod's, else the deprecated `container.apparmor.security.beta.kubernetes.io/<name>`
/// annotation): `None` for none or `Unconfined`; a `Localhost` profile's name where the host
/// enforces AppArmor. Refused, with the kubelet's message, where the host has no AppArmor;
/// and `RuntimeDefault` everywhere: Orquestra installs no default profile, and running
/// unconfined instead would be a silent downgrade.
pub fn apparmor(
    pod: &Pod,
    container: &Container,
    host: bool,
) -> Result<Option<String>, ConfigError> {
    let of = |p: Option<&k8s_openapi::api::core::v1::AppArmorProfile>| {
        p.map(|p| (p.type_.clone(), p.localhost_profile.clone()))
    };
    let annotation = pod
        .annotations()
        .get(&format!(
            "container.apparmor.security.beta.kubernetes.io/{}",
            container.name
        ))
        .map(|v| match v.as_str() {
            "runtime/default" => ("RuntimeDefault".to_owned(), None),
            "unconfined" => ("Unconfined".to_owned(), None),
            other => (
                "Localhost".to_owned(),
                Some(other.trim_start_matches("localhost/").to_owned()),
            ),
        });
    let profile = of(container
        .security_context
        .as_ref()
        .and_then(|s| s.app_armor_profile.as_ref()))
    .or_else(|| {
        of(pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref())
            .and_then(|s| s.app_armor_profile.as_ref()))
    })
    .or(annotation);
    let Some((kind, localhost)) = profile else {
        return Ok(None);
    };
    if kind == "Unconfined" {
        return Ok(None);
    }
    if !host {
        return Err(err(
            "Cannot enforce AppArmor: AppArmor is not enabled on the host",
        ));
    }
    match kind.as_str() {
        "Localhost" => match localhost.filter(|l| !l.is_empty()) {
            Some(name) => Ok(Some(name)),
            None => Err(err("appArmorProfile Localhost needs a localhostProfile")),
        },
        "RuntimeDefault" => Err(err(
            "appArmorProfile RuntimeDefault is not supported: Orquestra installs no default AppArmor profile (use Localhost with a loaded profile, or Unconfined)",
        )),
        other => Err(err(format!("unknown appArmorProfile type {other:?}"))),
    }
}

/// The sysctls the kubelet allows by default (its "safe" set: namespaced, and unable to
/// affect other pods or the node).
pub const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
];

/// The pod's `securityContext.sysctls`, checked as the kubelet's sysctl admission does:
/// only the safe set, and no `net.*` one for a pod on the node's network (it would change
/// the node's). Names may use `/` for `.` (`net/ipv4/tcp_syncookies`).
pub fn sysctls(pod: &Pod) -> Result<BTreeMap<String, String>, ConfigError> {
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let mut out = BTreeMap::new();
    for sysctl in spec
        .and_then(|s| s.security_context.as_ref())
        .and_then(|s| s.sysctls.as_ref())
        .into_iter()
        .flatten()
    {
        let name = sysctl.name.replace('/', ".");
        if !SAFE_SYSCTLS.contains(&name.as_str()) {
            return Err(err(format!(
                "forbidden sysctl: \"{}\" not allowlisted",
                sysctl.name
            )));
        }
        if host_network && name.starts_with("net.") {
            return Err(err(format!(
                "forbidden sysctl: \"{}\" not allowed with host net enabled",
                sysctl.name
            )));
        }
        out.insert(name, sysctl.value.clone());
    }
    Ok(out)
}

/// The seccomp filter of `container` (its `seccompProfile`, else the pod's): none for
/// `Unconfined`, none given, or a privileged container; the runtime's default; or a
/// `Localhost` profile from `profiles` (the agent's `seccomp/` directory).
pub fn seccomp(
    pod: &Pod,
    container: &Container,
    profiles: &std::path::Path,
) -> Result<Option<serde_json::Value>, ConfigError> {
    let sc = container.security_context.as_ref();
    if sc.and_then(|s| s.privileged) == Some(true) {
        return Ok(None);
    }
    let profile = sc.and_then(|c| c.seccomp_profile.as_ref()).or(pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref())
        .and_then(|s| s.seccomp_profile.as_ref()));
    let Some(profile) = profile else {
        return Ok(None);
    };
    match profile.type_.as_str() {
        "Unconfined" => Ok(None),
        "RuntimeDefault" => Ok(Some(crate::runtime::seccomp::runtime_default())),
        "Localhost" => {
            let relative = profile.localhost_profile.as_deref().unwrap_or("");
            crate::runtime::seccomp::localhost(profiles, relative)
                .map(Some)
                .map_err(err)
        }
        other => Err(err(format!("unknown seccompProfile type {other:?}"))),
    }
}

/// The cgroup limits from `resources`.
pub fn resources(container: &Container) -> Resources {
    let res = container.resources.as_ref();
    let get = |kind: Option<
        &BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >,
               name: &str| kind.and_then(|m| m.get(name)).map(|q| q.0.clone());
    let limits = res.and_then(|r| r.limits.as_ref());
    let requests = res.and_then(|r| r.requests.as_ref());
    let cpu_limit = get(limits, "cpu").and_then(|q| quantity::millicores(&q));
    let cpu_request = get(requests, "cpu")
        .and_then(|q| quantity::millicores(&q))
        .or(cpu_limit);
    Resources {
        memory_limit: get(limits, "memory").and_then(|q| quantity::bytes(&q)),
        // 100 ms periods, as the kubelet: 1 CPU = 100,000 µs, at least 1 ms.
        cpu_quota: cpu_limit.map(|m| (m * 100).max(1000)),
        // The kubelet's milliCPU → shares: 1024 per CPU, at least 2.
        cpu_shares: Some(cpu_request.map_or(2, |m| ((m * 1024) / 1000).max(2) as u64)),
        pids_limit: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apparmor_profiles_by_host() {
        let pod = |profile: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p"},
                "spec": {"securityContext": {"appArmorProfile": profile},
                         "containers": [{"name": "c"}]},
            }))
            .unwrap()
        };
        let c = Container {
            name: "c".into(),
            ..Container::default()
        };
        let local = pod(serde_json::json!({"type": "Localhost", "localhostProfile": "k8s-nginx"}));
        assert_eq!(
            apparmor(&local, &c, true).unwrap().as_deref(),
            Some("k8s-nginx")
        );
        let e = apparmor(&local, &c, false).unwrap_err();
        assert!(e.0.contains("AppArmor is not enabled on the host"), "{e}");
        let unconfined = pod(serde_json::json!({"type": "Unconfined"}));
        assert_eq!(apparmor(&unconfined, &c, false).unwrap(), None);
        let default = pod(serde_json::json!({"type": "RuntimeDefault"}));
        assert!(apparmor(&default, &c, true).is_err());
    }

    #[test]
    fn dollar_expansion() {
        let vars: BTreeMap<String, String> = [("A".to_owned(), "1".to_owned())].into();
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &vars), "1-$(B)-$(A)-$");
    }

    #[test]
    fn command_and_args_against_the_image() {
        let image = ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["default".into()],
            ..ImageConfig::default()
        };
        let c = |command: Option<Vec<&str>>, args: Option<Vec<&str>>| Container {
            command: command.map(|v| v.into_iter().map(String::from).collect()),
            args: args.map(|v| v.into_iter().map(String::from).collect()),
            ..Container::default()
        };
        let env = [("X".to_owned(), "x".to_owned())];
        assert_eq!(
            process_args(&c(None, None), &image, &env).unwrap(),
            ["/entry", "default"]
        );
        assert_eq!(
            process_args(&c(None, Some(vec!["$(X)"])), &image, &env).unwrap(),
            ["/entry", "x"]
        );
        assert_eq!(
            process_args(&c(Some(vec!["/bin/sh"]), None), &image, &env).unwrap(),
            ["/bin/sh"]
        );
        assert!(process_args(&c(None, None), &ImageConfig::default(), &env).is_err());
    }
}
