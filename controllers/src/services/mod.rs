//! The service controllers: which pods back each Service, as Endpoints ([`endpoints`]) and
//! EndpointSlices ([`endpointslice`]), and the addresses of LoadBalancer Services
//! ([`servicelb`]).

pub mod endpoints;
pub mod endpointslice;
pub mod servicelb;
