//! The `Self` type's name in a method's default scope.
//!
//! The default scope of a method with a `self` receiver is `module::Type::method`. An
//! attribute on a method cannot see the impl around it, so the generated code passes
//! `core::any::type_name::<Self>()` to the runtime, which keeps the type's identifier
//! (its `type_ident`, the same fn as [`type_ident`] here). The standard library does not
//! specify how `type_name` prints, and the scope is stored in every record key: so the
//! attribute, which runs in the compiler that builds the handler, checks that this
//! compiler's names of probe types read as expected ([`unreadable`]), and a method
//! without `scope` does not compile otherwise, rather than quietly get another scope.

use core::any::type_name;

/// The identifier a type was declared with, from its `type_name`: `Queue` for
/// `app::jobs::Queue<alloc::string::String>`; `None` for a type without a name of its
/// own (a reference, a tuple, a slice, a trait object, …) or any other form. The same fn
/// as the runtime's `scope::type_ident`; a runtime test compares them on [`samples`].
pub(crate) fn type_ident(ty: &str) -> Option<&str> {
    let path = match ty.find('<') {
        Some(args) if ty.ends_with('>') => &ty[..args],
        Some(_) => return None,
        None => ty,
    };
    if !path
        .chars()
        .all(|c| c.is_alphanumeric() || matches!(c, '_' | ':' | '{' | '}'))
    {
        return None;
    }
    let ident = path.rsplit("::").next()?;
    let mut chars = ident.chars();
    let first = chars.next()?;
    ((first.is_alphabetic() || first == '_') && chars.all(|c| c.is_alphanumeric() || c == '_'))
        .then_some(ident)
}

/// Types of each kind a method's `Self` can be, and the name each must be read as.
fn probes() -> [(&'static str, Option<&'static str>); 12] {
    #[allow(dead_code, non_camel_case_types)]
    mod probe {
        pub(super) struct Plain;
        pub(super) struct Generic<T, const N: usize>(pub(super) T);
        pub(super) enum Enum {}
        pub(super) union Union {
            pub(super) a: u8,
        }
        pub(super) struct r#match;
        pub(super) trait Trait {}
    }
    // a type declared in a body, as in an async fn's (`…::{{closure}}::Local`)
    let in_closure = || {
        struct Local;
        type_name::<Local>()
    };
    [
        (type_name::<probe::Plain>(), Some("Plain")),
        (
            type_name::<probe::Generic<Vec<Option<u8>>, 3>>(),
            Some("Generic"),
        ),
        (type_name::<probe::Enum>(), Some("Enum")),
        (type_name::<probe::Union>(), Some("Union")),
        (type_name::<probe::r#match>(), Some("match")),
        (in_closure(), Some("Local")),
        (type_name::<u8>(), Some("u8")),
        (type_name::<&probe::Plain>(), None),
        (type_name::<(u8, probe::Plain)>(), None),
        (type_name::<[probe::Plain]>(), None),
        (type_name::<dyn probe::Trait + Send>(), None),
        (type_name::<fn(probe::Plain) -> u8>(), None),
    ]
}

/// A probe type whose name, as this compiler prints it, is not read as expected: the
/// name printed, and the identifier expected.
pub(crate) fn unreadable() -> Option<(&'static str, Option<&'static str>)> {
    probes()
        .into_iter()
        .find(|(printed, expected)| type_ident(printed) != *expected)
}

/// Type names in every form [`type_ident`] tells apart, and the probe types' names as
/// this compiler prints them: what the runtime's test reads with its own `type_ident`.
fn samples() -> Vec<&'static str> {
    let written = [
        "app::Orders",
        "app::jobs::Queue<alloc::vec::Vec<core::option::Option<u8>>, 3>",
        "app::main::{{closure}}::Local",
        "u8",
        "app::_Orders",
        "app::Ünï",
        "&app::Orders",
        "&mut app::Orders",
        "*const app::Orders",
        "(app::Orders, u8)",
        "()",
        "[app::Orders; 3]",
        "dyn app::Handler + core::marker::Send",
        "fn(app::Orders) -> u8",
        "!",
        "app::main::{{closure}}",
        "app::Queue<u8>::Inner",
        "app::Queue<u8",
        "app::r#match",
        "app::1Orders",
        "app::",
        "",
    ];
    written
        .into_iter()
        .chain(probes().into_iter().map(|(printed, _)| printed))
        .collect()
}

/// [`samples`] and what [`type_ident`] reads in each, as an array expression of
/// `(&str, Option<&str>)`, for the runtime's test.
pub(crate) fn expr() -> proc_macro2::TokenStream {
    let rows = samples().into_iter().map(|ty| {
        let ident = match type_ident(ty) {
            Some(ident) => quote::quote!(::core::option::Option::Some(#ident)),
            None => quote::quote!(::core::option::Option::None),
        };
        quote::quote!((#ty, #ident))
    });
    quote::quote!([#(#rows),*])
}

#[cfg(test)]
mod tests {
    use super::{type_ident, unreadable};

    #[test]
    fn this_compiler_prints_type_names_as_they_are_read() {
        assert_eq!(unreadable(), None);
    }

    #[test]
    fn a_type_is_named_by_the_identifier_it_was_declared_with() {
        assert_eq!(type_ident("app::Orders"), Some("Orders"));
        assert_eq!(
            type_ident("app::jobs::Queue<alloc::vec::Vec<core::option::Option<u8>>, 3>"),
            Some("Queue")
        );
        assert_eq!(type_ident("app::main::{{closure}}::Local"), Some("Local"));
        assert_eq!(type_ident("u8"), Some("u8"));
        assert_eq!(type_ident("app::Ünï"), Some("Ünï"));
        for unnamed in [
            "&app::Orders",
            "(app::Orders, u8)",
            "[app::Orders; 3]",
            "dyn app::Handler + core::marker::Send",
            "fn(app::Orders) -> u8",
            "!",
            "app::main::{{closure}}",
            "app::Queue<u8>::Inner",
            "app::r#match",
            "app::1Orders",
            "",
        ] {
            assert_eq!(type_ident(unnamed), None, "{unnamed}");
        }
    }

    /// A probe printed otherwise than expected is reported: what `unreadable` compares.
    #[test]
    fn a_name_in_another_form_is_not_read() {
        assert_ne!(type_ident("app::Plain#1"), Some("Plain"));
        assert_ne!(type_ident("<app::Plain>"), Some("Plain"));
        assert_ne!(type_ident("app::Generic::<u8, 3>"), Some("Generic"));
        assert_ne!(type_ident("app::r#match"), Some("match"));
        assert_ne!(type_ident("app::Plain<'_>x"), Some("Plain"));
    }
}
