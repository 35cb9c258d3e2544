//! How the report writes numbers: thousands separators, sensible decimals.

/// A rate or size: thousands separators from 100 up, one or two decimals below.
pub(crate) fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        "—".into()
    } else if x >= 100.0 {
        let s = format!("{x:.0}");
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// A count with thousands separators (no decimals below 100, unlike [`fmt_num`]).
pub(crate) fn fmt_count(n: u64) -> String {
    if n >= 100 {
        fmt_num(n as f64)
    } else {
        n.to_string()
    }
}
