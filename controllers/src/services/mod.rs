//! The service controllers: which pods back each Service, as Endpoints ([`endpoints`]) and
//! EndpointSlices ([`endpointslice`]).

pub mod endpoints;
pub mod endpointslice;
