//! `#[derive(ProducerModel)]` for devour: makes a Diesel model save and delete itself together
//! with the message it produces.
//!
//! ```ignore
//! #[derive(Queryable, Selectable, Insertable, AsChangeset, Identifiable, Serialize, ProducerModel)]
//! #[diesel(table_name = accounts)]
//! #[devour(topic = "accounts", partition_key = "id")]
//! struct Account { id: i64, name: String }
//! ```
//!
//! `#[devour(...)]` keys: `topic = "..."`, `partition_key = "field"`, `auto_produce = bool`,
//! `producer_type = "outbox" | "direct"`, `max_message_bytes = N`, and `customize` (leave the
//! `ProducerModel` impl to you, to override its methods). The table and primary key come from
//! `#[diesel(table_name = ..., primary_key(...))]`, with Diesel's defaults.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::quote;
use syn::ext::IdentExt as _;
use syn::{parse_macro_input, DeriveInput, Ident, LitBool, LitInt, LitStr, Path};

/// Derives `ModelTable`, `ModelStore` for PostgreSQL and SQLite, and (unless
/// `#[devour(customize)]`) `ProducerModel` from the `#[devour(...)]` settings.
#[proc_macro_derive(ProducerModel, attributes(devour))]
pub fn derive_producer_model(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand(&input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

#[derive(Default)]
struct Settings {
    topic: Option<LitStr>,
    partition_key: Option<LitStr>,
    auto_produce: Option<LitBool>,
    producer_type: Option<LitStr>,
    max_message_bytes: Option<LitInt>,
    customize: bool,
}

fn expand(input: &DeriveInput) -> syn::Result<TokenStream2> {
    let ident = &input.ident;
    if !input.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &input.generics,
            "ProducerModel cannot be derived for a generic type",
        ));
    }
    if !matches!(input.data, syn::Data::Struct(_)) {
        return Err(syn::Error::new_spanned(
            ident,
            "ProducerModel needs a struct",
        ));
    }

    let mut table: Option<Path> = None;
    let mut primary_key: Vec<Ident> = Vec::new();
    let mut backends: Vec<&str> = Vec::new();
    let mut s = Settings::default();
    for attr in &input.attrs {
        if attr.path().is_ident("diesel") {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("table_name") {
                    table = Some(meta.value()?.parse()?);
                } else if meta.path.is_ident("primary_key") {
                    meta.parse_nested_meta(|pk| {
                        primary_key.push(pk.path.require_ident()?.clone());
                        Ok(())
                    })?;
                } else if meta.path.is_ident("check_for_backend") {
                    // The model's backends: only their stores are generated (a column type of
                    // one backend has no meaning on the other).
                    let content;
                    syn::parenthesized!(content in meta.input);
                    let paths = content
                        .parse_terminated(syn::Path::parse_mod_style, syn::Token![,])?;
                    for path in paths {
                        let last = path.segments.last().map(|s| s.ident.to_string());
                        match last.as_deref() {
                            Some("Pg") => backends.push("postgres"),
                            Some("Sqlite") => backends.push("sqlite"),
                            _ => {
                                return Err(syn::Error::new_spanned(
                                    &path,
                                    "devour supports the backends diesel::pg::Pg and diesel::sqlite::Sqlite",
                                ))
                            }
                        }
                    }
                } else {
                    // Other Diesel options are Diesel's business.
                    skip_option(&meta)?;
                }
                Ok(())
            })?;
        } else if attr.path().is_ident("devour") {
            attr.parse_nested_meta(|meta| {
                let p = &meta.path;
                if p.is_ident("topic") {
                    let lit: LitStr = meta.value()?.parse()?;
                    if let Err(reason) = check_topic(&lit.value()) {
                        return Err(syn::Error::new_spanned(&lit, format!("invalid topic: {reason}")));
                    }
                    s.topic = Some(lit);
                } else if p.is_ident("partition_key") {
                    s.partition_key = Some(meta.value()?.parse()?);
                } else if p.is_ident("auto_produce") {
                    s.auto_produce = Some(meta.value()?.parse()?);
                } else if p.is_ident("producer_type") {
                    let lit: LitStr = meta.value()?.parse()?;
                    if !matches!(lit.value().as_str(), "outbox" | "direct") {
                        return Err(syn::Error::new_spanned(&lit, "producer_type is \"outbox\" or \"direct\""));
                    }
                    s.producer_type = Some(lit);
                } else if p.is_ident("max_message_bytes") {
                    s.max_message_bytes = Some(meta.value()?.parse()?);
                } else if p.is_ident("customize") {
                    s.customize = true;
                } else {
                    return Err(meta.error(
                        "unknown devour option; known: topic, partition_key, auto_produce, producer_type, max_message_bytes, customize",
                    ));
                }
                Ok(())
            })?;
        }
    }

    let table = match table {
        Some(t) => t,
        None => {
            let name = format!("{}s", snake_case(&ident.to_string()));
            Ident::new(&name, Span::call_site()).into()
        }
    };
    let table_name = table
        .segments
        .last()
        .map(|s| s.ident.to_string())
        .unwrap_or_default();
    if primary_key.is_empty() {
        primary_key.push(Ident::new("id", Span::call_site()));
    }
    check_key_is_inserted(input, &primary_key)?;
    let conflict = if primary_key.len() == 1 {
        let pk = &primary_key[0];
        quote!(#table::#pk)
    } else {
        quote!((#(#table::#primary_key),*))
    };

    if s.customize {
        let set: Vec<&str> = [
            ("topic", s.topic.is_some()),
            ("partition_key", s.partition_key.is_some()),
            ("auto_produce", s.auto_produce.is_some()),
            ("producer_type", s.producer_type.is_some()),
            ("max_message_bytes", s.max_message_bytes.is_some()),
        ]
        .iter()
        .filter(|(_, set)| *set)
        .map(|(k, _)| *k)
        .collect();
        if !set.is_empty() {
            return Err(syn::Error::new_spanned(
                ident,
                format!(
                    "with #[devour(customize)] your `impl Producer` says everything: {} would be ignored; \
                     set it in that impl's CONFIG instead",
                    set.join(", ")
                ),
            ));
        }
    }
    let both = backends.is_empty();
    let postgres = (both || backends.contains(&"postgres"))
        .then(|| quote!(::devour::__model_store_postgres!(#ident, #table::table, #conflict);));
    let sqlite = (both || backends.contains(&"sqlite"))
        .then(|| quote!(::devour::__model_store_sqlite!(#ident, #table::table, #conflict);));
    let mut out = quote! {
        impl ::devour::ModelTable for #ident {
            const TABLE: &'static str = #table_name;
        }
        #postgres
        #sqlite
    };
    if !s.customize {
        let mut config = quote!(::devour::ProducerConfig::new());
        if let Some(t) = &s.topic {
            config = quote!(#config.topic(#t));
        }
        if let Some(k) = &s.partition_key {
            config = quote!(#config.partition_key(#k));
        }
        if let Some(a) = &s.auto_produce {
            config = quote!(#config.auto_produce(#a));
        }
        if let Some(t) = &s.producer_type {
            if t.value() == "direct" {
                config = quote!(#config.producer_type(::devour::ProducerType::Direct));
            }
        }
        if let Some(m) = &s.max_message_bytes {
            config = quote!(#config.max_message_bytes(#m));
        }
        out.extend(quote! {
            impl ::devour::ProducerModel for #ident {
                const CONFIG: ::devour::ProducerConfig = #config;
            }
        });
    }
    Ok(out)
}

fn snake_case(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > 249 || topic == "." || topic == ".." {
        return Err("Kafka topics are 1 to 249 characters, not `.` or `..`".into());
    }
    match topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(format!(
            "{c:?} is not allowed (ASCII letters, digits, `.`, `_`, `-`)"
        )),
        None => Ok(()),
    }
}

/// `save` inserts the model unless a row with its primary key exists (`ON CONFLICT (key) DO
/// NOTHING`), else updates that row. A key field left out of inserts
/// (`#[diesel(skip_insertion)]`, for a key the database assigns) never conflicts: every save
/// would insert a new row and report `create`. Refuse it at compile time.
fn check_key_is_inserted(input: &DeriveInput, primary_key: &[Ident]) -> syn::Result<()> {
    let syn::Data::Struct(data) = &input.data else {
        return Ok(());
    };
    for field in &data.fields {
        let Some(name) = &field.ident else { continue };
        let mut column = name.to_string();
        let mut skipped = None;
        for attr in field.attrs.iter().filter(|a| a.path().is_ident("diesel")) {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("skip_insertion") {
                    skipped = Some(meta.path.clone());
                } else if meta.path.is_ident("column_name") {
                    // An identifier, or (Diesel 2.1+) a string.
                    let value = meta.value()?;
                    column = if value.peek(LitStr) {
                        value.parse::<LitStr>()?.value()
                    } else {
                        value.call(Ident::parse_any)?.to_string()
                    };
                } else {
                    skip_option(&meta)?;
                }
                Ok(())
            })?;
        }
        if let Some(path) = skipped {
            if primary_key.iter().any(|k| *k == column) {
                return Err(syn::Error::new_spanned(
                    path,
                    format!(
                        "ProducerModel: primary key `{column}` is left out of inserts, so `save` \
                         could never find an existing row and would insert a new one every time; \
                         insert the key (e.g. take it from the sequence first), or write such rows \
                         yourself and produce their messages with `Producer`"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Skips the value of a Diesel option devour does not read: `= …` up to the next comma outside
/// any `<…>` (a type such as `Select<t, (a, b)>`, which is no expression), or `(…)`.
fn skip_option(meta: &syn::meta::ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(syn::Token![=]) {
        let input = meta.value()?;
        let mut depth = 0usize;
        while !(input.is_empty() || (depth == 0 && input.peek(syn::Token![,]))) {
            match input.parse::<proc_macro2::TokenTree>()? {
                proc_macro2::TokenTree::Punct(p) if p.as_char() == '<' => depth += 1,
                proc_macro2::TokenTree::Punct(p) if p.as_char() == '>' => {
                    depth = depth.saturating_sub(1)
                }
                _ => {}
            }
        }
    } else if meta.input.peek(syn::token::Paren) {
        let _content;
        syn::parenthesized!(_content in meta.input);
        let _: TokenStream2 = _content.parse()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: DeriveInput) -> Result<(), String> {
        check_key_is_inserted(&input, &[Ident::new("id", Span::call_site())])
            .map_err(|e| e.to_string())
    }

    /// Field options with types in them (not expressions) and a column named by a string are
    /// read, not refused; a key skipped on insert is found under either form of its name.
    #[test]
    fn field_options_of_every_form_are_read() {
        assert_eq!(
            check(syn::parse_quote! {
                struct Note {
                    id: i32,
                    #[diesel(deserialize_as = Wrapper<String, u8>, column_name = "body")]
                    text: String,
                    #[diesel(skip_insertion)]
                    created: i64,
                }
            }),
            Ok(())
        );
        for input in [
            syn::parse_quote! { struct Note { #[diesel(skip_insertion)] id: i32 } },
            syn::parse_quote! {
                struct Note { #[diesel(column_name = "id", skip_insertion)] key: i32 }
            },
            syn::parse_quote! {
                struct Note { #[diesel(serialize_as = Option<i32>, skip_insertion)] id: i32 }
            },
        ] {
            let err = check(input).unwrap_err();
            assert!(
                err.contains("primary key `id` is left out of inserts"),
                "{err}"
            );
        }
    }
}
