//! The PostgreSQL dialect of the SQL stores' scans, statistics and operator changes
//! ([`common::scan`](crate::stores::sql::common::scan)).

use crate::stores::sql::common::scan::Dialect;

impl Dialect for sqlx::Postgres {
    const NOW_US: &'static str = "floor(extract(epoch FROM clock_timestamp()) * 1000000)::int8";
    const QUOTE: char = '"';
    const GREATEST: &'static str = "GREATEST";
    const ROW_VALUES: bool = true;
    fn param(n: usize) -> String {
        format!("${n}")
    }
    fn scope_bytes(col: &str) -> String {
        format!("convert_to({col}, 'UTF8')")
    }
    fn byte_len(col: &str) -> String {
        format!("octet_length({col})::int8")
    }
    fn int8(expr: &str) -> String {
        format!("({expr})::int8")
    }
}
