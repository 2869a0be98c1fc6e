//! Checks the arguments against the function and turns them into what `expand` emits.

mod tx;

use crate::attr::{Args, Errors, StoreArg};
use proc_macro2::{Group, Span, TokenStream, TokenTree};
use std::collections::BTreeSet;
use std::time::Duration;
use syn::spanned::Spanned;
use syn::visit::Visit;
use syn::{Expr, FnArg, ItemFn, LitStr, Pat, Path, ReturnType, Type};
pub(crate) use tx::TxMode;

use idempotent_shared::{DEFAULT_LEASE, DEFAULT_TTL, MAX_SCOPE_BYTES, MIN_LEASE, format_duration};

/// Everything `expand` needs, validated.
pub(crate) struct Checked {
    pub(crate) key_parts: Vec<Expr>,
    pub(crate) fingerprint: Option<Expr>,
    pub(crate) store: Option<StoreArg>,
    /// `ttl` as given (whole milliseconds); `None` leaves the runtime's default.
    pub(crate) ttl: Option<Duration>,
    /// `lease` as given (whole milliseconds); `None` leaves the runtime's default.
    pub(crate) lease: Option<Duration>,
    pub(crate) max_attempts: Option<u32>,
    pub(crate) scope: Option<LitStr>,
    pub(crate) on_store_error_process: bool,
    pub(crate) on_in_progress_wait: bool,
    /// `tx = "PARAM"`: the dedup row is written in the caller's transaction.
    pub(crate) tx: Option<TxMode>,
    pub(crate) krate: Path,
}

pub(crate) fn check(args: Args, func: &ItemFn, errors: &mut Errors) -> Option<Checked> {
    check_signature(func, errors);
    let params = parameters(func);

    let key_parts = match &args.key {
        None if args.rejected.iter().any(|a| a == "key") => None,
        None => {
            errors.at(
                Span::call_site(),
                "missing `key`: name the message's unique id, like `#[idempotent(key = \"msg.id\")]`",
            );
            None
        }
        Some(lit) => expression(lit, "key", &params, errors).map(|e| match e {
            Expr::Tuple(t) => t.elems.into_iter().collect(),
            other => vec![other],
        }),
    };
    let fingerprint = args
        .fingerprint
        .as_ref()
        .and_then(|lit| expression(lit, "fingerprint", &params, errors));

    let ttl = args.ttl.as_ref().and_then(|l| duration(l, "ttl", errors));
    let lease = args
        .lease
        .as_ref()
        .and_then(|l| duration(l, "lease", errors));
    let lease = match (lease, &args.lease) {
        (Some(given), Some(l)) if given < MIN_LEASE => {
            errors.at(
                l.span(),
                format!(
                    "`lease = {:?}` is shorter than the minimum of 100ms: the lease is renewed every \
                     third of it, and a store round trip under load can take longer than that, so the \
                     claim would lapse under a running handler and duplicates would run it again; \
                     use `lease = \"100ms\"` or more (the default is 60s)",
                    l.value()
                ),
            );
            None
        }
        (lease, _) => lease,
    };
    let ttl_in_force = ttl.unwrap_or(DEFAULT_TTL);
    let lease_in_force = lease.unwrap_or(DEFAULT_LEASE);
    // compared only when both are valid (or defaults): a bad one is reported alone; tx
    // mode has no lease (a given one is reported by the tx checks)
    let both_valid = (args.ttl.is_none() || ttl.is_some())
        && (args.lease.is_none() || lease.is_some())
        && args.tx.is_none();
    if both_valid && lease_in_force >= ttl_in_force {
        match (&args.lease, &args.ttl) {
            (Some(l), _) => errors.at(
                l.span(),
                format!(
                    "`lease = {:?}` must be shorter than the ttl ({}); a claim cannot outlive the record that holds it",
                    l.value(),
                    format_duration(ttl_in_force)
                ),
            ),
            (None, Some(t)) => errors.at(
                t.span(),
                format!(
                    "`ttl = {:?}` is not longer than the default lease of 60s; add a shorter `lease`, like `lease = \"5s\"`",
                    t.value()
                ),
            ),
            (None, None) => {}
        }
    }

    let max_attempts = args.max_attempts.as_ref().and_then(|lit| {
        match lit.base10_parse::<u32>() {
            Ok(0) => {
                errors.at(
                    lit.span(),
                    "`max_attempts = 0` would never run the handler; use 1 or more, or leave it out for unlimited attempts",
                );
                None
            }
            Ok(n) => Some(n),
            Err(_) => {
                errors.at(
                    lit.span(),
                    format!("`max_attempts` must be a whole number from 1 to {}", u32::MAX),
                );
                None
            }
        }
    });

    if let Some(scope) = &args.scope {
        let v = scope.value();
        if v.trim().is_empty() {
            errors.at(
                scope.span(),
                "`scope` cannot be empty; name the consumer, like `scope = \"orders\"`, or leave it out to use the handler's path",
            );
        } else if v.len() > MAX_SCOPE_BYTES {
            errors.at(
                scope.span(),
                format!(
                    "`scope` is {} bytes long; keep it under {MAX_SCOPE_BYTES}",
                    v.len()
                ),
            );
        }
    }

    // a method's default scope names its `Self` type as this compiler prints it
    if args.scope.is_none()
        && func.sig.receiver().is_some()
        && let Some((printed, expected)) = crate::type_names::unreadable()
    {
        let expected = expected.map_or("no name".to_owned(), |e| format!("`{e}`"));
        errors.at(
            Span::call_site(),
            format!(
                "this method's default scope would name its `Self` type, and this compiler \
                 prints type names in a form the attribute does not read (`{printed}`, \
                 expected {expected}): set `scope = \"…\"`, so that the scope in the stored \
                 records cannot change with the compiler"
            ),
        );
    }

    let on_store_error_process = choice(
        args.on_store_error.as_ref(),
        "on_store_error",
        &["fail", "process"],
        errors,
    ) == Some(1);
    let on_in_progress_wait = choice(
        args.on_in_progress.as_ref(),
        "on_in_progress",
        &["reject", "wait"],
        errors,
    ) == Some(1);

    let tx = tx::check(&args, func, errors);
    if args.tx.is_some() && tx.is_none() {
        return None;
    }

    let krate = args
        .krate
        .unwrap_or_else(|| syn::parse_quote!(::idempotent_runtime));

    Some(Checked {
        key_parts: key_parts?,
        fingerprint,
        store: args.store,
        ttl,
        lease,
        max_attempts,
        scope: args.scope,
        on_store_error_process,
        on_in_progress_wait,
        tx,
        krate,
    })
}

