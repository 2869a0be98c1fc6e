//! The default scope of a handler, and the guard that keeps two handlers from sharing it.
//!
//! A handler without `scope = "…"` is scoped by `concat!(module_path!(), "::", fn name)`,
//! a constant the attribute writes into the handler; a method with a `self` receiver by
//! the module path, the name of its `Self` type and the fn name,
//! `my_app::consumers::Orders::handle`, so that the methods named alike of two types of
//! one module have scopes of their own. An attribute on a method cannot see its impl:
//! the type's name is read at the method's first call from `type_name::<Self>()`, by
//! `idempotent_shared::type_ident`, which keeps only the type's own identifier. The standard library does
//! not specify how `type_name` prints, so the attribute checks, in the compiler that
//! builds the handler, that this compiler's type names read as expected, and refuses to
//! compile a method without `scope` otherwise: a compiler upgrade cannot quietly give a
//! handler another scope.
//!
//! The scope is stored in every record key, so it only changes when the handler's module,
//! its type's name or its own name does. It can still be the same for two handlers that
//! the attribute cannot tell apart: associated fns without a receiver named alike in two
//! impls of one module, methods named alike in two trait impls for one type, one method
//! (a trait's default method, a blanket impl's) called for two types of one name, or
//! for types without a name of their own (references, tuples, trait objects). The guard
//! refuses the second one at its first call, in each process, before anything is claimed.

use crate::error::Error;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, OnceLock, PoisonError, RwLock};

/// The guard's verdict for one handler (and one `Self` type): the default scope it may
/// use, or the message refusing it.
type Verdict = Result<&'static str, Box<str>>;

/// One handler's default scope and its place in the process-wide guard: a `static` of
/// each expansion of `#[idempotent]`, beside its configuration. Its address is the
/// handler's identity; a `static` in a generic fn is one for all its instantiations,
/// which are one handler.
pub struct DefaultScope {
    /// `concat!(module_path!(), "::", fn name)`.
    scope: &'static str,
    /// Names the handler in the guard's message: the type name of a fn declared in the
    /// handler's body. Never stored.
    describe: fn() -> &'static str,
    /// A handler without a receiver: the verdict, taken at its first call.
    verdict: OnceLock<Verdict>,
    /// A method: the first `Self` type seen and its verdict.
    first_self: OnceLock<(&'static str, Verdict)>,
    /// A method called for other `Self` types (another instantiation of a generic impl,
    /// another implementor of a trait's default method).
    other_selves: RwLock<Vec<(&'static str, Verdict)>>,
}

impl DefaultScope {
    /// The handler's default scope without its type, `scope`, and the fn naming the
    /// handler in messages.
    pub const fn new(scope: &'static str, describe: fn() -> &'static str) -> Self {
        DefaultScope {
            scope,
            describe,
            verdict: OnceLock::new(),
            first_self: OnceLock::new(),
            other_selves: RwLock::new(Vec::new()),
        }
    }

    /// The explicit scope, or the default scope once the guard has let this handler
    /// have it. [`Error::InvalidSettings`] if another handler has it already.
    #[inline]
    pub fn get(&'static self, explicit: Option<&'static str>) -> Result<&'static str, Error> {
        if let Some(scope) = explicit {
            return Ok(scope);
        }
        answer(self.verdict.get_or_init(|| self.register(None)))
    }

    /// As [`get`](Self::get), for a method with a `self` receiver: its default scope
    /// names `self_ty` (`type_name::<Self>()`) by the identifier the type was declared
    /// with, `module::Type::name` (`module::name` for a type without a name of its
    /// own), and the handler is this static and `self_ty` with its generic arguments
    /// erased, so a trait's default method called for two types is two handlers.
    #[inline]
    pub fn get_for(
        &'static self,
        explicit: Option<&'static str>,
        self_ty: &'static str,
    ) -> Result<&'static str, Error> {
        if let Some(scope) = explicit {
            return Ok(scope);
        }
        let (first, verdict) = self
            .first_self
            .get_or_init(|| (self_ty, self.register(Some(self_ty))));
        if std::ptr::eq(*first, self_ty) || *first == self_ty {
            return answer(verdict);
        }
        self.other_self(self_ty)
    }

    /// A `Self` type other than the first: its verdict, taken once.
    #[cold]
    fn other_self(&'static self, self_ty: &'static str) -> Result<&'static str, Error> {
        let seen = |selves: &[(&'static str, Verdict)]| {
            selves
                .iter()
                .find(|(ty, _)| std::ptr::eq(*ty, self_ty) || *ty == self_ty)
                .map(|(_, verdict)| answer(verdict))
        };
        let selves = self
            .other_selves
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = seen(&selves) {
            return found;
        }
        drop(selves);
        let verdict = self.register(Some(self_ty));
        let mut selves = self
            .other_selves
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = seen(&selves) {
            return found;
        }
        let result = answer(&verdict);
        selves.push((self_ty, verdict));
        result
    }

