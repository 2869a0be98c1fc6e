//! The duration grammar: a number then a unit, repeated (`"1h30m"`, `"7d"`, `"250ms"`).

use crate::MAX_TTL;
use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::String;
use core::fmt;
use core::time::Duration;

/// The units with their length in milliseconds, longest first.
const UNITS: [(&str, u64); 6] = [
    ("w", 604_800_000),
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1000),
    ("ms", 1),
];

/// Parses a duration written as numbers each followed by a unit: `ms`, `s`, `m`, `h`,
/// `d` or `w` (`"250ms"`, `"90s"`, `"7d"`, `"1h30m"`, `"1w2d"`). Parts may come in any
/// order and add up; whitespace around the whole is ignored, inside it is not.
///
/// The result is at least 1 ms and at most [`MAX_TTL`] (3650 days); zero, negative and
/// fractional values, a number without a unit and an unknown unit are errors.
///
/// ```
/// use core::time::Duration;
/// use idempotent_shared::{DurationError, parse_duration};
///
/// assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
/// assert_eq!(parse_duration(" 1w2d "), Ok(Duration::from_secs(9 * 86_400)));
/// assert_eq!(parse_duration("0s"), Err(DurationError::Zero));
/// assert_eq!(parse_duration("90"), Err(DurationError::MissingUnit(90)));
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    if s.starts_with('-') {
        return Err(DurationError::Negative);
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while let Some(first) = rest.chars().next() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(DurationError::ExpectedNumber(first));
        }
        let number: u64 = rest[..digits].parse().map_err(|_| DurationError::TooLong)?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let per = match UNITS.iter().find(|(name, _)| *name == unit) {
            Some(&(_, per)) => per,
            None if unit.is_empty() => return Err(DurationError::MissingUnit(number)),
            None if unit.starts_with('.') => return Err(DurationError::Fraction),
            None => return Err(DurationError::UnknownUnit(unit.to_owned())),
        };
        total = number
            .checked_mul(per)
            .and_then(|ms| total.checked_add(ms))
            .ok_or(DurationError::TooLong)?;
    }
    if total == 0 {
        return Err(DurationError::Zero);
    }
    if u128::from(total) > MAX_TTL.as_millis() {
        return Err(DurationError::TooLong);
    }
    Ok(Duration::from_millis(total))
}

/// Writes a duration in the grammar of [`parse_duration`], in the largest of the units
/// `d`, `h`, `m`, `s` and `ms` that divides it (`"7d"`, `"90m"`, `"100ms"`); a part under a
/// millisecond is left out.
///
/// ```
/// use core::time::Duration;
/// use idempotent_shared::format_duration;
///
/// assert_eq!(format_duration(Duration::from_secs(14 * 86_400)), "14d");
/// assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
/// ```
pub fn format_duration(duration: Duration) -> String {
    // whole milliseconds of any `Duration` fit in a u128; weeks are left out, as people
    // write two weeks `14d` more often than `2w`
    let ms = duration.as_millis();
    let (unit, per) = UNITS[1..]
        .iter()
        .copied()
        .find(|&(_, per)| ms.is_multiple_of(u128::from(per)))
        .unwrap_or(("ms", 1));
    format!("{}{unit}", ms / u128::from(per))
}

/// Why [`parse_duration`] refused a text.
///
/// Its [`Display`](fmt::Display) is the predicate of a sentence whose subject is the
/// text, as the attribute writes it: ``format!("`ttl = {text:?}` {error}")`` gives
/// `` `ttl = "7days"` has the unknown unit `days`; use ms, s, m, h, d or w ``.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DurationError {
    /// Nothing but whitespace.
    Empty,
    /// Starts with `-`.
    Negative,
    /// This character stands where a number belongs (`"h"`, `"+5s"`, `"1h 30m"`).
    ExpectedNumber(char),
    /// This number has no unit after it (`"90"`).
    MissingUnit(u64),
    /// A number has a fractional part (`"1.5h"`).
    Fraction,
    /// The text after a number is not a unit (`"7days"`).
    UnknownUnit(String),
    /// Adds up to zero (`"0s"`).
    Zero,
    /// Longer than [`MAX_TTL`], or a number too large to read.
    TooLong,
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => {
                f.write_str("is empty; write a duration like \"60s\", \"7d\" or \"1h30m\"")
            }
            Self::Negative => f.write_str("is negative; durations are positive, like \"60s\""),
            Self::ExpectedNumber(c) => write!(
                f,
                "has `{c}` where a number belongs; write a number then a unit (ms, s, m, h, d, w), like \"1h30m\""
            ),
            Self::MissingUnit(n) => write!(
                f,
                "has `{n}` without a unit; add one of ms, s, m, h, d, w, like \"{n}s\""
            ),
            Self::Fraction => {
                f.write_str("has a fraction; combine units instead, like \"1h30m\" for 1.5h")
            }
            Self::UnknownUnit(unit) => {
                write!(f, "has the unknown unit `{unit}`; use ms, s, m, h, d or w")
            }
            Self::Zero => f.write_str("is zero; give a positive duration, like \"60s\""),
            Self::TooLong => f.write_str("is longer than the maximum of 3650d (ten years)"),
        }
    }
}

