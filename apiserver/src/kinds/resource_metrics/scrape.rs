//! Reading every node agent's `/metrics/resource` (the kubelet's endpoint of that name, in
//! Prometheus text with a timestamp per sample) once per resolution, and turning two
//! successive samples of a cumulative CPU counter into a rate, as metrics-server does. An
//! agent that cannot be read keeps nothing: its node and pods drop out of the API until it
//! answers again, rather than showing stale use.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::Value;

use super::{PodUsage, Usage};
use crate::engine::Engine;
use crate::stream::NodeEndpoint;

/// One cumulative CPU reading and the memory beside it.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    cpu_seconds: f64,
    memory: f64,
    /// Seconds since the Unix epoch.
    at: f64,
}

/// `(namespace, pod, container)`.
type ContainerKey = (String, String, String);

/// What one node's last read left: the samples the next rates are taken from.
#[derive(Debug, Default)]
struct NodeSamples {
    node: Option<Sample>,
    containers: HashMap<ContainerKey, Sample>,
    /// The pods last reported for it, to be replaced on the next read.
    pods: Vec<(String, String)>,
}

/// Reads the agents every `resolution`, for as long as the task runs.
pub async fn run(engine: Engine, resolution: Duration) {
    let mut nodes: HashMap<String, NodeSamples> = HashMap::new();
    loop {
        scrape_all(&engine, &mut nodes, resolution).await;
        tokio::time::sleep(resolution).await;
    }
}

async fn scrape_all(engine: &Engine, nodes: &mut HashMap<String, NodeSamples>, every: Duration) {
    let listed = match crate::quota::list(engine, "", "nodes", None).await {
        Ok(listed) => listed,
        Err(error) => {
            tracing::warn!(%error, "listing nodes for their resource metrics");
            return;
        }
    };
    let names: Vec<String> = listed
        .iter()
        .filter_map(|n| n.pointer("/metadata/name").and_then(Value::as_str))
        .map(str::to_owned)
        .collect();
    let reads = names.iter().map(|name| read(engine, name, every));
    let texts = futures::future::join_all(reads).await;
    let metrics = engine.resource_metrics();
    for (name, text) in names.iter().zip(texts) {
        let state = nodes.entry(name.clone()).or_default();
        let previous_pods = std::mem::take(&mut state.pods);
        let Some(text) = text else {
            *state = NodeSamples::default();
            metrics.update(name, None, HashMap::new(), &previous_pods);
            continue;
        };
        let (node, pods) = measure(state, &text);
        state.pods = pods.keys().cloned().collect();
        metrics.update(name, node, pods, &previous_pods);
    }
    nodes.retain(|name, state| {
        let live = names.contains(name);
        if !live {
            metrics.update(name, None, HashMap::new(), &state.pods);
        }
        live
    });
}

/// The text of node `name`'s `/metrics/resource`, if its agent answers in time.
async fn read(engine: &Engine, name: &str, every: Duration) -> Option<String> {
    let endpoint = NodeEndpoint::of(engine, name).await.ok()?;
    let url = format!("{}/metrics/resource", endpoint.agent_url());
    let mut request = engine
        .node_client()
        .ok()?
        .get(&url)
        .timeout(every.min(Duration::from_secs(10)));
    if let Some(token) = engine.kubelet_token.get() {
        request = request.bearer_auth(token);
    }
    let outcome = async {
        let response = request.send().await?.error_for_status()?;
        response.text().await
    }
    .await;
    match outcome {
        Ok(text) => Some(text),
        Err(error) => {
            tracing::debug!(node = name, %error, "reading the node's resource metrics");
            None
        }
    }
}

/// Takes one read of a node's text: the node's and its pods' use (rates against the samples
/// kept in `state`, which the new samples replace). A pod is reported only when every one of
/// its containers has a rate.
fn measure(state: &mut NodeSamples, text: &str) -> (Option<Usage>, PodUsage) {
    let now = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
    let mut node_cpu = None;
    let mut node_memory = None;
    let mut node_at = now;
    let mut containers: HashMap<ContainerKey, (Option<f64>, Option<f64>, f64)> = HashMap::new();
    for line in parse(text) {
        let at = line.at_ms.map_or(now, |ms| ms as f64 / 1000.0);
        match line.name {
            "node_cpu_usage_seconds_total" => (node_cpu, node_at) = (Some(line.value), at),
            "node_memory_working_set_bytes" => node_memory = Some(line.value),
            "container_cpu_usage_seconds_total" | "container_memory_working_set_bytes" => {
                let (Some(namespace), Some(pod), Some(container)) = (
                    line.label("namespace"),
                    line.label("pod"),
                    line.label("container"),
                ) else {
                    continue;
                };
                let entry = containers
                    .entry((namespace.to_owned(), pod.to_owned(), container.to_owned()))
                    .or_insert((None, None, at));
                if line.name == "container_cpu_usage_seconds_total" {
                    (entry.0, entry.2) = (Some(line.value), at);
                } else {
                    entry.1 = Some(line.value);
                }
            }
            _ => {}
        }
    }
    let node = match (node_cpu, node_memory) {
        (Some(cpu_seconds), Some(memory)) => {
            let sample = Sample {
                cpu_seconds,
                memory,
                at: node_at,
            };
            let usage = rate(state.node.as_ref(), &sample);
            state.node = Some(sample);
            usage
        }
        _ => {
            state.node = None;
            None
        }
    };
    let mut samples = HashMap::new();
    let mut pods: HashMap<(String, String), Option<BTreeMap<String, Usage>>> = HashMap::new();
    for (key, (cpu, memory, at)) in containers {
        let (Some(cpu_seconds), Some(memory)) = (cpu, memory) else {
            continue;
        };
        let sample = Sample {
            cpu_seconds,
            memory,
            at,
        };
        let usage = rate(state.containers.get(&key), &sample);
        let (namespace, pod, container) = key.clone();
        let entry = pods
            .entry((namespace, pod))
            .or_insert_with(|| Some(BTreeMap::new()));
        match (usage, entry.as_mut()) {
            (Some(usage), Some(containers)) => {
                containers.insert(container, usage);
            }
            // One container without a rate yet: the pod waits for the next read.
            _ => *entry = None,
        }
        samples.insert(key, sample);
    }
    state.containers = samples;
    let pods = pods
        .into_iter()
        .filter_map(|(key, containers)| Some((key, containers?)))
        .collect();
    (node, pods)
}

