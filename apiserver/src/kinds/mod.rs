//! What particular kinds add to the generic engine: the registry of resources (built-in and
//! from CRDs), CRD handling and generation, subresources (scale, binding, eviction, log, the
//! exec/attach/portforward streams, the pod/service/node proxies),
//! Services and the `kubernetes` Service, resource quantities, the resource metrics
//! (`metrics.k8s.io`) and API aggregation (APIServices).

pub mod aggregator;
pub mod crd;
pub mod crdgen;
pub mod eviction;
pub mod kubernetes_service;
pub mod podlog;
pub mod proxy;
pub mod quantity;
pub mod registry;
pub mod resource_metrics;
pub mod service;
pub mod stream;
pub mod subresource;