impl core::error::Error for DurationError {}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn durations() {
        let ms = |n| Ok(Duration::from_millis(n));
        assert_eq!(parse_duration("7d"), ms(7 * 86_400_000));
        assert_eq!(parse_duration("1h30m"), ms(5_400_000));
        assert_eq!(parse_duration("250ms"), ms(250));
        assert_eq!(parse_duration("90s"), ms(90_000));
        assert_eq!(parse_duration("1w"), ms(604_800_000));
        assert_eq!(
            parse_duration("1w2d3h4m5s6ms"),
            ms(604_800_000 + 2 * 86_400_000 + 3 * 3_600_000 + 4 * 60_000 + 5000 + 6)
        );
        // any order, repeated units add up, surrounding whitespace is ignored
        assert_eq!(parse_duration("30m1h"), ms(5_400_000));
        assert_eq!(parse_duration("1h1h"), ms(7_200_000));
        assert_eq!(parse_duration(" 5s\n"), ms(5000));
        assert_eq!(parse_duration("0s1ms"), ms(1));
        assert_eq!(parse_duration("3650d"), Ok(MAX_TTL));
        assert_eq!(parse_duration("315360000000ms"), Ok(MAX_TTL));
        for bad in [
            "",
            "0s",
            "5",
            "5x",
            "-5s",
            "1.5h",
            "s",
            "m",
            "1h-2m",
            "1h 30m",
            "+5s",
            "99999999999999999999d",
            "99999999999999999999s",
            "3651d",
            "315360000001ms",
            "0ms0s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn each_refusal_says_why() {
        let why = |s: &str| parse_duration(s).unwrap_err();
        assert_eq!(why(" "), DurationError::Empty);
        assert_eq!(why("-5s"), DurationError::Negative);
        assert_eq!(why("s"), DurationError::ExpectedNumber('s'));
        assert_eq!(why("1h 30m"), DurationError::UnknownUnit("h ".into()));
        assert_eq!(why("1h-2m"), DurationError::UnknownUnit("h-".into()));
        assert_eq!(why("+5s"), DurationError::ExpectedNumber('+'));
        assert_eq!(why("5"), DurationError::MissingUnit(5));
        assert_eq!(why("1.5h"), DurationError::Fraction);
        assert_eq!(why("7days"), DurationError::UnknownUnit("days".into()));
        assert_eq!(why("0ms0s"), DurationError::Zero);
        assert_eq!(why("3651d"), DurationError::TooLong);
        assert_eq!(why("99999999999999999999w"), DurationError::TooLong);
        // the product overflows u64 before the maximum is checked
        assert_eq!(why("9999999999999999w"), DurationError::TooLong);
    }

    #[test]
    fn messages() {
        let text = |s: &str| parse_duration(s).unwrap_err().to_string();
        assert_eq!(
            text(""),
            "is empty; write a duration like \"60s\", \"7d\" or \"1h30m\""
        );
        assert_eq!(
            text("-1s"),
            "is negative; durations are positive, like \"60s\""
        );
        assert_eq!(
            text("h"),
            "has `h` where a number belongs; write a number then a unit (ms, s, m, h, d, w), like \"1h30m\""
        );
        assert_eq!(
            text("90"),
            "has `90` without a unit; add one of ms, s, m, h, d, w, like \"90s\""
        );
        assert_eq!(
            text("1.5h"),
            "has a fraction; combine units instead, like \"1h30m\" for 1.5h"
        );
        assert_eq!(
            text("7days"),
            "has the unknown unit `days`; use ms, s, m, h, d or w"
        );
        assert_eq!(
            text("0s"),
            "is zero; give a positive duration, like \"60s\""
        );
        let too_long = text("3651d");
        assert_eq!(too_long, "is longer than the maximum of 3650d (ten years)");
        // the message names the limit in force
        assert!(too_long.contains(&format_duration(MAX_TTL)));
    }

    #[test]
    fn formatted_durations_parse_back() {
        let f = |ms| format_duration(Duration::from_millis(ms));
        assert_eq!(f(7 * 86_400_000), "7d");
        assert_eq!(f(14 * 86_400_000), "14d");
        assert_eq!(f(3_600_000), "1h");
        assert_eq!(f(5_400_000), "90m");
        assert_eq!(f(60_000), "1m");
        assert_eq!(f(90_000), "90s");
        assert_eq!(f(100), "100ms");
        assert_eq!(f(1500), "1500ms");
        assert_eq!(format_duration(Duration::from_micros(2500)), "2ms");
        for ms in [1, 999, 1000, 61_000, 3_599_999, 86_400_000, 90_061_001] {
            assert_eq!(parse_duration(&f(ms)), Ok(Duration::from_millis(ms)));
        }
    }
}