    /// The default scope of this handler for `self_ty`: `module::Type::name` when the
    /// type has a name of its own, else `module::name`.
    fn scope_for(&self, self_ty: Option<&str>) -> Option<String> {
        let ident = idempotent_shared::type_ident(self_ty?)?;
        Some(match self.scope.rsplit_once("::") {
            Some((module, name)) => format!("{module}::{ident}::{name}"),
            None => format!("{ident}::{}", self.scope),
        })
    }

    /// Registers this handler (with `self_ty`) as the owner of its default scope, or
    /// refuses it if another handler owns the scope.
    fn register(&'static self, self_ty: Option<&'static str>) -> Verdict {
        /// The handler that first used a default scope in this process.
        struct Owner {
            handler: &'static DefaultScope,
            self_ty: Option<String>,
        }
        /// Its keys are the default scopes in use, each allocated once.
        static OWNERS: Mutex<BTreeMap<&'static str, Owner>> = Mutex::new(BTreeMap::new());

        let erased = self_ty.map(erase_type_args);
        let typed = self.scope_for(self_ty);
        let mut owners = OWNERS.lock().unwrap_or_else(PoisonError::into_inner);
        let scope: &'static str = match typed {
            None => self.scope,
            Some(typed) => match owners.get_key_value(typed.as_str()) {
                Some((scope, _)) => scope,
                // one allocation per default scope of the process, kept for its lifetime
                None => Box::leak(typed.into_boxed_str()),
            },
        };
        let owner = owners.entry(scope).or_insert_with(|| Owner {
            handler: self,
            self_ty: erased.clone(),
        });
        if std::ptr::eq(owner.handler, self) && owner.self_ty == erased {
            return Ok(scope);
        }
        let first = owner.handler.name(owner.self_ty.as_deref());
        let second = self.name(erased.as_deref());
        let reason = if std::ptr::eq(owner.handler, self) {
            format!(
                "{second} would share the default scope `{scope}`, and its records, with \
                 {first}: one method (a trait's default method, or a blanket impl's) called \
                 for two types the default scope does not tell apart (types of one name, or \
                 without a name of their own such as references and tuples); give it an \
                 explicit `scope = \"…\"` to share one scope on purpose, or implement the \
                 method for each type with its own `scope = \"…\"`"
            )
        } else {
            format!(
                "{second} would share the default scope `{scope}`, and its records, with \
                 {first}: the default scope is the module path, the `Self` type's name for \
                 a method with a `self` receiver, and the fn name; give each handler an \
                 explicit `scope = \"…\"`"
            )
        };
        tracing::error!(scope, "{reason}");
        Err(reason.into_boxed_str())
    }

    /// The handler's path for messages, such as `` `app::Orders::handle` for `app::Orders` ``.
    fn name(&self, self_ty: Option<&str>) -> String {
        let path = (self.describe)();
        // only shown, never stored: a type name printed otherwise is shown as it is
        let path = path.rsplit_once("::").map_or(path, |(p, _)| p);
        let path = path.strip_suffix("::{{closure}}").unwrap_or(path);
        match self_ty {
            Some(ty) => format!("`{path}` for `{ty}`"),
            None => format!("`{path}`"),
        }
    }
}

/// A verdict as the handler's scope or error.
fn answer(verdict: &Verdict) -> Result<&'static str, Error> {
    match verdict {
        Ok(scope) => Ok(scope),
        Err(reason) => Err(Error::InvalidSettings {
            reason: reason.to_string(),
        }),
    }
}

