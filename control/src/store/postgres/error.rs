//! Database errors as store errors: which are the database's answer, which mean it cannot be
//! reached now, and which unique rule a statement broke.

use crate::store::StoreError;

/// A database error as a store error; connection failures are `Unavailable` (a 503).
pub(super) fn db_err(e: tokio_postgres::Error) -> StoreError {
    if e.is_closed() {
        return StoreError::Unavailable("connection to PostgreSQL lost".into());
    }
    match e.as_db_error() {
        Some(d) => StoreError::Database(format!("{} ({})", d.message(), d.code().code())),
        None => StoreError::Unavailable(e.to_string()),
    }
}

/// The unique constraint a statement violated, if that is why it failed.
pub(super) fn violated(e: &tokio_postgres::Error) -> Option<&str> {
    let d = e.as_db_error()?;
    (d.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
        .then(|| d.constraint())
        .flatten()
}
