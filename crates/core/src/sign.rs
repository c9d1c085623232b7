//! Request signing: pure functions, no I/O.
//!
//! The contract's signature is `v1=` + lowercase hex of
//! `HMAC-SHA256(secret, "<unix seconds>.<raw body>")`. While a secret is being
//! rotated the header carries one `v1=` signature per valid secret,
//! comma-separated; receivers accept the request if any one matches.
//! [`verify`] is that receiver side, used by `receive` and `verify`.
//!
//! Webhooks with `standard_webhooks = true` also carry the Standard Webhooks
//! signature ([`standard_signature`]): `v1,` + base64 of HMAC-SHA256 over
//! `"<msg id>.<timestamp>.<body>"`, keyed by the base64 part of a
//! `whsec_<base64>` secret.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The HMAC of `"<parts[0]>.<parts[1]>…"` under `key`: the framing of both
/// signatures, for signing and for verifying alike.
fn mac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let mut mac = HmacSha256::new_from_slice(key).expect("any key length");
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            mac.update(b".");
        }
        mac.update(part);
    }
    mac
}

/// One `v1=<hex>` signature of `body` sent at `timestamp` (unix seconds).
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mac = mac(secret.as_bytes(), &[timestamp.to_string().as_bytes(), body]);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The `X-Nexor-Signature` value: one signature per secret, comma-separated.
pub fn header<'a>(secrets: impl IntoIterator<Item = &'a str>, timestamp: i64, body: &[u8]) -> String {
    secrets.into_iter().map(|s| signature(s, timestamp, body)).collect::<Vec<_>>().join(",")
}

/// The key of a `whsec_<base64>` secret, as Standard Webhooks defines it;
/// `None` when the secret does not have that form.
pub fn standard_key(secret: &str) -> Option<Vec<u8>> {
    BASE64.decode(secret.strip_prefix("whsec_")?).ok().filter(|k| !k.is_empty())
}

/// The Standard Webhooks `webhook-signature` value for one key.
pub fn standard_signature(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let mac = mac(key, &[msg_id.as_bytes(), timestamp.to_string().as_bytes(), body]);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// Why a request's signature was not accepted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("timestamp {0:?} is not unix seconds")]
    BadTimestamp(String),
    #[error("timestamp is {0}s away from this clock, more than the tolerance")]
    Stale(i64),
    #[error("no v1= signature in the header")]
    NoSignature,
    #[error("a Standard Webhooks signature (v1,…) is checked with the message id (the webhook-id header)")]
    StandardWithoutId,
    #[error("no v1, signature in the header")]
    NoStandardSignature,
    #[error("the secret is not whsec_ followed by base64, which Standard Webhooks signatures are keyed by")]
    NotStandardSecret,
    #[error("no signature matches the secret")]
    NoMatch,
}

/// Checks a `X-Nexor-Signature` header the way a receiver must: the
/// timestamp within `tolerance` of `now_secs`, and any one `v1=` entry equal
/// (in constant time) to the HMAC of `"<timestamp>.<body>"`.
pub fn verify(
    secret: &str,
    header: &str,
    timestamp: &str,
    body: &[u8],
    tolerance: Duration,
    now_secs: i64,
) -> Result<(), VerifyError> {
    let ts = fresh(timestamp, tolerance, now_secs)?;
    let candidates: Vec<Vec<u8>> = header
        .split(',')
        .filter_map(|part| part.trim().strip_prefix("v1="))
        .filter_map(|hex_sig| hex::decode(hex_sig).ok())
        .collect();
    if candidates.is_empty() {
        return Err(if header.trim_start().starts_with("v1,") {
            VerifyError::StandardWithoutId
        } else {
            VerifyError::NoSignature
        });
    }
    matches_any(mac(secret.as_bytes(), &[ts.to_string().as_bytes(), body]), &candidates)
}

/// Whether one of `candidates` is `mac`'s value, each compared in constant time.
fn matches_any(mac: HmacSha256, candidates: &[Vec<u8>]) -> Result<(), VerifyError> {
    let matches = candidates.iter().any(|c| mac.clone().verify_slice(c).is_ok());
    matches.then_some(()).ok_or(VerifyError::NoMatch)
}

/// The timestamp, if it is unix seconds within `tolerance` of `now_secs`.
fn fresh(timestamp: &str, tolerance: Duration, now_secs: i64) -> Result<i64, VerifyError> {
    let ts: i64 = timestamp.trim().parse().map_err(|_| VerifyError::BadTimestamp(timestamp.to_owned()))?;
    let skew = now_secs - ts;
    if skew.unsigned_abs() > tolerance.as_secs() {
        return Err(VerifyError::Stale(skew));
    }
    Ok(ts)
}

