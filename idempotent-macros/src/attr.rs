//! Parses `#[idempotent(key = "…", store = …, …)]` into typed arguments that keep
//! their spans.

use proc_macro2::Span;
use syn::meta::ParseNestedMeta;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Lit, LitInt, LitStr, Path};

/// Every argument the attribute accepts, for the "unknown argument" message.
pub(crate) const ARGUMENTS: &str = "`key`, `store`, `ttl`, `lease`, `max_attempts`, `scope`, \
     `fingerprint`, `on_store_error`, `on_in_progress`, `tx`, `table`, `outbox`, `outbox_table`, `crate`";

/// `store = "name"` or `store = PATH`.
pub(crate) enum StoreArg {
    Name(LitStr),
    Expr(Expr),
}

/// The parsed arguments; each keeps the span of its value for error messages.
#[derive(Default)]
pub(crate) struct Args {
    pub(crate) key: Option<LitStr>,
    pub(crate) store: Option<StoreArg>,
    pub(crate) ttl: Option<LitStr>,
    pub(crate) lease: Option<LitStr>,
    pub(crate) max_attempts: Option<LitInt>,
    pub(crate) scope: Option<LitStr>,
    pub(crate) fingerprint: Option<LitStr>,
    pub(crate) on_store_error: Option<LitStr>,
    pub(crate) on_in_progress: Option<LitStr>,
    pub(crate) tx: Option<LitStr>,
    pub(crate) table: Option<LitStr>,
    pub(crate) outbox: Option<LitStr>,
    pub(crate) outbox_table: Option<LitStr>,
    pub(crate) krate: Option<Path>,
    /// Arguments that were given with a value of the wrong shape (already reported),
    /// so that `key = msg.id` is not also reported as a missing `key`.
    pub(crate) rejected: Vec<String>,
}

/// Collects every problem so the user sees them all at once.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, e: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }

    pub(crate) fn at(&mut self, span: Span, msg: impl std::fmt::Display) {
        self.push(syn::Error::new(span, msg));
    }

    pub(crate) fn finish(self) -> Option<syn::Error> {
        self.0
    }
}

/// Strips the invisible groups `macro_rules!` fragments (`$x:expr`, `$x:literal`) carry.
pub(crate) fn ungroup(mut e: Expr) -> Expr {
    loop {
        match e {
            Expr::Group(g) => e = *g.expr,
            Expr::Paren(p) if matches!(*p.expr, Expr::Lit(_)) => e = *p.expr,
            other => return other,
        }
    }
}

fn parse_value(meta: &ParseNestedMeta<'_>) -> syn::Result<Expr> {
    Ok(ungroup(meta.value()?.parse::<Expr>()?))
}

fn expect_str(name: &str, example: &str, e: Expr) -> syn::Result<LitStr> {
    match e {
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => Ok(s),
        other => Err(syn::Error::new(
            other.span(),
            format!("`{name}` takes a string literal, like `{name} = \"{example}\"`"),
        )),
    }
}

