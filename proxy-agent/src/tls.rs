//! TLS material of the agent: the interception CA, leaf certificates per SNI, and upstream
//! trust and connection pools.

pub mod ca;
pub mod leaf;
pub mod upstream;
