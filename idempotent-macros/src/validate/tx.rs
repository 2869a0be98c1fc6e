//! Checks of transactional mode (`tx = "PARAM"`, `table = "…"`): the parameter exists
//! and is a `&mut` reference (its type is checked by the runtime's `DedupTransaction`
//! bound), the arguments that cannot apply are rejected with the reason, and the table
//! name is an identifier.

use crate::attr::{Args, Errors, StoreArg};
use proc_macro2::Span;
use syn::spanned::Spanned;
use syn::{FnArg, Ident, ItemFn, LitStr, Pat, Type};

use idempotent_shared::{DEFAULT_OUTBOX_TABLE, DEFAULT_TABLE};

/// A validated `tx = "PARAM"`.
pub(crate) struct TxMode {
    /// The parameter, as the signature spells it (so the body's uses resolve to the
    /// reborrow the wrapper binds under the same name).
    pub(crate) param: Ident,
    /// The referenced type of the parameter (`T` of `&mut T`), where a type that is not
    /// a transaction is reported.
    pub(crate) ty_span: Span,
    /// The dedup table.
    pub(crate) table: String,
    /// `outbox = "PARAM"`: the handler emits messages written in the same transaction.
    pub(crate) outbox: Option<OutboxMode>,
}

/// A validated `outbox = "PARAM"` (with `tx`).
pub(crate) struct OutboxMode {
    /// The parameter, as the signature spells it.
    pub(crate) param: Ident,
    /// The referenced type of the parameter, where a type that is not `Outbox` is reported.
    pub(crate) ty_span: Span,
    /// The outbox table.
    pub(crate) table: String,
}

/// What a `&mut` parameter named by the attribute holds, for the messages.
struct ParamRole {
    /// The argument's name: `tx`, `outbox`.
    arg: &'static str,
    /// What the parameter holds, for the messages.
    holds: &'static str,
    /// The type the parameter must have, as a user writes it.
    ty: &'static str,
}

const TX: ParamRole = ParamRole {
    arg: "tx",
    holds: "the caller's transaction",
    ty: "&mut sqlx::Transaction<'_, DB>",
};

const OUTBOX: ParamRole = ParamRole {
    arg: "outbox",
    holds: "the messages the handler emits",
    ty: "&mut idempotent_runtime::outbox::Outbox",
};

/// `None` when `tx` is absent or wrong (the errors are in `errors`).
pub(crate) fn check(args: &Args, func: &ItemFn, errors: &mut Errors) -> Option<TxMode> {
    let Some(tx) = &args.tx else {
        if let Some(table) = &args.table {
            errors.at(
                table.span(),
                "`table` picks the dedup table of transactional mode; add `tx = \"PARAM\"`, \
                 or give the table to the store (`MySqlStore::with_table`, `PostgresStore::with_table`, …)",
            );
        }
        if let Some(outbox) = &args.outbox {
            errors.at(
                outbox.span(),
                "`outbox` needs `tx = \"PARAM\"`: the emitted messages are written in the caller's \
                 transaction, beside the business writes and the dedup row; add `tx`",
            );
        }
        if let Some(table) = &args.outbox_table {
            outbox_table_alone(table, errors);
        }
        return None;
    };
    conflicts(args, errors);
    let table = match &args.table {
        None => Some(DEFAULT_TABLE.to_owned()),
        Some(lit) => table_name("table", lit, errors),
    };
    let outbox = outbox(args, func, errors);
    let param = parameter(&TX, tx, func, errors);
    let (param, ty_span) = param?;
    if let Some(Some(o)) = &outbox
        && o.param == param
    {
        errors.at(
            o.param.span(),
            "`outbox` and `tx` name the same parameter; the handler takes the transaction and the \
             outbox as two parameters, like `tx: &mut sqlx::Transaction<'_, Postgres>, outbox: &mut Outbox`",
        );
        return None;
    }
    Some(TxMode {
        param,
        ty_span,
        table: table?,
        outbox: outbox?,
    })
}

/// `outbox = "PARAM"` and `outbox_table = "…"` of a transactional handler: `Some(None)`
/// without an outbox, `None` when one of them is wrong (reported in `errors`).
fn outbox(args: &Args, func: &ItemFn, errors: &mut Errors) -> Option<Option<OutboxMode>> {
    let Some(outbox) = &args.outbox else {
        if let Some(table) = &args.outbox_table {
            outbox_table_alone(table, errors);
            return None;
        }
        return Some(None);
    };
    let table = match &args.outbox_table {
        None => Some(DEFAULT_OUTBOX_TABLE.to_owned()),
        Some(lit) => table_name("outbox_table", lit, errors),
    };
    let (param, ty_span) = parameter(&OUTBOX, outbox, func, errors)?;
    Some(Some(OutboxMode {
        param,
        ty_span,
        table: table?,
    }))
}

fn outbox_table_alone(table: &LitStr, errors: &mut Errors) {
    errors.at(
        table.span(),
        "`outbox_table` picks the table of the messages a transactional handler emits; \
         add `outbox = \"PARAM\"` (and `tx = \"PARAM\"`), or remove `outbox_table`",
    );
}

