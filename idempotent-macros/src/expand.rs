//! Emits the rewritten handler.
//!
//! ```text
//! // Input:
//! #[idempotent(key = "msg.id", store = "redis")]
//! pub async fn on_paid(msg: &OrderPaid) -> Result<Receipt, AppError> { body }
//!
//! // Output (paths shortened):
//! pub async fn on_paid(msg: &OrderPaid) -> Result<Receipt, AppError> {
//!     fn __idempotent_handler() -> &'static str {      // names the handler in messages
//!         type_name_of_val(&__idempotent_handler)
//!     }
//!     static SCOPE: __private::DefaultScope = DefaultScope::new(
//!         concat!(module_path!(), "::", "on_paid"),    // the default scope, a constant
//!         __idempotent_handler,
//!     );
//!     static CONFIG: __private::Config = Config {
//!         scope: None,                                 // `Some("…")` for `scope = "…"`
//!         settings: ConfigSettings::DEFAULT.with_ttl(/* only the arguments given */),
//!     };
//!     let mut key = KeyBuilder::new();
//!     __private::key_part(&mut key, &(msg.id));        // one call per tuple element
//!     __private::execute(
//!         &CONFIG,
//!         key,
//!         // the explicit scope, or the default scope unless another handler of this
//!         // process has it (then `Err(Error::InvalidSettings)`: nothing is claimed or run)
//!         SCOPE.get(CONFIG.scope),
//!         StoreArg::Named("redis"),                    // `store = ORDERS`: see `typed_store`
//!         None,                                        // `Some(fingerprint(&(…)))`
//!         async move { let ret: Result<Receipt, AppError> = { body }; ret },
//!     ).await
//! }
//! ```
//!
//! The default scope is the module path and the fn name, `my_crate::module::on_paid`,
//! written as a constant. A method with a `self` receiver calls
//! `SCOPE.get_for(CONFIG.scope, type_name::<Self>())` instead, and its default scope
//! also names its `Self` type, `my_crate::module::Orders::handle`: an attribute on a fn
//! sees neither the enclosing impl nor whether there is one, so the type's identifier is
//! read at run time from its type name (generic arguments left out), and `validate`
//! refuses a method without `scope` if this compiler prints type names in a form that
//! reading does not expect (see `type_names`). Two handlers can still have the same
//! default scope (associated fns without a receiver named alike in two impls of one
//! module, two traits' methods of one name for one type); the `DefaultScope` static is
//! the handler's identity in a process-wide guard that refuses the second one. For a
//! method, each `Self` type (its generic arguments erased) is a handler of its own.

