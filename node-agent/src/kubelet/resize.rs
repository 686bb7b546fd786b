//! In-place pod resize on the node: a running container whose spec's CPU or memory changed
//! (through `pods/<name>/resize`) gets the new limits written into its cgroup — or is
//! restarted with them when its `resizePolicy` says `RestartContainer` for a resource that
//! changed — unless the pod would no longer fit the node at all (`PodResizePending`,
//! reason `Infeasible`). What a container runs with is recorded beside its attempt
//! ([`RECORD`]), so the status reports the resources actually applied (`resources`,
//! `allocatedResources`) and an agent restarted mid-way picks up where it was.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod, ResourceRequirements};
use orquestra_operator::quantity;

use crate::container::Resources;
use crate::downward::Allocatable;

/// The file in a container attempt's directory holding the resources it runs with.
pub const RECORD: &str = "resources.json";

/// Records the resources `attempt_dir`'s container runs with.
pub fn record(attempt_dir: &Path, resources: Option<&ResourceRequirements>) -> io::Result<()> {
    let body =
        serde_json::to_vec(&resources.cloned().unwrap_or_default()).map_err(io::Error::other)?;
    let tmp = attempt_dir.join(format!("{RECORD}.tmp"));
    fs::write(&tmp, body)?;
    fs::rename(tmp, attempt_dir.join(RECORD))
}

/// The resources recorded for the attempt (`None` for one started before records existed).
pub fn recorded(attempt_dir: &Path) -> Option<ResourceRequirements> {
    serde_json::from_slice(&fs::read(attempt_dir.join(RECORD)).ok()?).ok()
}

/// The CPU and memory of `r` as comparable numbers (millicores, bytes): a resize changes
/// nothing when only the spelling changed (`1` vs `1000m`).
fn essence(r: Option<&ResourceRequirements>) -> [Option<i64>; 4] {
    let get = |list: Option<
        &std::collections::BTreeMap<
            String,
            k8s_openapi::apimachinery::pkg::api::resource::Quantity,
        >,
    >,
               name: &str,
               parse: fn(&str) -> Option<i64>| {
        list.and_then(|l| l.get(name)).and_then(|q| parse(&q.0))
    };
    let limits = r.and_then(|r| r.limits.as_ref());
    let requests = r.and_then(|r| r.requests.as_ref());
    [
        get(limits, "cpu", quantity::millicores),
        get(limits, "memory", quantity::bytes),
        get(requests, "cpu", quantity::millicores),
        get(requests, "memory", quantity::bytes),
    ]
}

/// What a running container needs for its spec's resources.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing: it runs with them.
    None,
    /// Write the new limits into its cgroup.
    Update,
    /// Restart it (its `resizePolicy` asks so for a resource that changed).
    Restart,
}

/// The step that brings a container running with `actual` to `c`'s resources.
pub fn step(c: &Container, actual: Option<&ResourceRequirements>) -> Step {
    let (want, have) = (essence(c.resources.as_ref()), essence(actual));
    if want == have {
        return Step::None;
    }
    let cpu_changed = want[0] != have[0] || want[2] != have[2];
    let memory_changed = want[1] != have[1] || want[3] != have[3];
    let restarts = |resource: &str| {
        c.resize_policy
            .iter()
            .flatten()
            .any(|p| p.resource_name == resource && p.restart_policy == "RestartContainer")
    };
    if (cpu_changed && restarts("cpu")) || (memory_changed && restarts("memory")) {
        Step::Restart
    } else {
        Step::Update
    }
}

