//! Idempotency keys: which messages were delivered, per key space, so that a duplicate is not
//! delivered again. A key is recorded in the same transaction that settles its message (the
//! outputs are already delivered then): recording it earlier would lose a message whose delivery
//! then failed.

use super::{StoreResult, now_micros};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashSet;
use std::sync::Arc;

/// A delivered message's key, to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub scope: Arc<str>,
    pub key: String,
    pub message_id: String,
    /// When the key is forgotten (µs since the epoch).
    pub expires_at: i64,
}

/// The keys of `keys` already delivered in `scope` (and not expired).
pub fn seen_keys(conn: &Connection, scope: &str, keys: &[String]) -> StoreResult<HashSet<String>> {
    let now = now_micros();
    let mut found = HashSet::new();
    let mut q = conn.prepare_cached("SELECT 1 FROM idempotency_keys WHERE scope = ?1 AND key = ?2 AND expires_at > ?3")?;
    for k in keys {
        if q.exists(params![scope, k, now])? {
            found.insert(k.clone());
        }
    }
    Ok(found)
}

/// Records a key; false when it was already there (and live): the message is a duplicate.
pub fn record_key(conn: &Connection, k: &KeyRecord) -> StoreResult<bool> {
    let now = now_micros();
    // An expired row is taken over; a live one is left alone and reported.
    let changed = conn
        .prepare_cached(
            "INSERT INTO idempotency_keys (scope, key, message_id, recorded_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (scope, key) DO UPDATE SET message_id = excluded.message_id, recorded_at = excluded.recorded_at,
                expires_at = excluded.expires_at
             WHERE idempotency_keys.expires_at <= excluded.recorded_at",
        )?
        .execute(params![k.scope.as_ref(), k.key, k.message_id, now, k.expires_at])?;
    Ok(changed == 1)
}

/// Deletes up to `limit` expired keys; how many it deleted.
pub fn purge_keys(conn: &Connection, limit: usize) -> StoreResult<usize> {
    Ok(conn
        .prepare_cached(
            "DELETE FROM idempotency_keys WHERE (scope, key) IN
               (SELECT scope, key FROM idempotency_keys WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
        )?
        .execute(params![now_micros(), limit as i64])?)
}

/// Forgets one key, so that its message can be delivered again on purpose; false if it was not
/// recorded.
pub fn forget_key(conn: &Connection, scope: &str, key: &str) -> StoreResult<bool> {
    Ok(conn.prepare_cached("DELETE FROM idempotency_keys WHERE scope = ?1 AND key = ?2")?.execute(params![scope, key])? == 1)
}

/// The last applied version of each of `keys` that has one.
pub fn last_versions(conn: &Connection, scope: &str, keys: &[String]) -> StoreResult<std::collections::HashMap<String, String>> {
    let mut q = conn.prepare_cached("SELECT version FROM entity_versions WHERE scope = ?1 AND key = ?2")?;
    let mut found = std::collections::HashMap::new();
    for k in keys {
        if let Some(v) = q.query_row(params![scope, k], |r| r.get::<_, String>(0)).optional()? {
            found.insert(k.clone(), v);
        }
    }
    Ok(found)
}

/// Records applied versions, keeping the later one when a key has one already.
pub fn record_versions(conn: &Connection, scope: &str, versions: &[(String, String)]) -> StoreResult<()> {
    let known = last_versions(conn, scope, &versions.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>())?;
    let now = now_micros();
    for (k, v) in versions {
        if known.get(k).is_some_and(|old| crate::pipeline::compare_versions(v, old).is_le()) {
            continue;
        }
        conn.prepare_cached(
            "INSERT INTO entity_versions (scope, key, version, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (scope, key) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
        )?
        .execute(params![scope, k, v, now])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(super::super::SCHEMA).unwrap();
        c
    }

    fn key(k: &str, expires_at: i64) -> KeyRecord {
        KeyRecord { scope: Arc::from("orders"), key: k.into(), message_id: format!("m-{k}"), expires_at }
    }

    #[test]
    fn a_key_is_recorded_once_and_then_seen() {
        let c = store();
        let later = now_micros() + 60_000_000;
        assert!(record_key(&c, &key("shopify:1", later)).unwrap());
        assert!(!record_key(&c, &key("shopify:1", later)).unwrap(), "a live key is a duplicate");
        let seen = seen_keys(&c, "orders", &["shopify:1".into(), "shopify:2".into()]).unwrap();
        assert_eq!(seen, HashSet::from(["shopify:1".to_string()]));
        assert!(seen_keys(&c, "other-scope", &["shopify:1".into()]).unwrap().is_empty(), "scopes do not share keys");
    }

    #[test]
    fn an_expired_key_is_neither_seen_nor_a_duplicate_and_is_purged() {
        let c = store();
        let past = now_micros() - 1;
        assert!(record_key(&c, &key("a", past)).unwrap());
        assert!(seen_keys(&c, "orders", &["a".into()]).unwrap().is_empty());
        assert!(record_key(&c, &key("a", past)).unwrap(), "an expired key is taken over");
        record_key(&c, &key("b", now_micros() + 60_000_000)).unwrap();
        assert_eq!(purge_keys(&c, 100).unwrap(), 1);
        assert_eq!(seen_keys(&c, "orders", &["b".into()]).unwrap().len(), 1, "live keys stay");
    }

    #[test]
    fn a_forgotten_key_can_be_delivered_again() {
        let c = store();
        record_key(&c, &key("a", now_micros() + 60_000_000)).unwrap();
        assert!(forget_key(&c, "orders", "a").unwrap());
        assert!(!forget_key(&c, "orders", "a").unwrap());
        assert!(record_key(&c, &key("a", now_micros() + 60_000_000)).unwrap());
    }
}
