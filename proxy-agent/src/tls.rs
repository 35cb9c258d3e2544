//! TLS material of the agent: the interception CA, leaf certificates per SNI, the client-facing
//! server configs, and upstream trust.

pub mod ca;
pub mod leaf;
pub mod server;
pub mod upstream;