/// The use between `before` and `now`, if `before` is an earlier sample of the same counter
/// (a counter that went back belongs to a restarted container: no rate until the next).
fn rate(before: Option<&Sample>, now: &Sample) -> Option<Usage> {
    let before = before?;
    let window = now.at - before.at;
    if window <= 0.0 || now.cpu_seconds < before.cpu_seconds {
        return None;
    }
    Some(Usage {
        cpu: (now.cpu_seconds - before.cpu_seconds) / window,
        memory: now.memory,
        at: now.at,
        window,
    })
}

/// One sample line of the Prometheus text format.
#[derive(Debug, PartialEq)]
struct Line<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: f64,
    at_ms: Option<i64>,
}

impl Line<'_> {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The sample lines of a Prometheus text exposition (comments and malformed lines skipped).
fn parse(text: &str) -> Vec<Line<'_>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Line<'_>> {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        loop {
            // name="value" pairs, separated by commas, up to the closing brace.
            while chars.next_if(|(_, c)| *c == ',' || *c == ' ').is_some() {}
            let &(start, c) = chars.peek()?;
            if c == '}' {
                rest = &inner[start + 1..];
                break;
            }
            let eq = inner[start..].find('=')? + start;
            let label = inner[start..eq].trim();
            while chars.next_if(|(i, _)| *i <= eq).is_some() {}
            chars.next_if(|(_, c)| *c == '"')?;
            let mut value = String::new();
            loop {
                match chars.next()? {
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    (_, '"') => break,
                    (_, c) => value.push(c),
                }
            }
            labels.push((label, value));
        }
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next()?.parse().ok()?;
    let at_ms = fields.next().and_then(|t| t.parse().ok());
    Some(Line {
        name,
        labels,
        value,
        at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_lines_parse_with_labels_and_timestamps() {
        let text = "# HELP node_cpu_usage_seconds_total x\n\
                    node_cpu_usage_seconds_total 12.5 1700000000000\n\
                    container_cpu_usage_seconds_total{container=\"app\",namespace=\"ns\",pod=\"p,\\\"q\"} 1.5e+00 1700000000500\n\
                    resource_scrape_error 0\n";
        let lines = parse(text);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].name, "node_cpu_usage_seconds_total");
        assert_eq!(lines[0].at_ms, Some(1_700_000_000_000));
        assert_eq!(lines[1].label("pod"), Some("p,\"q"));
        assert_eq!(lines[1].label("container"), Some("app"));
        assert_eq!(lines[1].value, 1.5);
        assert_eq!(lines[2].at_ms, None);
    }

    fn exposition(node_cpu: f64, app_cpu: f64, at_ms: i64) -> String {
        format!(
            "node_cpu_usage_seconds_total {node_cpu} {at_ms}\n\
             node_memory_working_set_bytes 1048576 {at_ms}\n\
             container_cpu_usage_seconds_total{{container=\"app\",namespace=\"ns\",pod=\"web\"}} {app_cpu} {at_ms}\n\
             container_memory_working_set_bytes{{container=\"app\",namespace=\"ns\",pod=\"web\"}} 2048 {at_ms}\n\
             container_cpu_usage_seconds_total{{container=\"side\",namespace=\"ns\",pod=\"web\"}} 1 {at_ms}\n\
             container_memory_working_set_bytes{{container=\"side\",namespace=\"ns\",pod=\"web\"}} 1024 {at_ms}\n"
        )
    }

    #[test]
    fn rates_come_from_two_reads_and_a_restarted_counter_waits() {
        let mut state = NodeSamples::default();
        let (node, pods) = measure(&mut state, &exposition(100.0, 10.0, 1_000_000));
        assert!(node.is_none() && pods.is_empty(), "one read gives no rate");
        let (node, pods) = measure(&mut state, &exposition(115.0, 13.0, 1_015_000));
        let node = node.unwrap();
        assert_eq!((node.cpu, node.window, node.memory), (1.0, 15.0, 1048576.0));
        let web = &pods[&("ns".to_owned(), "web".to_owned())];
        assert_eq!(web["app"].cpu, 0.2);
        assert_eq!(web["side"].cpu, 0.0);
        assert_eq!(web["app"].memory, 2048.0);
        // The app container restarted: its counter went back, so the pod waits a read.
        let (_, pods) = measure(&mut state, &exposition(130.0, 0.5, 1_030_000));
        assert!(pods.is_empty(), "{pods:?}");
    }
}