use crate::attr::StoreArg;
use crate::validate::{Checked, TxMode};
use proc_macro2::{Literal, Span, TokenStream};
use quote::{quote, quote_spanned};
use std::time::Duration;
use syn::ext::IdentExt;
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
    let marker = quote_spanned!(site=> __idempotent_handler);
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
            let name = idempotent_shared::DEFAULT_STORE;
            quote!(#private::StoreArg::Named(#name))
        }
        Some(StoreArg::Name(lit)) => quote!(#private::StoreArg::Named(#lit)),
        Some(StoreArg::Expr(e)) => typed_store(&private, e),
    };

    let scope = match &c.scope {
        Some(s) => quote!(#private::core::option::Option::Some(#s)),
        None => quote!(#private::core::option::Option::None),
    };
    // the default scope, a constant: the module path and the fn name
    let fn_name = sig.ident.unraw().to_string();
    // the explicit scope, or the default scope once the guard let this handler have it;
    // a method's default scope also names its `Self` type, and the method is a handler
    // per `Self` type (its generic arguments erased)
    let default_scope_get = match sig.receiver() {
        Some(_) => quote! {
            #default_scope.get_for(#config.scope, #private::core::any::type_name::<Self>())
        },
        None => quote!(#default_scope.get(#config.scope)),
    };
    // the default-scope static, and the marker fn naming the handler in the guard's
    // messages (never in a record)
    let scope_items = quote! {
        #[allow(clippy::items_after_statements)]
        fn #marker() -> &'static str {
            #private::core::any::type_name_of_val(&#marker)
        }
        static #default_scope: #private::DefaultScope = #private::DefaultScope::new(
            #private::core::concat!(#private::core::module_path!(), "::", #fn_name),
            #marker,
        );
    };
    // the runtime's defaults, changed only where an argument was given
    // whole milliseconds, at most `MAX_TTL`: an unsuffixed literal, which `from_millis` types
    let from_millis = |d: Duration| {
        let ms = Literal::u128_unsuffixed(d.as_millis());
        quote!(#private::Duration::from_millis(#ms))
    };
    let mut settings = quote!(#private::ConfigSettings::DEFAULT);
    if let Some(d) = c.ttl {
        let ttl = from_millis(d);
        settings = quote!(#settings.with_ttl(#ttl));
    }
    if let Some(d) = c.lease {
        let lease = from_millis(d);
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
    let ttl = match c.ttl {
        Some(d) => from_millis(d),
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
            scope_get: &default_scope_get,
            fingerprint: &fingerprint,
            ret_ty: &ret_ty,
            ttl: &ttl,
        };
        let body = expand_tx(tx, &parts, quote!(#(#key_parts)*), &block);
        return quote! {
            #(#attrs)*
            #vis #defaultness #sig {
                #scope_items
                #body
            }
        };
    }

    quote! {
        #(#attrs)*
        #vis #defaultness #sig {
            #scope_items
            static #config: #private::Config = #private::Config {
                scope: #scope,
                settings: #settings,
            };
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
    /// the expression reading the scope from the default-scope static
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
/// // Output (paths shortened; the marker fn, the default-scope static and key as above):
/// static CONFIG: __private::TxConfig = /* scope, ttl, table: "message_idempotent" */;
/// // a scope refused by the guard comes back from `call.claim` before `tx` is used
/// let (call, span) = __private::TxCall::new(&CONFIG, SCOPE.get(CONFIG.scope), key, None);
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
///
/// With `outbox = "outbox"` the transaction goes through `outbox_tx_conn` (which also
/// needs `OutboxTransaction`), `call.bind(outbox_param(&mut *outbox))` binds the
/// outbox to the key before the claim, the body reborrows `outbox` as it does `tx`, and
/// `claim.finish_with_outbox(conn, outbox, ret)` writes the emitted messages before the
/// completion.
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
    let outbox_table = match &tx.outbox {
        Some(o) => {
            let t = &o.table;
            quote!(#private::core::option::Option::Some(#t))
        }
        None => quote!(#private::core::option::Option::None),
    };
    // spanned at the parameters' types: a type that is not a transaction (or not an
    // outbox) is reported there
    let (conn, bind, reborrow_outbox, finish) = match &tx.outbox {
        None => {
            let conn = quote_spanned! {tx.ty_span=> #private::tx_conn(&mut *#param) };
            let finish = quote!(#claim.finish(#conn, #ret).await);
            (conn, quote!(), quote!(), finish)
        }
        Some(o) => {
            let outbox = &o.param;
            let conn = quote_spanned! {tx.ty_span=> #private::outbox_tx_conn(&mut *#param) };
            let outbox_ref = quote_spanned! {o.ty_span=> #private::outbox_param(&mut *#outbox) };
            let bind = quote!(#call.bind(#outbox_ref););
            let reborrow = quote! {
                #[allow(unused_variables)]
                let #outbox = &mut *#outbox;
            };
            let finish = quote!(#claim.finish_with_outbox(#conn, #outbox_ref, #ret).await);
            (conn, bind, reborrow, finish)
        }
    };
    quote! {
        static #config: #private::TxConfig = #private::TxConfig {
            scope: #scope,
            ttl: #ttl,
            table: #table,
            outbox_table: #outbox_table,
        };
        let mut #key = #private::KeyBuilder::new();
        #key_parts
        let (#call, #span) = #private::TxCall::new(&#config, #scope_get, #key, #fingerprint);
        #private::Instrument::instrument(
            async move {
                #bind
                let #claim = match #call.claim(#conn).await {
                    #private::core::ops::ControlFlow::Continue(#claim) => #claim,
                    #private::core::ops::ControlFlow::Break(#done) => return #done,
                };
                let #ret: #ret_ty = {
                    #[allow(unused_variables)]
                    let #param = &mut *#param;
                    #reborrow_outbox
                    #claim.scoped(async move {
                        #[allow(unreachable_code, clippy::let_and_return, clippy::needless_return)]
                        let #ret: #ret_ty = #block;
                        #[allow(unreachable_code)]
                        #ret
                    })
                    .await
                };
                #finish
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
    fn the_default_scope_is_the_module_path_and_the_fn_name() {
        let rt = ":: idempotent_runtime :: __private";
        let scope = |name: &str| {
            format!(
                "{rt} :: core :: concat ! ({rt} :: core :: module_path ! () , \"::\" , \"{name}\")"
            )
        };
        let free = expand(
            quote::quote!(key = "msg.id"),
            quote::quote!(
                async fn handle(msg: &Msg) -> Result<(), Error> {
                    Ok(())
                }
            ),
        );
        assert!(free.contains(&scope("handle")), "{free}");
        assert!(
            free.contains("__IDEMPOTENT_SCOPE . get (__IDEMPOTENT_CONFIG . scope)"),
            "{free}"
        );
        // the type name of the marker fn only names the handler in messages
        assert_eq!(free.matches("type_name").count(), 1, "{free}");

        let raw = expand(
            quote::quote!(key = "msg.id"),
            quote::quote!(
                async fn r#match(msg: &Msg) -> Result<(), Error> {
                    Ok(())
                }
            ),
        );
        assert!(raw.contains(&scope("match")), "{raw}");

        let method = expand(
            quote::quote!(key = "msg.id"),
            quote::quote!(
                async fn handle(&self, msg: &Msg) -> Result<(), Error> {
                    Ok(())
                }
            ),
        );
        assert!(method.contains(&scope("handle")), "{method}");
        assert!(
            method.contains(&format!(
                "__IDEMPOTENT_SCOPE . get_for (__IDEMPOTENT_CONFIG . scope , {rt} :: core :: any :: type_name :: < Self > ())"
            )),
            "{method}"
        );
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
