//! The defaults and limits the attribute checks and fills in at compile time. The
//! runtime has the same values as constants (`Settings::DEFAULT`, `MIN_LEASE`,
//! `MAX_TTL`, `MAX_SCOPE_BYTES`, the SQL stores' `DEFAULT_TABLE`, the `"memory"`
//! store); a runtime test compares them through the hidden `__limits!` macro.

/// Longest accepted `ttl` or `lease`: ten years (every store can represent the deadline).
pub(crate) const MAX_DURATION_MS: u64 = 3650 * 24 * 3600 * 1000;
/// `ttl` when not given: 7 days.
pub(crate) const DEFAULT_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// `lease` when not given: 60 s.
pub(crate) const DEFAULT_LEASE_MS: u64 = 60 * 1000;
/// Shortest accepted `lease`.
pub(crate) const MIN_LEASE_MS: u64 = 100;
/// Longest accepted `scope`, in bytes.
pub(crate) const MAX_SCOPE_BYTES: usize = 200;
/// The dedup table when `table` is not given: the SQL stores' default.
pub(crate) const DEFAULT_TABLE: &str = "message_idempotent";
/// Longest identifier part of a table name the SQL stores accept.
pub(crate) const MAX_IDENT: usize = 63;
/// The store when `store` is not given.
pub(crate) const DEFAULT_STORE: &str = "memory";

/// The values above as a struct expression, for the runtime's test.
pub(crate) fn expr() -> proc_macro2::TokenStream {
    quote::quote! {{
        struct Limits {
            default_ttl_ms: u64,
            default_lease_ms: u64,
            min_lease_ms: u64,
            max_duration_ms: u64,
            max_scope_bytes: usize,
            max_ident: usize,
            default_table: &'static str,
            default_store: &'static str,
        }
        Limits {
            default_ttl_ms: #DEFAULT_TTL_MS,
            default_lease_ms: #DEFAULT_LEASE_MS,
            min_lease_ms: #MIN_LEASE_MS,
            max_duration_ms: #MAX_DURATION_MS,
            max_scope_bytes: #MAX_SCOPE_BYTES,
            max_ident: #MAX_IDENT,
            default_table: #DEFAULT_TABLE,
            default_store: #DEFAULT_STORE,
        }
    }}
}
