//! The default scope of a handler, and the guard that keeps two handlers from sharing it.
//!
//! A handler without `scope = "…"` is scoped by `concat!(module_path!(), "::", fn name)`,
//! a constant the attribute writes into the handler. The scope is stored in every record
//! key, so it only changes when the handler's module or name does. Being that narrow, it
//! can be the same for two handlers (methods named alike in two impls of one module, a
//! trait's default method called for two types); the guard refuses the second one at its
//! first call, in each process, before anything is claimed.

use crate::Error;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, OnceLock, PoisonError, RwLock};

/// The guard's verdict for one handler (and one `Self` type): `Err` holds the message.
type Verdict = Result<(), Box<str>>;

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
    /// The handler's default scope, `scope`, and the fn naming the handler in messages.
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
        self.answer(self.verdict.get_or_init(|| self.register(None)))
    }

    /// As [`get`](Self::get), for a method with a `self` receiver: the handler is this
    /// static and `self_ty` (`type_name::<Self>()`, its generic arguments erased), so a
    /// trait's default method called for two types is two handlers.
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
            return self.answer(verdict);
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
                .map(|(_, verdict)| self.answer(verdict))
        };
        let selves = self
            .other_selves
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(answer) = seen(&selves) {
            return answer;
        }
        drop(selves);
        let verdict = self.register(Some(self_ty));
        let mut selves = self
            .other_selves
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(answer) = seen(&selves) {
            return answer;
        }
        let answer = self.answer(&verdict);
        selves.push((self_ty, verdict));
        answer
    }

    fn answer(&self, verdict: &Verdict) -> Result<&'static str, Error> {
        match verdict {
            Ok(()) => Ok(self.scope),
            Err(reason) => Err(Error::InvalidSettings {
                reason: reason.to_string(),
            }),
        }
    }

    /// Registers this handler (with `self_ty`) as the owner of its default scope, or
    /// refuses it if another handler owns the scope.
    fn register(&'static self, self_ty: Option<&'static str>) -> Verdict {
        /// The handler that first used a default scope in this process.
        struct Owner {
            handler: &'static DefaultScope,
            self_ty: Option<String>,
        }
        static OWNERS: Mutex<BTreeMap<&'static str, Owner>> = Mutex::new(BTreeMap::new());

        let erased = self_ty.map(erase_type_args);
        let mut owners = OWNERS.lock().unwrap_or_else(PoisonError::into_inner);
        let owner = owners.entry(self.scope).or_insert_with(|| Owner {
            handler: self,
            self_ty: erased.clone(),
        });
        if std::ptr::eq(owner.handler, self) && owner.self_ty == erased {
            return Ok(());
        }
        let first = owner.handler.name(owner.self_ty.as_deref());
        let second = self.name(erased.as_deref());
        let reason = if std::ptr::eq(owner.handler, self) {
            format!(
                "{second} would share the default scope `{scope}`, and its records, with \
                 {first}: a trait's default method (or a blanket impl's method) called for \
                 two types; give it an explicit `scope = \"…\"` to share one scope on \
                 purpose, or implement the method for each type with its own `scope = \"…\"`",
                scope = self.scope,
            )
        } else {
            format!(
                "{second} would share the default scope `{scope}`, and its records, with \
                 {first}: the default scope is the module path and the fn name; give each \
                 handler an explicit `scope = \"…\"`",
                scope = self.scope,
            )
        };
        tracing::error!(scope = self.scope, "{reason}");
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
    use crate::Error;

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
    fn a_method_is_one_handler_per_self_type_with_its_arguments_erased() {
        static M: DefaultScope = DefaultScope::new("guard::methods::handle", handler_a);
        assert_eq!(
            M.get_for(None, "app::Queue<u8>").unwrap(),
            "guard::methods::handle"
        );
        // another instantiation of the same generic impl: the same handler
        assert_eq!(
            M.get_for(None, "app::Queue<alloc::string::String>")
                .unwrap(),
            "guard::methods::handle"
        );
        assert_eq!(
            M.get_for(None, "app::Queue<u8>").unwrap(),
            "guard::methods::handle"
        );
        // the same method for another type (a trait's default method): refused
        let why = reason(M.get_for(None, "app::Other"));
        assert!(why.contains("for `app::Queue<_>`"), "{why}");
        assert!(why.contains("for `app::Other`"), "{why}");
        assert!(why.contains("default method"), "{why}");
        assert!(M.get_for(None, "app::Other").is_err());
        assert_eq!(M.get_for(Some("x"), "app::Other").unwrap(), "x");
    }
}
