//! The fleet: agents on other hosts reach the replicas over mutual TLS 1.3 (the veil-link
//! protocol inside), each authenticated as the enrolled host its client certificate was
//! issued to. [`ca`] keeps the fleet CA, [`listener`] accepts and checks the hosts' agents and
//! drops those whose enrollment ended, [`enroll`] is the administration (enroll, list, revoke).

pub mod ca;
pub mod enroll;
pub mod listener;
pub mod placement;