impl fmt::Debug for DefaultScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DefaultScope")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// A type name with its generic arguments shown as in the path of a generic item:
/// `app::Queue<alloc::string::String, u8>` → `app::Queue<_, _>`, so every
/// instantiation of a generic impl is one handler.
fn erase_type_args(ty: &str) -> String {
    let mut out = String::with_capacity(ty.len());
    let mut depth = 0usize;
    for c in ty.chars() {
        match c {
            '<' => {
                if depth == 0 {
                    out.push_str("<_");
                }
                depth += 1;
            }
            '>' if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    out.push('>');
                }
            }
            ',' if depth == 1 => out.push_str(", _"),
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{DefaultScope, erase_type_args};
    use crate::error::Error;

    fn handler_a() -> &'static str {
        "app::A::handle::{{closure}}::__idempotent_handler"
    }

    fn handler_b() -> &'static str {
        "app::B::handle::{{closure}}::__idempotent_handler"
    }

    fn reason(r: Result<&'static str, Error>) -> String {
        match r {
            Err(Error::InvalidSettings { reason }) => reason,
            other => panic!("expected InvalidSettings, got {other:?}"),
        }
    }

    #[test]
    fn type_arguments_are_erased_as_in_item_paths() {
        assert_eq!(erase_type_args("app::Orders"), "app::Orders");
        assert_eq!(erase_type_args("app::Queue<u8>"), "app::Queue<_>");
        assert_eq!(
            erase_type_args("app::Queue<alloc::vec::Vec<u8>, core::option::Option<(u8, u16)>>"),
            "app::Queue<_, _>"
        );
        assert_eq!(erase_type_args("&app::Orders"), "&app::Orders");
    }

    #[test]
    fn a_second_handler_with_the_same_default_scope_is_refused() {
        static A: DefaultScope = DefaultScope::new("guard::fns::handle", handler_a);
        static B: DefaultScope = DefaultScope::new("guard::fns::handle", handler_b);
        assert_eq!(A.get(None).unwrap(), "guard::fns::handle");
        let why = reason(B.get(None));
        assert!(why.contains("`guard::fns::handle`"), "{why}");
        assert!(why.contains("`app::A::handle`"), "{why}");
        assert!(why.contains("`app::B::handle`"), "{why}");
        assert!(why.contains("explicit `scope = \"…\"`"), "{why}");
        // the verdicts are kept: the owner goes on, the other one stays refused
        assert_eq!(A.get(None).unwrap(), "guard::fns::handle");
        assert!(B.get(None).is_err());
        // an explicit scope does not go through the guard
        assert_eq!(B.get(Some("b")).unwrap(), "b");
    }

    #[test]
    fn a_method_is_scoped_by_its_self_type_and_its_arguments_are_erased() {
        static M: DefaultScope = DefaultScope::new("guard::methods::handle", handler_a);
        let queue = M.get_for(None, "app::Queue<u8>").unwrap();
        assert_eq!(queue, "guard::methods::Queue::handle");
        // another instantiation of the same generic impl: the same handler, the same
        // scope (allocated once)
        let again = M
            .get_for(None, "app::Queue<alloc::string::String>")
            .unwrap();
        assert!(std::ptr::eq(queue, again));
        assert_eq!(M.get_for(None, "app::Queue<u8>").unwrap(), queue);
        // the same method for another type (a trait's default method): its own scope
        assert_eq!(
            M.get_for(None, "app::Other").unwrap(),
            "guard::methods::Other::handle"
        );
        // a type without a name of its own: the module path and the fn name
        assert_eq!(
            M.get_for(None, "(u8, app::Other)").unwrap(),
            "guard::methods::handle"
        );
        // another type of one of those names: refused
        let why = reason(M.get_for(None, "app::jobs::Queue<u8>"));
        assert!(why.contains("`guard::methods::Queue::handle`"), "{why}");
        assert!(why.contains("for `app::Queue<_>`"), "{why}");
        assert!(why.contains("for `app::jobs::Queue<_>`"), "{why}");
        assert!(why.contains("default method"), "{why}");
        let why = reason(M.get_for(None, "&app::Other"));
        assert!(why.contains("`guard::methods::handle`"), "{why}");
        assert!(M.get_for(None, "app::jobs::Queue<u8>").is_err());
        assert_eq!(M.get_for(Some("x"), "app::jobs::Queue<u8>").unwrap(), "x");
        assert_eq!(M.get_for(None, "app::Queue<u16>").unwrap(), queue);
    }

    /// Two methods of one name for one type (two traits' methods): one default scope.
    #[test]
    fn two_methods_with_one_self_type_and_name_are_refused() {
        static A: DefaultScope = DefaultScope::new("guard::traits::handle", handler_a);
        static B: DefaultScope = DefaultScope::new("guard::traits::handle", handler_b);
        assert_eq!(
            A.get_for(None, "app::Both").unwrap(),
            "guard::traits::Both::handle"
        );
        let why = reason(B.get_for(None, "app::Both"));
        assert!(why.contains("`guard::traits::Both::handle`"), "{why}");
        assert!(why.contains("`app::A::handle` for `app::Both`"), "{why}");
        assert!(why.contains("`app::B::handle` for `app::Both`"), "{why}");
        assert!(why.contains("`Self` type's name"), "{why}");
        // for another type, the second method has a scope of its own
        assert_eq!(
            B.get_for(None, "app::Other").unwrap(),
            "guard::traits::Other::handle"
        );
    }
}