/// The arguments that have no meaning when the dedup row lives in the caller's
/// transaction, each with the reason.
fn conflicts(args: &Args, errors: &mut Errors) {
    if let Some(store) = &args.store {
        let span = match store {
            StoreArg::Name(lit) => lit.span(),
            StoreArg::Expr(e) => e.span(),
        };
        errors.at(
            span,
            "`store` cannot be used with `tx`: the dedup row is written in the transaction's own database; \
             remove `store`, or remove `tx` to keep the record in the store",
        );
    }
    if let Some(lease) = &args.lease {
        errors.at(
            lease.span(),
            "`lease` cannot be used with `tx`: the claim is the row lock the transaction holds until it \
             commits or rolls back, so there is no lease to renew or expire; remove `lease`",
        );
    }
    if let Some(on_in_progress) = &args.on_in_progress {
        errors.at(
            on_in_progress.span(),
            "`on_in_progress` cannot be used with `tx`: a duplicate always waits on the row lock of the \
             transaction that claimed the key, then replays its committed output or, after a rollback, \
             claims the key itself; remove `on_in_progress`",
        );
    }
    if let Some(max_attempts) = &args.max_attempts {
        errors.at(
            max_attempts.span(),
            "`max_attempts` cannot be used with `tx`: a failed attempt rolls back with the caller's \
             transaction, and the attempt count written in it rolls back too; remove `max_attempts` \
             and dead-letter on the broker's delivery count (RocketMQ `reconsumeTimes`, \
             SQS `ApproximateReceiveCount`, RabbitMQ `x-delivery-count`)",
        );
    }
    if let Some(on_store_error) = &args.on_store_error {
        errors.at(
            on_store_error.span(),
            "`on_store_error` cannot be used with `tx`: the dedup row is written in the caller's \
             transaction, so a database failure fails that transaction too and there is nothing to run \
             without deduplication; remove `on_store_error`",
        );
    }
}

/// The parameter `tx` or `outbox` names: a plain `name: &mut T` parameter.
fn parameter(
    role: &ParamRole,
    lit: &LitStr,
    func: &ItemFn,
    errors: &mut Errors,
) -> Option<(Ident, Span)> {
    let ParamRole { arg, holds, ty } = role;
    let name = lit.value();
    let example = format!(
        "like `{arg} = \"{arg}\"` for `{arg}: {}`",
        ty.replace("DB", "Postgres")
    );
    if name == "self" {
        errors.at(
            lit.span(),
            format!("`{arg}` cannot be `self`: name the parameter that holds {holds}, {example}"),
        );
        return None;
    }
    if syn::parse_str::<Ident>(&name).is_err() {
        errors.at(
            lit.span(),
            format!(
                "`{arg} = {name:?}` is not a parameter name; name the parameter that holds {holds}, {example}"
            ),
        );
        return None;
    }
    for input in &func.sig.inputs {
        let FnArg::Typed(param) = input else { continue };
        let Pat::Ident(p) = &*param.pat else { continue };
        if p.ident != name {
            continue;
        }
        let Some(target) = mut_reference_target(&param.ty) else {
            let needs = match role.arg {
                "tx" => format!(
                    "transactional mode needs the caller's transaction as `{name}: {ty}` (DB = MySql, Postgres or Sqlite)"
                ),
                _ => format!("the handler's outbox is a parameter `{name}: {ty}`"),
            };
            errors.push(syn::Error::new_spanned(
                &param.ty,
                format!(
                    "`{arg} = {name:?}` names a parameter of type `{}`; {needs}",
                    type_text(&param.ty)
                ),
            ));
            return None;
        };
        return Some((p.ident.clone(), target.span()));
    }
    let params = super::parameters(func);
    let listed = super::listed_parameters(&params);
    let hint = if params.contains(&name) {
        format!(" as a plain name (`{name}: {ty}`), not inside a pattern")
    } else {
        String::new()
    };
    let what = match role.arg {
        "tx" => "the transaction",
        _ => "the outbox",
    };
    errors.at(
        lit.span(),
        format!("`{arg} = {name:?}`: {what} must be a parameter of this function{hint}; {listed}"),
    );
    None
}

/// `T` of a `&mut T` type.
fn mut_reference_target(ty: &Type) -> Option<&Type> {
    match ty {
        Type::Reference(r) if r.mutability.is_some() => Some(&r.elem),
        Type::Group(g) => mut_reference_target(&g.elem),
        Type::Paren(p) => mut_reference_target(&p.elem),
        _ => None,
    }
}

/// A type as source text, with the spacing a user writes.
fn type_text(ty: &Type) -> String {
    let s = quote::quote!(#ty).to_string();
    s.replace(" < ", "<")
        .replace("< ", "<")
        .replace(" >", ">")
        .replace("& ", "&")
        .replace(" ,", ",")
        .replace(" :: ", "::")
        .replace("' ", "'")
}

/// `table = "…"` or `outbox_table = "…"`: a name the SQL stores accept
/// ([`idempotent_shared::parse_table_name`]).
fn table_name(arg: &str, lit: &LitStr, errors: &mut Errors) -> Option<String> {
    let name = lit.value();
    if let Err(e) = idempotent_shared::parse_table_name(&name) {
        errors.at(
            lit.span(),
            format!(
                "`{arg} = {name:?}` is not a valid table name: {}; use letters, digits and `_`, \
                 optionally qualified by one schema, like `{arg} = \"billing.{}\"`",
                e.problem(),
                match arg {
                    "table" => DEFAULT_TABLE,
                    _ => DEFAULT_OUTBOX_TABLE,
                }
            ),
        );
        return None;
    }
    Some(name)
}
