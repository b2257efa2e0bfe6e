//! `Sec-WebSocket-Key` / `Sec-WebSocket-Accept` (RFC 6455 section 4.2.2).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha1::{Digest, Sha1};

const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A fresh random key, as a client must send.
pub fn generate_key() -> String {
    STANDARD.encode(rand::random::<[u8; 16]>())
}

/// True when `key` is base64 of exactly 16 bytes.
pub fn is_valid_key(key: &str) -> bool {
    key.len() == 24 && STANDARD.decode(key).is_ok_and(|b| b.len() == 16)
}

/// The accept value a server returns for `key`.
pub fn accept_for(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID);
    STANDARD.encode(h.finalize())
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc_example() {
        assert_eq!(
            super::accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert!(super::is_valid_key("dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!super::is_valid_key("dGhlIHNhbXBsZQ=="));
    }
}
