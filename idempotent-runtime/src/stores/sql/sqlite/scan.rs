//! The SQLite dialect of the SQL stores' scans, statistics and operator changes
//! ([`common::scan`](crate::stores::sql::common::scan)).

use crate::stores::sql::common::scan::Dialect;

impl Dialect for sqlx::Sqlite {
    const NOW_US: &'static str = "CAST(unixepoch('subsec') * 1000000 AS INTEGER)";
    const QUOTE: char = '"';
    const GREATEST: &'static str = "max";
    const ROW_VALUES: bool = true;
    const ANY_TYPE: bool = true;
    fn param(_: usize) -> String {
        "?".to_owned()
    }
    fn scope_bytes(col: &str) -> String {
        format!("CAST({col} AS BLOB)")
    }
    fn byte_len(col: &str) -> String {
        format!("length(CAST({col} AS BLOB))")
    }
    fn int8(expr: &str) -> String {
        expr.to_owned()
    }
}
