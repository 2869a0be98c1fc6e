//! The `#[idempotent]` attribute. Depend on `idempotent-runtime`, which re-exports it
//! and documents it in full.
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]
#![forbid(unsafe_code)]

mod attr;
mod expand;
mod type_names;
mod validate;

use proc_macro::TokenStream;
use quote::ToTokens;

/// Makes an async message handler idempotent: the body runs at most once per key
/// (per `ttl`), duplicates get the first run's output, failures are retried.
///
/// ```ignore
/// #[idempotent(key = "msg.id", store = "redis", ttl = "7d")]
/// async fn on_order_paid(msg: &OrderPaid) -> Result<Receipt, AppError> { /* … */ }
/// ```
///
/// See the `idempotent-runtime` crate for the arguments and the outcomes.
#[proc_macro_attribute]
pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    let item2: proc_macro2::TokenStream = item.clone().into();
    let func = match syn::parse::<syn::ItemFn>(item) {
        Ok(f) => f,
        Err(_) => {
            let err = syn::Error::new(
                proc_macro2::Span::call_site(),
                "`#[idempotent]` goes on an `async fn` with a body (a free function or a method in an `impl` block)",
            );
            return with_original(err, item2);
        }
    };

    let mut errors = attr::Errors::default();
    let mut parsed = attr::Args::default();
    let parser = syn::meta::parser(|meta| parsed.parse_one(meta, &mut errors));
    if let Err(e) = syn::parse::Parser::parse(parser, args) {
        errors.push(e);
    }
    let checked = validate::check(parsed, &func, &mut errors);
    match (errors.finish(), checked) {
        (None, Some(c)) => expand::expand(func, c).into(),
        (Some(e), _) => with_original(e, func.into_token_stream()),
        (None, None) => with_original(
            syn::Error::new(
                proc_macro2::Span::call_site(),
                "invalid `#[idempotent]` arguments",
            ),
            func.into_token_stream(),
        ),
    }
}

/// Emits the errors beside the untouched function, so the rest of the crate (and the
/// IDE) keeps seeing it.
fn with_original(err: syn::Error, original: proc_macro2::TokenStream) -> TokenStream {
    let mut out = err.to_compile_error();
    out.extend(original);
    out.into()
}
