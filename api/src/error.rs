//! The error body every failed call answers with (NestJS's shape, as Daytona's server sends).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `{"statusCode","message","error"}`: the message names the problem, never a secret value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Error)]
pub struct ErrorBody {
    /// The HTTP status code.
    pub status_code: u16,
    /// What went wrong, for a person.
    pub message: String,
    /// The status's reason phrase.
    pub error: String,
}