fn check_signature(func: &ItemFn, errors: &mut Errors) {
    let sig = &func.sig;
    if sig.asyncness.is_none() {
        errors.at(
            sig.fn_token.span,
            "`#[idempotent]` handlers must be `async fn`: add `async` before `fn`",
        );
    }
    let help = "`#[idempotent]` handlers return `Result<T, E>` where `T: Serialize + DeserializeOwned` \
                (the output replayed to duplicates) and `E: From<idempotent_runtime::Error>`";
    match &sig.output {
        ReturnType::Default => errors.at(
            sig.paren_token.span.close(),
            format!("missing return type: {help}"),
        ),
        ReturnType::Type(_, ty) => {
            if !is_result(ty) {
                errors.at(ty.span(), format!("this is not a `Result`: {help}"));
            }
        }
    }
}

fn is_result(ty: &Type) -> bool {
    match ty {
        Type::Path(p) => {
            p.qself.is_none() && p.path.segments.last().is_some_and(|s| s.ident == "Result")
        }
        Type::Group(g) => is_result(&g.elem),
        Type::Paren(p) => is_result(&p.elem),
        _ => false,
    }
}

/// The names bound by the function's parameters, `self` included.
fn parameters(func: &ItemFn) -> Vec<String> {
    let mut names = Vec::new();
    for input in &func.sig.inputs {
        match input {
            FnArg::Receiver(_) => names.push("self".to_owned()),
            FnArg::Typed(t) => pattern_names(&t.pat, &mut names),
        }
    }
    names
}

