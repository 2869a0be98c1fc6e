//! The `Self` type's name in a method's default scope.
//!
//! The default scope of a method with a `self` receiver is `module::Type::method`. An
//! attribute on a method cannot see the impl around it, so the generated code passes
//! `core::any::type_name::<Self>()` to the runtime, which keeps the type's identifier
//! (with `idempotent_shared::type_ident`, which the check here uses too). The standard library does not
//! specify how `type_name` prints, and the scope is stored in every record key: so the
//! attribute, which runs in the compiler that builds the handler, checks that this
//! compiler's names of probe types read as expected ([`unreadable`]), and a method
//! without `scope` does not compile otherwise, rather than quietly get another scope.

use core::any::type_name;
use idempotent_shared::type_ident;

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

#[cfg(test)]
mod tests {
    use super::unreadable;

    #[test]
    fn this_compiler_prints_type_names_as_they_are_read() {
        assert_eq!(unreadable(), None);
    }
}
