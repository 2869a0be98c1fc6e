//! The MySQL (and MariaDB) dialect of the SQL stores' scans, statistics and operator changes
//! ([`common::scan`](crate::stores::sql::common::scan)).

use crate::stores::sql::common::scan::Dialect;

impl Dialect for sqlx::MySql {
    const NOW_US: &'static str =
        "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))";
    const QUOTE: char = '`';
    const GREATEST: &'static str = "GREATEST";
    const ROW_VALUES: bool = false;
    fn param(_: usize) -> String {
        "?".to_owned()
    }
    fn scope_bytes(col: &str) -> String {
        format!("CAST({col} AS BINARY)")
    }
    fn byte_len(col: &str) -> String {
        format!("CAST(LENGTH({col}) AS SIGNED)")
    }
    fn int8(expr: &str) -> String {
        format!("CAST({expr} AS SIGNED)")
    }
}