/// The end of an error about a name that is not a parameter: which names are.
fn listed_parameters(params: &[String]) -> String {
    if params.is_empty() {
        return "the handler has no parameters".to_owned();
    }
    let names: Vec<String> = params.iter().map(|p| format!("`{p}`")).collect();
    format!("the handler's parameters are {}", names.join(", "))
}

fn pattern_names(pat: &Pat, out: &mut Vec<String>) {
    struct V<'a>(&'a mut Vec<String>);
    impl<'ast> Visit<'ast> for V<'_> {
        fn visit_pat_ident(&mut self, p: &'ast syn::PatIdent) {
            self.0.push(p.ident.to_string());
            syn::visit::visit_pat_ident(self, p);
        }
    }
    V(out).visit_pat(pat);
}

/// Parses a string argument as a Rust expression and checks that every variable it
/// names is a parameter.
fn expression(lit: &LitStr, what: &str, params: &[String], errors: &mut Errors) -> Option<Expr> {
    let expr = match lit
        .parse::<TokenStream>()
        .and_then(|tokens| syn::parse2::<Expr>(respan(tokens, lit.span())))
    {
        Ok(e) => e,
        Err(e) => {
            errors.at(
                lit.span(),
                format!(
                    "`{what}` must be a Rust expression over the handler's parameters, like `\"msg.id\"` or `\"(msg.topic, msg.id)\"`: {e}"
                ),
            );
            return None;
        }
    };
    let mut ok = true;
    for name in free_variables(&expr) {
        if params.contains(&name) {
            continue;
        }
        ok = false;
        let listed = listed_parameters(params);
        errors.at(
            lit.span(),
            format!("`{what}` uses `{name}`, which is not a parameter of this function; {listed}"),
        );
    }
    ok.then_some(expr)
}

/// Gives every token the location of the string literal it was parsed from, and the
/// hygiene of the macro call site.
///
/// rustc's errors inside the expression (`no field `idd` on type `&Msg``) then point at
/// the string, like the literal's own span would. Marking the tokens as coming from the
/// expansion also keeps rustc from offering fix-it suggestions for them: a suggestion
/// would replace the whole string literal with the suggested identifier
/// (`key = id` for `key = "msg.idd"`), since no span can point inside a literal.
fn respan(tokens: TokenStream, at: Span) -> TokenStream {
    let span = Span::call_site().located_at(at);
    tokens
        .into_iter()
        .map(|mut tt| {
            if let TokenTree::Group(g) = &tt {
                let mut group = Group::new(g.delimiter(), respan(g.stream(), at));
                group.set_span(span);
                tt = TokenTree::Group(group);
            } else {
                tt.set_span(span);
            }
            tt
        })
        .collect()
}

/// The variables an expression reads that it does not bind itself, in order of first
/// use: single-segment lowercase paths used as values (`msg`, `self`), minus the names
/// bound inside it (closure parameters, `let` in blocks). Called functions (`hash` in
/// `hash(msg)`), methods, fields and `CONSTANTS` are not variables.
fn free_variables(expr: &Expr) -> Vec<String> {
    let mut vars = Variables::default();
    vars.visit_expr(expr);
    let Variables { used, bound } = vars;
    used.into_iter().filter(|n| !bound.contains(n)).collect()
}

#[derive(Default)]
struct Variables {
    used: Vec<String>,
    bound: BTreeSet<String>,
}

impl<'ast> Visit<'ast> for Variables {
    fn visit_expr_path(&mut self, p: &'ast syn::ExprPath) {
        if p.qself.is_none()
            && let Some(ident) = p.path.get_ident()
        {
            let name = ident.to_string();
            let variable =
                name == "self" || name.starts_with(|c: char| c.is_lowercase() || c == '_');
            if variable && !self.used.contains(&name) {
                self.used.push(name);
            }
        }
    }

    fn visit_expr_call(&mut self, c: &'ast syn::ExprCall) {
        // `hash(msg)`: the callee is a function, not a variable
        if !matches!(&*c.func, Expr::Path(_)) {
            self.visit_expr(&c.func);
        }
        for a in &c.args {
            self.visit_expr(a);
        }
    }

    fn visit_pat_ident(&mut self, p: &'ast syn::PatIdent) {
        self.bound.insert(p.ident.to_string());
        syn::visit::visit_pat_ident(self, p);
    }
}

