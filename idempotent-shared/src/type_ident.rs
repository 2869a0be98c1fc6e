//! The name of a type, as a method's default scope writes it.

/// The identifier a type was declared with, from its `type_name`, for a type with a name
/// of its own (a struct, an enum, a union, a primitive): `Queue` for
/// `app::jobs::Queue<alloc::string::String>`, `Local` for `app::main::{{closure}}::Local`,
/// `u8` for `u8`. `None` for a reference, a pointer, a tuple, an array or a slice, a fn
/// pointer, a trait object, `!`, or anything printed in another form.
///
/// The attribute checks at compile time that the compiler building a handler reads its
/// own probe types' names as expected, and the runtime names a method's `Self` type with
/// this fn in the method's default scope.
///
/// ```
/// use idempotent_shared::type_ident;
///
/// assert_eq!(type_ident("app::jobs::Queue<alloc::string::String>"), Some("Queue"));
/// assert_eq!(type_ident("&app::Orders"), None);
/// ```
pub fn type_ident(ty: &str) -> Option<&str> {
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

#[cfg(test)]
mod tests {
    use super::type_ident;
    use core::any::type_name;

    struct Named;

    #[test]
    fn a_type_is_named_by_the_identifier_it_was_declared_with() {
        assert_eq!(type_ident("app::Orders"), Some("Orders"));
        assert_eq!(
            type_ident("app::jobs::Queue<alloc::vec::Vec<core::option::Option<u8>>, 3>"),
            Some("Queue")
        );
        assert_eq!(type_ident("app::main::{{closure}}::Local"), Some("Local"));
        assert_eq!(type_ident("app::Orders::handle::Local"), Some("Local"));
        assert_eq!(type_ident("u8"), Some("u8"));
        assert_eq!(type_ident("app::_Orders"), Some("_Orders"));
        assert_eq!(type_ident("app::Ünï"), Some("Ünï"));
        for unnamed in [
            "&app::Orders",
            "&mut app::Orders",
            "*const app::Orders",
            "(app::Orders, u8)",
            "()",
            "[app::Orders]",
            "[app::Orders; 3]",
            "dyn app::Handler",
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
        ] {
            assert_eq!(type_ident(unnamed), None, "{unnamed}");
        }
    }

    /// This compiler's type names are read as expected (the attribute checks the same
    /// on its own probe types before it lets a method without `scope` compile).
    #[test]
    fn this_compilers_type_names_are_read() {
        struct Local;
        assert_eq!(type_ident(type_name::<Local>()), Some("Local"));
        assert_eq!(type_ident(type_name::<Named>()), Some("Named"));
        assert_eq!(
            type_ident(type_name::<alloc::vec::Vec<Option<u8>>>()),
            Some("Vec")
        );
        assert_eq!(type_ident(type_name::<&Local>()), None);
        assert_eq!(type_ident(type_name::<dyn core::fmt::Debug>()), None);
    }

    /// A name printed in another form is not read as the type's identifier: what the
    /// attribute's compile-time check compares.
    #[test]
    fn a_name_in_another_form_is_not_read() {
        assert_ne!(type_ident("app::Plain#1"), Some("Plain"));
        assert_ne!(type_ident("<app::Plain>"), Some("Plain"));
        assert_ne!(type_ident("app::Generic::<u8, 3>"), Some("Generic"));
        assert_ne!(type_ident("app::r#match"), Some("match"));
        assert_ne!(type_ident("app::Plain<'_>x"), Some("Plain"));
    }
}
