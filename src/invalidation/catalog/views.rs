//! What a view's body does, checked like a statement's: a view that calls
//! `now()`, `current_user`, `current_setting()` or a function that reads another
//! table hides exactly what statement analysis refuses, and pg_depend does not
//! show it (dependencies on built-in objects are not recorded there).
//!
//! Each view's definition (`pg_get_viewdef`) goes through the same analysis as
//! a statement; the functions, operators and casts it uses are then judged
//! against the catalog when a statement reading the view is resolved. The
//! tables a view reads still come from pg_depend (by oid), which is exact.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::bypass::BypassReason;
use crate::sql::{analyze, Read};

const VIEW_BODIES: &str = "
SELECT c.oid::int8, pg_get_viewdef(c.oid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'v'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgtier')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'";

/// A view's body as a read, or why it can never be cached.
pub type ViewBody = Result<Read, BypassReason>;

pub async fn load(client: &Client) -> Result<HashMap<u32, ViewBody>, tokio_postgres::Error> {
    let mut out = HashMap::new();
    for row in client.query(VIEW_BODIES, &[]).await? {
        let oid = row.get::<_, i64>(0) as u32;
        let def: Option<String> = row.get(1);
        out.insert(oid, body(def.as_deref().unwrap_or("")));
    }
    Ok(out)
}

/// Analyse one view definition. Any reason the statement analysis gives is a
/// reason not to cache the view (a time literal in a view body was evaluated
/// when the view was created, but is refused all the same: rare, and safe).
pub fn body(def: &str) -> ViewBody {
    analyze(def).read.map_err(|why| {
        tracing::debug!(reason = why.reason().label(), "view is not cacheable");
        BypassReason::UnsafeView
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_bodies_are_analysed_like_statements() {
        assert!(body(" SELECT items.id FROM items WHERE (items.until > now());").is_err());
        assert!(body(" SELECT t.a FROM t WHERE (t.tenant = CURRENT_USER);").is_err());
        assert!(
            body(" SELECT t.a FROM t WHERE (t.tenant = current_setting('app.tenant'::text));")
                .is_err()
        );
        assert!(
            body(" SELECT now() AS now;").is_err(),
            "no base tables is no excuse"
        );
        let r = body(" SELECT f.x FROM lookup(1) f(x);").expect("analysed");
        assert_eq!(r.functions, vec!["lookup".to_string()]);
        assert!(body(" SELECT t.a, lower(t.b) AS lower FROM t;").is_ok());
    }
}