/// Parses a duration argument ([`idempotent_shared::parse_duration`]).
fn duration(lit: &LitStr, what: &str, errors: &mut Errors) -> Option<Duration> {
    match idempotent_shared::parse_duration(&lit.value()) {
        Ok(d) => Some(d),
        Err(why) => {
            errors.at(lit.span(), format!("`{what} = {:?}` {why}", lit.value()));
            None
        }
    }
}

fn choice(
    lit: Option<&LitStr>,
    what: &str,
    options: &[&str],
    errors: &mut Errors,
) -> Option<usize> {
    let lit = lit?;
    let v = lit.value();
    match options.iter().position(|o| *o == v) {
        Some(i) => Some(i),
        None => {
            errors.at(
                lit.span(),
                format!(
                    "`{what} = {v:?}` is not an option; use {}",
                    options
                        .iter()
                        .map(|o| format!("`{what} = \"{o}\"`"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::free_variables;

    fn free(src: &str) -> Vec<String> {
        free_variables(&syn::parse_str(src).expect(src))
    }

    #[test]
    fn key_variables() {
        assert_eq!(free("msg.id"), ["msg"]);
        assert_eq!(free("(msg.topic, msg.id)"), ["msg"]);
        assert_eq!(free("(msg.topic, header.id)"), ["msg", "header"]);
        assert_eq!(free("msg.header.biz_id()"), ["msg"]);
        assert_eq!(free("self.tenant"), ["self"]);
        assert_eq!(free("(self.tenant, msg.id)"), ["self", "msg"]);
        assert_eq!(free("_msg.id"), ["_msg"]);
    }

    #[test]
    fn key_variables_skip_functions_and_constants() {
        // the callee of a call is a function, its arguments are variables
        assert_eq!(free("hash(msg)"), ["msg"]);
        assert_eq!(free("crate::keys::hash(&msg.id)"), ["msg"]);
        assert_eq!(free("hash::<u64>(msg, salt)"), ["msg", "salt"]);
        // upper-case paths are constants, statics or variants
        assert_eq!(free("msg.id % MAX"), ["msg"]);
        assert_eq!(free("Some(msg.id)"), ["msg"]);
        assert!(free("MAX").is_empty());
        assert!(free("Kind::Order").is_empty());
        // a call through an expression still reads that expression
        assert_eq!(free("(hasher)(msg)"), ["hasher", "msg"]);
    }

    #[test]
    fn key_variables_skip_names_bound_inside() {
        assert_eq!(free("msg.items.iter().map(|i| i.id).sum::<u64>()"), ["msg"]);
        assert_eq!(free("msg.items.iter().map(|(a, b)| a + b).max()"), ["msg"]);
        assert_eq!(free("{ let n = msg.id; n * 2 }"), ["msg"]);
        // a closure that reads a name it does not bind
        assert_eq!(
            free("msg.items.iter().map(|i| i.id + offset)"),
            ["msg", "offset"]
        );
    }

    #[test]
    fn unknown_variable_message_lists_the_parameters() {
        use crate::attr::Errors;
        use proc_macro2::Span;
        let params = vec!["msg".to_owned(), "db".to_owned()];
        let lit = syn::LitStr::new("(message.id, msg.topic)", Span::call_site());
        let mut errors = Errors::default();
        assert!(super::expression(&lit, "key", &params, &mut errors).is_none());
        let err = errors.finish().expect("an error");
        assert_eq!(
            err.to_string(),
            "`key` uses `message`, which is not a parameter of this function; \
             the handler's parameters are `msg`, `db`"
        );

        let lit = syn::LitStr::new("(msg.topic, db.id)", Span::call_site());
        let mut errors = Errors::default();
        assert!(super::expression(&lit, "key", &params, &mut errors).is_some());
        assert!(errors.finish().is_none());
    }

    #[test]
    fn key_variables_of_literals_and_macros() {
        assert!(free("\"fixed\"").is_empty());
        assert!(free("42").is_empty());
        // macro arguments are left to rustc
        assert!(free("format!(\"{}\", msg.id)").is_empty());
    }
}
