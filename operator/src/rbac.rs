//! What a control loop may do, declared beside its code: each controller names the
//! [`Rule`]s its requests need, the way kubebuilder's `+kubebuilder:rbac` markers do, and a
//! generator turns them into the ClusterRole a deployment binds (`orq chartgen` writes the
//! Helm chart's). A rule the code needs but does not declare shows up as a 403 `Forbidden`
//! from an API server enforcing RBAC.

use k8s_openapi::api::rbac::v1::PolicyRule;

/// One RBAC rule: these verbs on these resources of these API groups (`""` is core).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// API groups; `""` for the core group, `"*"` for all.
    pub api_groups: &'static [&'static str],
    /// Resources, or `resource/subresource`; `"*"` for all.
    pub resources: &'static [&'static str],
    /// Verbs: get, list, watch, create, update, patch, delete, deletecollection.
    pub verbs: &'static [&'static str],
}

impl Rule {
    /// The rule as the RBAC API spells it.
    pub fn to_policy_rule(&self) -> PolicyRule {
        let strings = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect();
        PolicyRule {
            api_groups: Some(strings(self.api_groups)),
            resources: Some(strings(self.resources)),
            verbs: strings(self.verbs),
            ..PolicyRule::default()
        }
    }
}

/// Reading a kind through a [`crate::Manager::cache`]: the list and watch it keeps, and the
/// gets reconcilers make.
pub const READ: &[&str] = &["get", "list", "watch"];

/// What leader election does to its Lease ([`crate::LeaderElection`]).
pub const LEADER_ELECTION: &[Rule] = &[Rule {
    api_groups: &["coordination.k8s.io"],
    resources: &["leases"],
    verbs: &["get", "create", "update"],
}];
