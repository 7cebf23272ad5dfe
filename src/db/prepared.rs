//! [`Prepared`]: PostgreSQL statements prepared once per connection.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Text};

/// A PostgreSQL statement that Diesel prepares once per connection and reuses (keyed by its
/// text), unlike `sql_query`, which PostgreSQL parses and plans again at every run. Written
/// like `sql_query`'s text, with `$N` standing for `binds[N - 1]` (a number may appear more
/// than once). For the statements run for every batch (the relay's, the inbox's): at 100 batches a second the
/// parsing and planning of the read and the removal took about half a core of PostgreSQL.
pub(crate) struct Prepared<'a> {
    pub(crate) sql: &'a str,
    pub(crate) binds: &'a [PgBind<'a>],
}

/// A value for a `$N` of [`Prepared`].
pub(crate) enum PgBind<'a> {
    BigInt(i64),
    Text(&'a str),
    BigInts(&'a [i64]),
    Ints(&'a [i32]),
    Texts(&'a [&'a str]),
    Bools(&'a [bool]),
}

impl diesel::query_builder::QueryFragment<diesel::pg::Pg> for Prepared<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> QueryResult<()> {
        use diesel::sql_types::Array;
        let mut rest = self.sql;
        while let Some(at) = rest.find('$') {
            out.push_sql(&rest[..at]);
            let digits = rest[at + 1..]
                .bytes()
                .take_while(u8::is_ascii_digit)
                .count();
            let bind = rest[at + 1..at + 1 + digits]
                .parse::<usize>()
                .ok()
                .and_then(|n| self.binds.get(n.checked_sub(1)?))
                .ok_or_else(|| {
                    diesel::result::Error::QueryBuilderError(
                        format!(
                            "no value for {} in: {}",
                            &rest[at..at + 1 + digits],
                            self.sql
                        )
                        .into(),
                    )
                })?;
            match bind {
                PgBind::BigInt(v) => out.push_bind_param::<BigInt, _>(v)?,
                PgBind::Text(v) => out.push_bind_param::<Text, _>(*v)?,
                PgBind::BigInts(v) => out.push_bind_param::<Array<BigInt>, _>(*v)?,
                PgBind::Ints(v) => out.push_bind_param::<Array<Integer>, _>(*v)?,
                PgBind::Texts(v) => out.push_bind_param::<Array<Text>, _>(*v)?,
                PgBind::Bools(v) => out.push_bind_param::<Array<diesel::sql_types::Bool>, _>(*v)?,
            }
            rest = &rest[at + 1 + digits..];
        }
        out.push_sql(rest);
        Ok(())
    }
}

impl diesel::query_builder::QueryId for Prepared<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl diesel::query_builder::Query for Prepared<'_> {
    type SqlType = diesel::sql_types::Untyped;
}

impl<Conn> RunQueryDsl<Conn> for Prepared<'_> {}
