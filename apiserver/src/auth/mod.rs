//! Who is asking and whether they may: authentication (tokens, client certificates,
//! service-account tokens and the TokenRequest API), RBAC authorization, and the review kinds
//! that answer those questions for clients.

pub mod authorization;
pub mod identity;
pub mod impersonation;
pub mod review;
pub mod token;
