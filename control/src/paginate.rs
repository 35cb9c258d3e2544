//! Keyset pagination: an opaque cursor holds the last item's (sort value, id), so inserts and
//! deletes between pages never make an item that existed throughout be skipped or repeated.
//! The seek itself is the store's (an index range scan); this module owns the cursor format.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde::{Deserialize, Serialize};

/// Sort field of a listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortField {
    /// By name.
    #[serde(rename = "name")]
    Name,
    /// By creation time.
    #[serde(rename = "createdAt")]
    CreatedAt,
    /// By last update time.
    #[serde(rename = "updatedAt")]
    UpdatedAt,
}

impl SortField {
    /// Parses the query parameter.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "name" => Ok(Self::Name),
            "createdAt" => Ok(Self::CreatedAt),
            "updatedAt" => Ok(Self::UpdatedAt),
            _ => Err("sort must be one of name, createdAt, updatedAt".into()),
        }
    }
}

/// Sort direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Order {
    /// Ascending.
    #[serde(rename = "asc")]
    Asc,
    /// Descending.
    #[serde(rename = "desc")]
    Desc,
}

impl Order {
    /// Parses the query parameter.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "asc" => Ok(Self::Asc),
            "desc" => Ok(Self::Desc),
            _ => Err("order must be asc or desc".into()),
        }
    }
}

/// A sort value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SortValue {
    /// A time in ms.
    Time(i64),
    /// A string.
    Text(String),
}

/// What a cursor remembers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Sort field the cursor was issued for.
    pub s: SortField,
    /// Order it was issued for.
    pub o: Order,
    /// Last item's sort value.
    pub v: SortValue,
    /// Last item's id.
    pub i: String,
}

impl Cursor {
    /// Opaque text form.
    pub fn encode(&self) -> String {
        B64URL.encode(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Parses the opaque text form.
    pub fn decode(s: &str) -> Result<Self, String> {
        let bytes = B64URL
            .decode(s)
            .map_err(|_| "cursor is malformed".to_owned())?;
        serde_json::from_slice(&bytes).map_err(|_| "cursor is malformed".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_roundtrip() {
        let c = Cursor {
            s: SortField::Name,
            o: Order::Asc,
            v: SortValue::Text("x".into()),
            i: "id".into(),
        };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        assert!(Cursor::decode("!!").is_err());
        assert!(Cursor::decode("e30").is_err());
    }
}
