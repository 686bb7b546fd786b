//! Size limits every backend enforces before touching storage, so that callers get the same
//! typed error whatever the backend.

use crate::error::{Error, Result};

/// Longest key accepted, in bytes. Kubernetes keys (`/registry/<group>/<resource>/<ns>/<name>`)
/// stay well under it.
pub const MAX_KEY_BYTES: usize = 1024;

/// Largest value accepted, in bytes: 1.5 MiB, etcd's default request limit, which is what
/// Kubernetes objects are sized against. An etcd used as backend needs `--max-request-bytes`
/// above this (2 MiB) for values near the limit to fit in one request.
pub const MAX_VALUE_BYTES: usize = 1536 * 1024;

/// Checks a key that is about to be written or read.
pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidArgument {
            message: "key must not be empty".into(),
        });
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Error::KeyTooLarge {
            size: key.len(),
            limit: MAX_KEY_BYTES,
        });
    }
    Ok(())
}

/// Checks a value that is about to be written under `key`.
pub(crate) fn check_value(key: &str, value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(Error::ValueTooLarge {
            key: key.to_owned(),
            size: value.len(),
            limit: MAX_VALUE_BYTES,
        });
    }
    Ok(())
}

/// Checks a prefix for list, count and watch (empty means every key).
pub(crate) fn check_prefix(prefix: &str) -> Result<()> {
    if prefix.len() > MAX_KEY_BYTES {
        return Err(Error::KeyTooLarge {
            size: prefix.len(),
            limit: MAX_KEY_BYTES,
        });
    }
    Ok(())
}

/// The smallest byte string greater than every string starting with `prefix`, or `None` when
/// no such bound exists (empty prefix, or all `0xff`).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"/a/"), Some(b"/a0".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b""), None);
        assert_eq!(prefix_end(b"\xff\xff"), None);
    }

    #[test]
    fn limits_are_typed_errors() {
        assert!(matches!(check_key(""), Err(Error::InvalidArgument { .. })));
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(matches!(check_key(&long), Err(Error::KeyTooLarge { .. })));
        let big = vec![0u8; MAX_VALUE_BYTES + 1];
        assert!(matches!(
            check_value("k", &big),
            Err(Error::ValueTooLarge { size, .. }) if size == MAX_VALUE_BYTES + 1
        ));
        assert!(check_value("k", &big[..MAX_VALUE_BYTES]).is_ok());
    }
}
