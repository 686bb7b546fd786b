//! The service controllers: which pods back each Service, as Endpoints ([`endpoints`]) and
//! EndpointSlices ([`endpointslice`]), the hand-written Endpoints of Services without a
//! selector mirrored into EndpointSlices ([`endpointslicemirroring`]), the addresses of
//! LoadBalancer Services ([`servicelb`]) and the built-in ingress controller's IngressClass,
//! Ingress status and events ([`ingress`]).

pub mod endpoints;
pub mod endpointslice;
pub mod endpointslicemirroring;
pub mod ingress;
pub mod servicelb;
