//! Emits the rewritten handler.
//!
//! ```text
//! // Input:
//! #[idempotent(key = "msg.id", store = "redis")]
//! pub async fn on_paid(msg: &OrderPaid) -> Result<Receipt, AppError> { body }
//!
//! // Output (paths shortened):
//! pub async fn on_paid(msg: &OrderPaid) -> Result<Receipt, AppError> {
//!     fn __idempotent_scope() {}                       // its type name is the default scope
//!     static CONFIG: __private::Config = Config {
//!         scope: None,                                 // `Some("…")` for `scope = "…"`
//!         settings: ConfigSettings::DEFAULT.with_ttl(/* only the arguments given */),
//!     };
//!     static SCOPE: __private::DefaultScope = DefaultScope::new();
//!     let mut key = KeyBuilder::new();
//!     __private::key_part(&mut key, &(msg.id));        // one call per tuple element
//!     __private::execute(
//!         &CONFIG,
//!         key,
//!         // the explicit scope, or (worked out once) the type name of
//!         // `__idempotent_scope` without `::{{closure}}::__idempotent_scope`
//!         SCOPE.get(CONFIG.scope, || { /* type_name_of_val(&__idempotent_scope) … */ }),
//!         StoreArg::Named("redis"),                    // `store = ORDERS`: see `typed_store`
//!         None,                                        // `Some(fingerprint(&(…)))`
//!         async move { let ret: Result<Receipt, AppError> = { body }; ret },
//!     ).await
//! }
//! ```
//!
//! The marker fn is declared in the async fn's body, which rustc names
//! `on_paid::{{closure}}`; the generated code strips that segment, so the default scope
//! is `my_crate::module::on_paid` (`my_crate::module::Type::on_paid` for a method,
//! `<my_crate::Type as my_crate::Trait>::on_paid` in a trait impl). A method with a
//! `self` receiver calls `SCOPE.get_for(…, type_name::<Self>())` instead, which adds the
//! implementing type where the path lacks it: a trait's default method
//! (`my_crate::Trait::on_paid for my_crate::Type`).

use crate::attr::StoreArg;
use crate::validate::{Checked, TxMode};
use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Expr, ItemFn, ReturnType};

