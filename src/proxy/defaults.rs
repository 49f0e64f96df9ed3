//! The settings a new session starts with that the startup packet and the
//! server's ParameterStatus reports do not show: `ALTER ROLE/DATABASE ... SET`,
//! `postgresql.conf`, `ALTER SYSTEM`. `search_path`, `extra_float_digits`,
//! `bytea_output` and the like change what a statement reads or how its result
//! is rendered, so two sessions that differ in them must never share entries.
//!
//! Before the session's first request, pgtier asks the server for a digest of
//! every setting not at its built-in default (one round trip, on the session's
//! own connection, before any client request reaches it). The digest becomes
//! part of the session's cache key. Settings changed later in the session are
//! followed as before (SET, ParameterStatus).

use bytes::{BufMut, BytesMut};

use super::conn::write_all;
use super::startup::{read_message, StartupError};
use super::upstream::ServerConn;
use crate::protocol::backend;

/// Settings set for the client's connection by its startup packet are keyed
/// from the packet itself; these never change a result. `pg_settings` hides
/// `role`, which `ALTER ROLE ... SET role` makes a session start under: the
/// role the session runs as is part of the digest when it is not the one it
/// logged in as (otherwise the key has it already, and entries a `public`
/// rule shares stay shared between roles). Every function and
/// operator is qualified: the query runs under the session's own
/// `search_path`, which a role may set for itself, and a role whose own `md5`
/// or `<>` came first could make the digest of its settings that of another
/// session's, and share its entries (`tests/hardening_role_code.rs`, case 24).
/// The digest ends in [`TEMP_MARK`] when the starting `search_path` names
/// `pg_temp`: an unqualified CREATE may then make a temporary object.
const QUERY: &str = "SELECT pg_catalog.concat(pg_catalog.md5(pg_catalog.concat(\
       pg_catalog.string_agg(\
         name OPERATOR(pg_catalog.||) '=' OPERATOR(pg_catalog.||) setting, ',' ORDER BY name), \
       CASE WHEN current_user OPERATOR(pg_catalog.<>) session_user \
         THEN ';current_user=' OPERATOR(pg_catalog.||) current_user END)), \
       CASE WHEN pg_catalog.strpos(pg_catalog.current_setting('search_path'), 'pg_temp') \
         OPERATOR(pg_catalog.>) 0 THEN ' pg_temp' END) \
     FROM pg_catalog.pg_settings \
     WHERE source OPERATOR(pg_catalog.<>) ALL (ARRAY['default', 'override', 'client']) \
       AND name OPERATOR(pg_catalog.<>) ALL \
         (ARRAY['application_name', 'session_authorization', 'is_superuser'])";

/// See [`QUERY`].
const TEMP_MARK: &str = " pg_temp";

/// Whether a session whose defaults have this digest started with `pg_temp`
/// in its `search_path`.
pub fn path_names_pg_temp(digest: &str) -> bool {
    digest.ends_with(TEMP_MARK)
}

/// Small replies only: anything bigger is not the answer to our query.
const LIMIT: usize = 64 * 1024;

/// Ask the server for the digest of the session's non-default settings. `None`
/// when the server would not say (the session then never uses the cache).
pub async fn probe(
    server: &mut ServerConn,
    buf: &mut BytesMut,
) -> Result<Option<String>, StartupError> {
    let mut q = BytesMut::with_capacity(QUERY.len() + 6);
    q.put_u8(b'Q');
    q.put_i32((QUERY.len() + 5) as i32);
    q.put_slice(QUERY.as_bytes());
    q.put_u8(0);
    write_all(server, &q).await?;
    let mut digest = None;
    let mut failed = false;
    loop {
        let (tag, msg) = read_message(server, buf, LIMIT).await?;
        match tag {
            backend::DATA_ROW => digest = first_column(&msg[5..]),
            backend::ERROR_RESPONSE => failed = true,
            backend::READY_FOR_QUERY => break,
            // RowDescription, CommandComplete, notices: nothing to keep.
            _ => {}
        }
    }
    Ok(if failed { None } else { digest })
}

/// The first column of a DataRow body as text, if it is not NULL.
fn first_column(body: &[u8]) -> Option<String> {
    let count = i16::from_be_bytes([*body.first()?, *body.get(1)?]);
    if count < 1 {
        return None;
    }
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let value = body.get(6..6 + usize::try_from(len).ok()?)?;
    Some(String::from_utf8_lossy(value).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_column_of_data_rows() {
        let mut row = vec![0, 1, 0, 0, 0, 3];
        row.extend_from_slice(b"abc");
        assert_eq!(first_column(&row).as_deref(), Some("abc"));
        assert_eq!(first_column(&[0, 1, 0xff, 0xff, 0xff, 0xff]), None); // NULL
        assert_eq!(first_column(&[0, 0]), None);
        assert_eq!(first_column(&[0, 1, 0, 0, 0, 9, b'x']), None); // truncated
        assert_eq!(first_column(&[0]), None);
    }
}