/// Whether the pod's requests (its containers' and sidecars') fit the node at all; the
/// kubelet's `Infeasible` message when not.
pub fn feasible(pod: &Pod, node: &Allocatable) -> Result<(), String> {
    let Some(spec) = &pod.spec else {
        return Ok(());
    };
    let (mut cpu, mut memory) = (0i64, 0i64);
    for c in spec.containers.iter().chain(
        spec.init_containers
            .iter()
            .flatten()
            .filter(|c| c.restart_policy.as_deref() == Some("Always")),
    ) {
        let [_, _, req_cpu, req_mem] = essence(c.resources.as_ref());
        cpu += req_cpu.unwrap_or(0);
        memory += req_mem.unwrap_or(0);
    }
    let mut short = Vec::new();
    if cpu > node.cpu_millis {
        short.push(format!(
            "cpu, requested: {cpu}, capacity: {}",
            node.cpu_millis
        ));
    }
    if memory > node.memory {
        short.push(format!(
            "memory, requested: {memory}, capacity: {}",
            node.memory
        ));
    }
    if short.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "Node didn't have enough capacity: {}",
            short.join(", ")
        ))
    }
}

/// The directory of controller `controller`'s cgroup `path` (v2's unified hierarchy when
/// the host has it, else v1's per-controller ones).
fn cgroup_dir(controller: &str, path: &str) -> PathBuf {
    let root = Path::new("/sys/fs/cgroup");
    let relative = path.trim_start_matches('/');
    if root.join("cgroup.controllers").exists() {
        root.join(relative)
    } else {
        root.join(controller).join(relative)
    }
}

/// Writes `r` into the running container's cgroup `path`: CPU quota and weight, memory
/// limit ("no limit" when unset).
pub fn actuate(path: &str, r: &Resources) -> io::Result<()> {
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let write = |controller: &str, file: &str, value: String| {
        fs::write(cgroup_dir(controller, path).join(file), value)
    };
    if v2 {
        let quota = r.cpu_quota.map_or("max".to_owned(), |q| q.to_string());
        write("cpu", "cpu.max", format!("{quota} 100000"))?;
        if let Some(shares) = r.cpu_shares {
            // runc's and youki's shares → weight mapping.
            let weight = 1 + ((shares.max(2) - 2) * 9999) / 262_142;
            write("cpu", "cpu.weight", weight.to_string())?;
        }
        let memory = r.memory_limit.map_or("max".to_owned(), |m| m.to_string());
        write("memory", "memory.max", memory)?;
    } else {
        write(
            "cpu",
            "cpu.cfs_quota_us",
            r.cpu_quota.unwrap_or(-1).to_string(),
        )?;
        if let Some(shares) = r.cpu_shares {
            write("cpu", "cpu.shares", shares.to_string())?;
        }
        write(
            "memory",
            "memory.limit_in_bytes",
            r.memory_limit.unwrap_or(-1).to_string(),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(value: serde_json::Value) -> Container {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn steps_by_policy() {
        let resources = |cpu: &str, mem: &str| -> ResourceRequirements {
            serde_json::from_value(serde_json::json!({
                "limits": {"cpu": cpu, "memory": mem}, "requests": {"cpu": cpu, "memory": mem},
            }))
            .unwrap()
        };
        let c = container(serde_json::json!({
            "name": "c",
            "resources": {"limits": {"cpu": "1", "memory": "64Mi"},
                          "requests": {"cpu": "1", "memory": "64Mi"}},
            "resizePolicy": [{"resourceName": "memory", "restartPolicy": "RestartContainer"}],
        }));
        assert_eq!(step(&c, Some(&resources("1000m", "64Mi"))), Step::None);
        assert_eq!(step(&c, Some(&resources("500m", "64Mi"))), Step::Update);
        assert_eq!(step(&c, Some(&resources("1", "32Mi"))), Step::Restart);
    }

    #[test]
    fn infeasible_beyond_the_node() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "100", "memory": "1Gi"}}}]},
        }))
        .unwrap();
        let node = Allocatable {
            cpu_millis: 4000,
            memory: 8 << 30,
            ephemeral_storage: 0,
        };
        let e = feasible(&pod, &node).unwrap_err();
        assert!(
            e.starts_with(
                "Node didn't have enough capacity: cpu, requested: 100000, capacity: 4000"
            ),
            "{e}"
        );
    }
}