pub(crate) fn expand(func: ItemFn, c: Checked) -> TokenStream {
    let ItemFn {
        attrs,
        vis,
        modifiers,
        sig,
        block,
    } = func;
    let defaultness = modifiers.defaultness;
    let krate = &c.krate;
    let private = quote!(#krate::__private);
    let site = Span::mixed_site();
    let key = quote_spanned!(site=> __idempotent_key);
    let config = quote_spanned!(site=> __IDEMPOTENT_CONFIG);
    let default_scope = quote_spanned!(site=> __IDEMPOTENT_SCOPE);
    let marker = quote_spanned!(site=> __idempotent_scope);
    let ret = quote_spanned!(site=> __idempotent_ret);

    let key_parts = c.key_parts.iter().map(|part| {
        quote_spanned! {part.span()=>
            #private::key_part(&mut #key, &(#part));
        }
    });

    let fingerprint = match &c.fingerprint {
        None => quote!(#private::core::option::Option::None),
        Some(fp) => {
            // a tuple is borrowed element by element so fields are not moved out of
            // borrowed messages; `(&a, &b)` serializes exactly like `(a, b)`
            let value = match fp {
                Expr::Tuple(t) => {
                    let elems = t.elems.iter();
                    quote!((#(&(#elems),)*))
                }
                other => quote!(#other),
            };
            quote_spanned! {fp.span()=>
                #private::core::option::Option::Some(#private::fingerprint(&#value))
            }
        }
    };

    let store = match &c.store {
        None => {
            let name = crate::limits::DEFAULT_STORE;
            quote!(#private::StoreArg::Named(#name))
        }
        Some(StoreArg::Name(lit)) => quote!(#private::StoreArg::Named(#lit)),
        Some(StoreArg::Expr(e)) => typed_store(&private, e),
    };

    let scope = match &c.scope {
        Some(s) => quote!(#private::core::option::Option::Some(#s)),
        None => quote!(#private::core::option::Option::None),
    };
    // the marker's path, without its own name and without the `{{closure}}` segment of
    // the async fn's body it is declared in: `my_crate::orders::Orders::handle`
    let name = quote_spanned!(site=> __idempotent_name);
    let path = quote! {{
        let #name: &'static str = #private::core::any::type_name_of_val(&#marker);
        let #name = #name.strip_suffix("::__idempotent_scope").unwrap_or(#name);
        #name.strip_suffix("::{{closure}}").unwrap_or(#name)
    }};
    // a method's path may not name `Self` (a trait's default method, a generic type's
    // method): its default scope then adds the type name of `Self`
    let self_ty = sig
        .receiver()
        .map(|_| quote!(#private::core::any::type_name::<Self>()));
    // the explicit scope, or the default worked out once (per `Self` type for methods)
    let default_scope_get = match &self_ty {
        Some(self_ty) => {
            quote!(#default_scope.get_for(#config.scope, || #path, #self_ty))
        }
        None => quote!(#default_scope.get(#config.scope, || #path)),
    };
    // the runtime's defaults, changed only where an argument was given
    let from_millis = |ms: u64| quote!(#private::Duration::from_millis(#ms));
    let mut settings = quote!(#private::ConfigSettings::DEFAULT);
    if let Some(ms) = c.ttl_ms {
        let ttl = from_millis(ms);
        settings = quote!(#settings.with_ttl(#ttl));
    }
    if let Some(ms) = c.lease_ms {
        let lease = from_millis(ms);
        settings = quote!(#settings.with_lease(#lease));
    }
    if let Some(n) = c.max_attempts {
        settings = quote!(#settings.with_max_attempts(#private::core::option::Option::Some(#n)));
    }
    if c.on_store_error_process {
        settings = quote!(#settings.with_on_store_error(#private::OnStoreError::Process));
    }
    if c.on_in_progress_wait {
        settings = quote!(#settings.with_on_in_progress(#private::OnInProgress::Wait));
    }
    let ttl = match c.ttl_ms {
        Some(ms) => from_millis(ms),
        None => quote!(#private::ConfigSettings::DEFAULT.ttl),
    };

    let ret_ty = match &sig.output {
        ReturnType::Type(_, ty) => quote!(#ty),
        ReturnType::Default => quote!(()),
    };

    if let Some(tx) = &c.tx {
        let parts = Parts {
            private: &private,
            scope: &scope,
            config: &config,
            default_scope: &default_scope,
            scope_get: &default_scope_get,
            fingerprint: &fingerprint,
            ret_ty: &ret_ty,
            ttl: &ttl,
        };
        let body = expand_tx(tx, &parts, quote!(#(#key_parts)*), &block);
        return quote! {
            #(#attrs)*
            #vis #defaultness #sig {
                #[allow(non_snake_case, dead_code, clippy::items_after_statements)]
                fn #marker() {}
                #body
            }
        };
    }

    quote! {
        #(#attrs)*
        #vis #defaultness #sig {
            #[allow(non_snake_case, dead_code, clippy::items_after_statements)]
            fn #marker() {}
            static #config: #private::Config = #private::Config {
                scope: #scope,
                settings: #settings,
            };
            static #default_scope: #private::DefaultScope = #private::DefaultScope::new();
            let mut #key = #private::KeyBuilder::new();
            #(#key_parts)*
            #private::execute(
                &#config,
                #key,
                #default_scope_get,
                #store,
                #fingerprint,
                async move {
                    #[allow(unreachable_code, clippy::let_and_return, clippy::needless_return)]
                    let #ret: #ret_ty = #block;
                    #[allow(unreachable_code)]
                    #ret
                },
            )
            .await
        }
    }
}

/// What the tx-mode expansion shares with the store mode.
struct Parts<'a> {
    private: &'a TokenStream,
    scope: &'a TokenStream,
    /// the config static's name
    config: &'a TokenStream,
    /// the default-scope static's name, and the expression reading the scope from it
    default_scope: &'a TokenStream,
    scope_get: &'a TokenStream,
    fingerprint: &'a TokenStream,
    ret_ty: &'a TokenStream,
    /// the ttl: the given one, or the runtime's default
    ttl: &'a TokenStream,
}

/// `tx = "PARAM"`: the claim and the completion are written through the caller's
/// transaction, around the body, which uses the same transaction in between.
///
/// ```text
/// // Input:
/// #[idempotent(key = "msg.id", tx = "tx")]
/// async fn on_paid(msg: &Paid, tx: &mut Transaction<'_, Postgres>) -> Result<Receipt, AppError> { body }
///
/// // Output (paths shortened; the marker fn and key as above):
/// static CONFIG: __private::TxConfig = /* scope, ttl, table: "message_idempotent" */;
/// static SCOPE: __private::DefaultScope = DefaultScope::new();
/// let (call, span) = __private::TxCall::new(&CONFIG, SCOPE.get(CONFIG.scope, || …), key, None);
/// Instrument::instrument(async move {
///     let claim = match call.claim(__private::tx_conn(&mut *tx)).await {
///         ControlFlow::Continue(claim) => claim,         // claimed: run the body
///         ControlFlow::Break(done) => return done,       // replayed output or error
///     };
///     let ret: Result<Receipt, AppError> = {
///         let tx = &mut *tx;                             // the body reborrows the transaction
///         claim.scoped(async move { let ret: Result<Receipt, AppError> = { body }; ret }).await
///     };
///     claim.finish(__private::tx_conn(&mut *tx), ret).await  // completion in the same transaction
/// }, span).await
/// ```
fn expand_tx(
    tx: &TxMode,
    p: &Parts<'_>,
    key_parts: TokenStream,
    block: &syn::Block,
) -> TokenStream {
    let Parts {
        private,
        scope,
        config,
        default_scope,
        scope_get,
        fingerprint,
        ret_ty,
        ttl,
    } = p;
    let site = Span::mixed_site();
    let key = quote_spanned!(site=> __idempotent_key);
    let call = quote_spanned!(site=> __idempotent_call);
    let span = quote_spanned!(site=> __idempotent_span);
    let claim = quote_spanned!(site=> __idempotent_claim);
    let ret = quote_spanned!(site=> __idempotent_ret);
    let done = quote_spanned!(site=> __idempotent_done);
    let param = &tx.param;
    let table = &tx.table;
    // spanned at the parameter's type: a type that is not a transaction is reported there
    let conn = quote_spanned! {tx.ty_span=>
        #private::tx_conn(&mut *#param)
    };
    quote! {
        static #config: #private::TxConfig = #private::TxConfig {
            scope: #scope,
            ttl: #ttl,
            table: #table,
        };
        static #default_scope: #private::DefaultScope = #private::DefaultScope::new();
        let mut #key = #private::KeyBuilder::new();
        #key_parts
        let (#call, #span) = #private::TxCall::new(&#config, #scope_get, #key, #fingerprint);
        #private::Instrument::instrument(
            async move {
                let #claim = match #call.claim(#conn).await {
                    #private::core::ops::ControlFlow::Continue(#claim) => #claim,
                    #private::core::ops::ControlFlow::Break(#done) => return #done,
                };
                let #ret: #ret_ty = {
                    #[allow(unused_variables)]
                    let #param = &mut *#param;
                    #claim.scoped(async move {
                        #[allow(unreachable_code, clippy::let_and_return, clippy::needless_return)]
                        let #ret: #ret_ty = #block;
                        #[allow(unreachable_code)]
                        #ret
                    })
                    .await
                };
                #claim.finish(#conn, #ret).await
            },
            #span,
        )
        .await
    }
}

/// `store = PATH`: the expression (a `static` that derefs to a store, or a call
/// returning a `&'static` store) as a `&'static dyn Store`, through a local trait whose
/// `on_unimplemented` message tells what `store = …` accepts. A plain coercion would
/// report rustc's generic "the trait bound `X: Store` is not satisfied" instead.
///
/// ```text
/// // Input:  store = ORDERS
/// // Output:
/// StoreArg::Typed({
///     trait __IdempotentTypedStore { fn __idempotent_store(&'static self) -> &'static dyn Store; }
///     impl<S: Store> __IdempotentTypedStore for S { … }
///     impl __IdempotentTypedStore for dyn Store { … }
///     __IdempotentTypedStore::__idempotent_store(&*(ORDERS))
/// })
/// ```
fn typed_store(private: &TokenStream, e: &Expr) -> TokenStream {
    let site = Span::mixed_site();
    let tr = quote_spanned!(site=> __IdempotentTypedStore);
    let method = quote_spanned!(site=> __idempotent_store);
    let store = quote!(#private::StoreTrait);
    let get = quote_spanned! {e.span()=>
        #tr::#method(&*(#e))
    };
    quote! {
        #private::StoreArg::Typed({
            #[diagnostic::on_unimplemented(
                message = "`{Self}` is not an idempotency store",
                label = "`store = …` must give a store",
                note = "pass a `static` that derefs to a store, like `static ORDERS: LazyLock<MemoryStore>`, \
                        or a call that returns a `&'static` store, like `store = redis()`",
                note = "to use a store registered with `register_store`, quote its name: `store = \"orders\"`"
            )]
            trait #tr {
                fn #method(&'static self) -> &'static dyn #store;
            }
            impl<S: #store> #tr for S {
                fn #method(&'static self) -> &'static dyn #store {
                    self
                }
            }
            impl #tr for dyn #store {
                fn #method(&'static self) -> &'static dyn #store {
                    self
                }
            }
            #get
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::attr::{Args, Errors};
    use crate::validate;

    fn expand(args: proc_macro2::TokenStream, item: proc_macro2::TokenStream) -> String {
        let func: syn::ItemFn = syn::parse2(item).unwrap();
        let mut parsed = Args::default();
        let mut errors = Errors::default();
        let parser = syn::meta::parser(|meta| parsed.parse_one(meta, &mut errors));
        syn::parse::Parser::parse2(parser, args).unwrap();
        let checked = validate::check(parsed, &func, &mut errors).unwrap();
        assert!(errors.finish().is_none());
        super::expand(func, checked).to_string()
    }

    #[test]
    fn crate_override_is_the_only_path_to_the_runtime() {
        let item = quote::quote! {
            async fn handle(msg: &Msg) -> Result<(), Error> { Ok(()) }
        };
        let default = expand(quote::quote!(key = "msg.id"), item.clone());
        assert!(default.contains(":: idempotent_runtime :: __private :: execute"));

        let out = expand(
            quote::quote!(
                key = "msg.id",
                store = ORDERS,
                fingerprint = "msg.amount",
                crate = "my::rt"
            ),
            item,
        );
        assert!(!out.contains("idempotent_runtime"), "{out}");
        assert!(out.contains("my :: rt :: __private :: execute"), "{out}");
        assert!(out.contains("my :: rt :: __private :: StoreTrait"), "{out}");
    }
}
