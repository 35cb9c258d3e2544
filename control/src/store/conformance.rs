//! The store's conformance suite: the same cases run against every backend (sled in
//! control's unit tests, PostgreSQL in veil-tests' `store_conformance`). Each case is a
//! `pub fn(&dyn Backend)` that opens the store, and opens it again where durability is part
//! of the contract; [`fixtures::run`] then checks the store's consistency.
//!
//! [`store_conformance_cases!`](crate::store_conformance_cases) is the one list of cases:
//! each runner hands it a macro that turns every `module::case` into a test, so no runner can
//! leave one out.

#![allow(
    clippy::unwrap_used,
    reason = "a test suite: a failed store call is a failed case"
)]

pub mod concurrency;
pub mod fixtures;
pub mod grace;
pub mod log;
pub mod sandboxes;
pub mod secrets;

/// Calls `$runner! { module::case, … }` with every case of the suite (modules of
/// `veil_control::store::conformance`).
#[macro_export]
macro_rules! store_conformance_cases {
    ($runner:ident) => {
        $runner! {
            secrets::pages_stable_under_churn,
            secrets::name_filter_and_total,
            secrets::secret_uniqueness_conflicts,
            secrets::another_orgs_secret_is_not_found,
            secrets::secret_identity_is_immutable,
            secrets::records_round_trip_exactly,
            grace::previous_values_and_tombstones_round_trip_durably,
            grace::sweep_drops_values_past_the_cutoff_and_empty_tombstones,
            grace::reseal_and_key_ids_cover_previous_and_tombstoned_values,
            sandboxes::restore_undoes_only_the_write_it_names,
            sandboxes::cgroup_is_unique,
            sandboxes::another_orgs_sandbox_is_not_found,
            sandboxes::sandbox_identity_is_immutable,
            sandboxes::declare_bind_unbind,
            log::api_keys_and_orgs,
            log::usage_adds_up_audits_and_goes_with_the_secret,
            log::audit_pages_in_both_directions,
            log::audit_seq_increases_in_commit_order,
            concurrency::concurrent_writers_lose_nothing,
            concurrency::audit_reader_never_skips_a_late_commit,
        }
    };
}
