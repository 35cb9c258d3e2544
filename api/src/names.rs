//! The name rules of the API that clients check too (`veil-control run --secret ENV=NAME`):
//! one copy, used by the server and its clients; messages name the problem.

/// Longest secret or environment variable name.
pub const MAX_NAME_LEN: usize = 255;

fn ident(s: &str, first: impl Fn(u8) -> bool, rest: impl Fn(u8) -> bool) -> bool {
    let b = s.as_bytes();
    !b.is_empty() && first(b[0]) && b[1..].iter().all(|&c| rest(c))
}

/// A secret name: `^[a-zA-Z_][a-zA-Z0-9_-]*$`, at most 255 characters.
pub fn secret_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("name must be at most {MAX_NAME_LEN} characters"));
    }
    if !ident(
        name,
        |c| c.is_ascii_alphabetic() || c == b'_',
        |c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-',
    ) {
        return Err("name must match ^[a-zA-Z_][a-zA-Z0-9_-]*$".into());
    }
    Ok(())
}

/// An environment variable name: `^[A-Za-z_][A-Za-z0-9_]*$`, at most 255 characters.
pub fn env_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_NAME_LEN
        || !ident(
            name,
            |c| c.is_ascii_alphabetic() || c == b'_',
            |c| c.is_ascii_alphanumeric() || c == b'_',
        )
    {
        return Err(format!(
            "environment variable name {name:?} must match ^[A-Za-z_][A-Za-z0-9_]*$"
        ));
    }
    Ok(())
}
