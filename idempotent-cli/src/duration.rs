//! Durations: parsed as the attribute writes them (`90s`, `1h30m`, `7d`), printed in
//! human units.

use std::time::Duration;

/// Parses `500ms`, `90s`, `5m`, `1h30m`, `2d`, `1w` as the attribute does
/// ([`idempotent_shared::parse_duration`]): units `ms s m h d w`, in any order, from 1 ms
/// to 3650 days.
pub(crate) fn parse(s: &str) -> Result<Duration, String> {
    idempotent_shared::parse_duration(s).map_err(|why| format!("`{s}` {why}"))
}

/// A duration for people: `850ms`, `12.5s`, `4m 10s`, `3h 05m`, `2d 04h`.
pub(crate) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    if ms < 1000 {
        format!("{ms}ms")
    } else if s < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else if s < 3600 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h {:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d {:02}h", s / 86_400, (s % 86_400) / 3600)
    }
}

/// A duration as the options take it, in whole units: `7d`, `1h30m`, `90s` is `1m30s`,
/// `250ms`.
pub(crate) fn compact(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    if ms > 0 {
        out.push_str(&format!("{ms}ms"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The grammar is tested in `idempotent-shared`; here, the option's value and message.
    #[test]
    fn parses_and_prints() {
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse("soon").unwrap_err(),
            "`soon` has `s` where a number belongs; write a number then a unit \
             (ms, s, m, h, d, w), like \"1h30m\""
        );
        assert_eq!(human(Duration::from_millis(850)), "850ms");
        assert_eq!(human(Duration::from_millis(12_500)), "12.5s");
        assert_eq!(human(Duration::from_secs(250)), "4m 10s");
        assert_eq!(human(Duration::from_secs(3 * 3600 + 300)), "3h 05m");
        assert_eq!(human(Duration::from_secs(2 * 86_400 + 4 * 3600)), "2d 04h");
        for (text, shown) in [
            ("7d", "7d"),
            ("1h30m", "1h30m"),
            ("90s", "1m30s"),
            ("1s250ms", "1s250ms"),
            ("1w", "7d"),
        ] {
            assert_eq!(compact(parse(text).unwrap()), shown);
        }
    }
}
