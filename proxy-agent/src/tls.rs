//! TLS material of the agent: the interception CA (leaf certificates per SNI come with
//! interception).

pub mod ca;