impl Args {
    /// Parses one `name = value` pair; semantic problems go to `errors` so parsing
    /// continues and every problem is reported.
    pub(crate) fn parse_one(
        &mut self,
        meta: ParseNestedMeta<'_>,
        errors: &mut Errors,
    ) -> syn::Result<()> {
        let Some(ident) = meta.path.get_ident().cloned() else {
            let span = meta.path.span();
            if meta.input.peek(syn::Token![=]) {
                parse_value(&meta)?;
            }
            errors.at(
                span,
                format!("unknown `#[idempotent]` argument; expected one of {ARGUMENTS}"),
            );
            return Ok(());
        };
        let name = ident.to_string();
        // a value of the wrong shape is reported and parsing goes on with the next argument
        macro_rules! set_once {
            ($field:ident, $value:expr) => {{
                let value: syn::Result<_> = $value;
                if self.$field.is_some() || self.rejected.contains(&name) {
                    errors.at(ident.span(), format!("`{name}` is given twice; keep one"));
                } else {
                    match value {
                        Ok(v) => self.$field = Some(v),
                        Err(e) => {
                            errors.push(e);
                            self.rejected.push(name.clone());
                        }
                    }
                }
            }};
        }
        match name.as_str() {
            "key" => set_once!(key, expect_str("key", "msg.id", parse_value(&meta)?)),
            "ttl" => set_once!(ttl, expect_str("ttl", "7d", parse_value(&meta)?)),
            "lease" => set_once!(lease, expect_str("lease", "60s", parse_value(&meta)?)),
            "scope" => set_once!(scope, expect_str("scope", "orders", parse_value(&meta)?)),
            "fingerprint" => set_once!(
                fingerprint,
                expect_str(
                    "fingerprint",
                    "(msg.amount, msg.currency)",
                    parse_value(&meta)?
                )
            ),
            "on_store_error" => set_once!(
                on_store_error,
                expect_str("on_store_error", "fail", parse_value(&meta)?)
            ),
            "on_in_progress" => set_once!(
                on_in_progress,
                expect_str("on_in_progress", "reject", parse_value(&meta)?)
            ),
            "tx" => set_once!(tx, expect_str("tx", "tx", parse_value(&meta)?)),
            "table" => set_once!(
                table,
                expect_str("table", "message_idempotent", parse_value(&meta)?)
            ),
            "outbox" => set_once!(outbox, expect_str("outbox", "outbox", parse_value(&meta)?)),
            "outbox_table" => set_once!(
                outbox_table,
                expect_str("outbox_table", "idempotent_outbox", parse_value(&meta)?)
            ),
            "max_attempts" => {
                let v = match parse_value(&meta)? {
                    Expr::Lit(ExprLit {
                        lit: Lit::Int(i), ..
                    }) => Ok(i),
                    other => Err(syn::Error::new(
                        other.span(),
                        "`max_attempts` takes an integer literal, like `max_attempts = 5`",
                    )),
                };
                set_once!(max_attempts, v)
            }
            "store" => {
                let v = match parse_value(&meta)? {
                    Expr::Lit(ExprLit {
                        lit: Lit::Str(s), ..
                    }) => Ok(StoreArg::Name(s)),
                    Expr::Lit(other) => Err(syn::Error::new(
                        other.span(),
                        "`store` takes a registered store name, like `store = \"redis\"`, \
                         or a path to a store, like `store = ORDERS` or `store = redis()`",
                    )),
                    e => Ok(StoreArg::Expr(e)),
                };
                set_once!(store, v)
            }
            "crate" => {
                let v = match parse_value(&meta)? {
                    Expr::Lit(ExprLit {
                        lit: Lit::Str(s), ..
                    }) => s.parse::<Path>(),
                    Expr::Path(p) => Ok(p.path),
                    other => Err(syn::Error::new(
                        other.span(),
                        "`crate` takes the path of the runtime crate, like `crate = \"my_reexport::idempotent\"`",
                    )),
                };
                set_once!(krate, v)
            }
            _ => {
                if meta.input.peek(syn::Token![=]) {
                    parse_value(&meta)?;
                }
                let hint = match name.as_str() {
                    "keys" | "id" | "key_expr" => " (did you mean `key`?)",
                    "timeout" | "expiry" | "expire" | "retention" => " (did you mean `ttl`?)",
                    "retries" | "max_retries" | "attempts" => " (did you mean `max_attempts`?)",
                    "namespace" => " (did you mean `scope`?)",
                    "transaction" | "txn" | "in_tx" => " (did you mean `tx`?)",
                    "emit" | "emitter" | "publisher" => " (did you mean `outbox`?)",
                    _ => "",
                };
                errors.at(
                    ident.span(),
                    format!(
                        "unknown `#[idempotent]` argument `{name}`{hint}; expected one of {ARGUMENTS}"
                    ),
                );
            }
        }
        Ok(())
    }
}
