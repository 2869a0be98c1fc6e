//! The rule for SQL dedup table names.

use crate::MAX_IDENT_BYTES;
use alloc::borrow::ToOwned;
use alloc::string::String;
use core::fmt;

/// A valid table name, split at its `.`: borrowed from the text
/// [`parse_table_name`] was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableName<'a> {
    /// The schema (`billing` of `billing.message_idempotent`), if the name has one.
    pub schema: Option<&'a str>,
    /// The table (`message_idempotent`).
    pub table: &'a str,
}

/// Checks a table name by the rule every SQL store and the attribute's `table = "…"`
/// apply: one or two parts separated by `.` (`table` or `schema.table`), each part of
/// ASCII letters, digits and `_`, starting with a letter or `_`, and at most
/// [`MAX_IDENT_BYTES`] long.
///
/// A valid name needs no quoting rules beyond wrapping each part in quote characters:
/// it contains neither quotes nor whitespace nor anything else a statement could be
/// broken out of with.
///
/// ```
/// use idempotent_shared::{TableNameProblem, parse_table_name};
///
/// let name = parse_table_name("billing.dedup_2").unwrap();
/// assert_eq!((name.schema, name.table), (Some("billing"), "dedup_2"));
///
/// let err = parse_table_name("dedup-2").unwrap_err();
/// assert_eq!(err.problem(), TableNameProblem::Character);
/// assert_eq!(
///     err.to_string(),
///     "invalid table name \"dedup-2\": a character other than a letter, digit or `_`; \
///      use letters, digits and `_`, optionally qualified by one schema (`schema.table`)"
/// );
/// ```
pub fn parse_table_name(name: &str) -> Result<TableName<'_>, TableNameError> {
    let bad = |problem| TableNameError {
        name: name.to_owned(),
        problem,
    };
    let mut parts = name.split('.');
    let first = parts.next().unwrap_or_default();
    let second = parts.next();
    if parts.next().is_some() {
        return Err(bad(TableNameProblem::MoreThanOneDot));
    }
    for part in core::iter::once(first).chain(second) {
        let mut chars = part.chars();
        let Some(head) = chars.next() else {
            return Err(bad(TableNameProblem::EmptyPart));
        };
        if part.len() > MAX_IDENT_BYTES {
            return Err(bad(TableNameProblem::PartTooLong));
        }
        if !(head.is_ascii_alphabetic() || head == '_') {
            return Err(bad(TableNameProblem::Start));
        }
        if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(bad(TableNameProblem::Character));
        }
    }
    Ok(match second {
        Some(table) => TableName {
            schema: Some(first),
            table,
        },
        None => TableName {
            schema: None,
            table: first,
        },
    })
}

/// A name [`parse_table_name`] refused, and why.
///
/// Its [`Display`](fmt::Display) is the whole message the SQL stores give:
/// ``invalid table name "a-b": a character other than a letter, digit or `_`; use
/// letters, digits and `_`, optionally qualified by one schema (`schema.table`)``.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableNameError {
    name: String,
    problem: TableNameProblem,
}

impl TableNameError {
    /// The refused name, as given.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What is wrong with it.
    pub fn problem(&self) -> TableNameProblem {
        self.problem
    }
}

impl fmt::Display for TableNameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid table name {:?}: {}; use letters, digits and `_`, \
             optionally qualified by one schema (`schema.table`)",
            self.name, self.problem
        )
    }
}

impl core::error::Error for TableNameError {}

/// What is wrong with a table name; the first problem found, reading left to right.
///
/// Its [`Display`](fmt::Display) is a noun phrase (`a part is longer than 63 bytes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TableNameProblem {
    /// More than one `.` (`a.b.c`).
    MoreThanOneDot,
    /// A part is empty (``, `.a`, `a.`).
    EmptyPart,
    /// A part is longer than [`MAX_IDENT_BYTES`].
    PartTooLong,
    /// A part starts with a character other than a letter or `_` (`1abc`).
    Start,
    /// A character other than an ASCII letter, digit or `_` (`a-b`, `a b`, `é`).
    Character,
}

impl fmt::Display for TableNameProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MoreThanOneDot => f.write_str("more than one `.`"),
            Self::EmptyPart => f.write_str("empty name part"),
            Self::PartTooLong => write!(f, "a part is longer than {MAX_IDENT_BYTES} bytes"),
            Self::Start => f.write_str("a part starts with a character other than a letter or `_`"),
            Self::Character => f.write_str("a character other than a letter, digit or `_`"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn table_names() {
        let parts = |s| parse_table_name(s).map(|t| (t.schema, t.table));
        assert_eq!(
            parts("message_idempotent"),
            Ok((None, "message_idempotent"))
        );
        assert_eq!(parts("_x"), Ok((None, "_x")));
        assert_eq!(parts("A1"), Ok((None, "A1")));
        assert_eq!(parts("billing.dedup_2"), Ok((Some("billing"), "dedup_2")));
        let longest = "x".repeat(MAX_IDENT_BYTES);
        assert_eq!(parts(&longest), Ok((None, longest.as_str())));
        let qualified = alloc::format!("{longest}.{longest}");
        assert!(parse_table_name(&qualified).is_ok());

        use TableNameProblem::*;
        let longer = "x".repeat(MAX_IDENT_BYTES + 1);
        let long_schema = alloc::format!("{longer}.t");
        for (bad, problem) in [
            ("", EmptyPart),
            ("a.b.c", MoreThanOneDot),
            ("a..b", MoreThanOneDot),
            (".a", EmptyPart),
            ("a.", EmptyPart),
            ("1abc", Start),
            ("a.1b", Start),
            ("a-b", Character),
            ("a b", Character),
            (" a", Start),
            ("a\"b", Character),
            ("a`b", Character),
            ("a;drop table x", Character),
            ("é", Start),
            ("aé", Character),
            (longer.as_str(), PartTooLong),
            (long_schema.as_str(), PartTooLong),
        ] {
            let err = parse_table_name(bad).expect_err(bad);
            assert_eq!(err.problem(), problem, "{bad:?}");
            assert_eq!(err.name(), bad);
        }
    }

    #[test]
    fn messages() {
        let text = |s| parse_table_name(s).unwrap_err().to_string();
        let tail =
            "; use letters, digits and `_`, optionally qualified by one schema (`schema.table`)";
        assert_eq!(
            text("a.b.c"),
            alloc::format!("invalid table name \"a.b.c\": more than one `.`{tail}")
        );
        assert_eq!(
            text("a."),
            alloc::format!("invalid table name \"a.\": empty name part{tail}")
        );
        let longer = "x".repeat(64);
        assert_eq!(
            text(&longer),
            alloc::format!("invalid table name \"{longer}\": a part is longer than 63 bytes{tail}")
        );
        assert_eq!(
            text("1a"),
            alloc::format!(
                "invalid table name \"1a\": a part starts with a character other than a letter or `_`{tail}"
            )
        );
        assert_eq!(
            text("a\"b"),
            alloc::format!(
                "invalid table name \"a\\\"b\": a character other than a letter, digit or `_`{tail}"
            )
        );
    }
}
