//! Durations: parsed as the attribute writes them (`90s`, `1h30m`, `7d`), printed in
//! human units.

use std::time::Duration;

/// Parses `500ms`, `90s`, `5m`, `1h30m`, `2d`, `1w` (units `ms s m h d w`, combined
/// largest first or in any order).
pub(crate) fn parse(s: &str) -> Result<Duration, String> {
    let bad = |why: &str| {
        format!("invalid duration `{s}`: {why} (write it like `90s`, `5m`, `1h30m`, `2d`)")
    };
    let s = s.trim();
    if s.is_empty() {
        return Err(bad("empty"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad("a number must come before each unit"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| bad("number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let ms: u64 = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 604_800_000,
            "" => return Err(bad("missing unit")),
            _ => return Err(bad(&format!("unknown unit `{unit}`"))),
        };
        let part = n.checked_mul(ms).ok_or_else(|| bad("too large"))?;
        total = total
            .checked_add(Duration::from_millis(part))
            .ok_or_else(|| bad("too large"))?;
    }
    Ok(total)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!(parse("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("1w").unwrap(), Duration::from_secs(604_800));
        for bad in ["", "5", "m", "5x", "1h-2m", "99999999999999999999s"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(human(Duration::from_millis(850)), "850ms");
        assert_eq!(human(Duration::from_millis(12_500)), "12.5s");
        assert_eq!(human(Duration::from_secs(250)), "4m 10s");
        assert_eq!(human(Duration::from_secs(3 * 3600 + 300)), "3h 05m");
        assert_eq!(human(Duration::from_secs(2 * 86_400 + 4 * 3600)), "2d 04h");
    }
}