/// Checks a Standard Webhooks `webhook-signature` header: the timestamp
/// (`webhook-timestamp`) within `tolerance`, and any one space-separated
/// `v1,<base64>` entry equal (in constant time) to the HMAC of
/// `"<msg_id>.<timestamp>.<body>"` keyed by the `whsec_` secret's bytes.
pub fn verify_standard(
    secret: &str,
    msg_id: &str,
    header: &str,
    timestamp: &str,
    body: &[u8],
    tolerance: Duration,
    now_secs: i64,
) -> Result<(), VerifyError> {
    let ts = fresh(timestamp, tolerance, now_secs)?;
    let key = standard_key(secret).ok_or(VerifyError::NotStandardSecret)?;
    let candidates: Vec<Vec<u8>> = header
        .split_whitespace()
        .filter_map(|part| part.strip_prefix("v1,"))
        .filter_map(|b64| BASE64.decode(b64).ok())
        .collect();
    if candidates.is_empty() {
        return Err(VerifyError::NoStandardSignature);
    }
    matches_any(mac(&key, &[msg_id.as_bytes(), ts.to_string().as_bytes(), body]), &candidates)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector printed in the README, so receivers can check their code.
    #[test]
    fn readme_vector() {
        let body = br#"{"event_type":"meeting.scheduled","event_id":"550e8400-e29b-41d4-a716-446655440000"}"#;
        assert_eq!(
            signature("whsec_test", 1776443400, body),
            "v1=084fb1e5efba6beb10cb24341e5ec0cf9944e53a12b00079d40992f378f3e647"
        );
    }

    /// RFC 4231 test case 2 (key "Jefe"), to tie our framing to plain HMAC-SHA256.
    #[test]
    fn matches_rfc4231_when_framed() {
        // message = "<ts>.<body>"; choose ts/body so the message is the RFC's text.
        let mut mac = HmacSha256::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let expected = hex::encode(mac.finalize().into_bytes());
        assert_eq!(expected, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        // The same primitive under our framing: "0." prefix + body.
        let sig = signature("Jefe", 0, b"what do ya want for nothing?");
        let mut mac = HmacSha256::new_from_slice(b"Jefe").unwrap();
        mac.update(b"0.what do ya want for nothing?");
        assert_eq!(sig, format!("v1={}", hex::encode(mac.finalize().into_bytes())));
    }

    #[test]
    fn verify_accepts_any_matching_signature_within_tolerance() {
        let tol = Duration::from_secs(300);
        let h = header(["old", "new"], 1000, b"{}");
        assert_eq!(verify("new", &h, "1000", b"{}", tol, 1100), Ok(()));
        assert_eq!(verify("old", &h, "1000", b"{}", tol, 900), Ok(()));
        assert_eq!(verify("other", &h, "1000", b"{}", tol, 1000), Err(VerifyError::NoMatch));
        assert_eq!(verify("new", &h, "1000", b"{ }", tol, 1000), Err(VerifyError::NoMatch));
        assert_eq!(
            verify("new", &h, "1000", b"{}", tol, 1300),
            Ok(()),
            "exactly the tolerance is still fresh"
        );
        assert_eq!(verify("new", &h, "1000", b"{}", tol, 1301), Err(VerifyError::Stale(301)));
        assert_eq!(verify("new", "v2=abc", "1000", b"{}", tol, 1000), Err(VerifyError::NoSignature));
        assert!(matches!(verify("new", &h, "soon", b"{}", tol, 1000), Err(VerifyError::BadTimestamp(_))));
        assert_eq!(verify("new", "v1,abc=", "1000", b"{}", tol, 1000), Err(VerifyError::StandardWithoutId));
    }

    #[test]
    fn verify_standard_accepts_what_standard_signature_makes() {
        let tol = Duration::from_secs(300);
        let secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
        let sig = standard_signature(&standard_key(secret).unwrap(), "msg_1", 1000, b"{}");
        let two = format!("v1,{} {sig}", BASE64.encode([0u8; 32]));
        assert_eq!(verify_standard(secret, "msg_1", &two, "1000", b"{}", tol, 1100), Ok(()));
        assert_eq!(
            verify_standard(secret, "msg_2", &sig, "1000", b"{}", tol, 1000),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            verify_standard(secret, "msg_1", &sig, "1000", b"{ }", tol, 1000),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            verify_standard(secret, "msg_1", &sig, "1000", b"{}", tol, 1301),
            Err(VerifyError::Stale(301))
        );
        assert_eq!(
            verify_standard("plain", "msg_1", &sig, "1000", b"{}", tol, 1000),
            Err(VerifyError::NotStandardSecret)
        );
        assert_eq!(
            verify_standard(secret, "msg_1", "v1=abc", "1000", b"{}", tol, 1000),
            Err(VerifyError::NoStandardSignature)
        );
    }

    /// The published Standard Webhooks test vector.
    #[test]
    fn standard_webhooks_vector() {
        let key = standard_key("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let sig = standard_signature(
            &key,
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        );
        assert_eq!(sig, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
        assert_eq!(standard_key("plain-secret"), None);
        assert_eq!(standard_key("whsec_***"), None);
    }

    #[test]
    fn rotation_header_lists_each_secret() {
        let h = header(["a", "b"], 1, b"{}");
        let parts: Vec<_> = h.split(',').collect();
        assert_eq!(parts, vec![signature("a", 1, b"{}"), signature("b", 1, b"{}")]);
    }
}
