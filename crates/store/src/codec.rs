//! The one pair of functions that knows how values are encoded: a
//! format-version byte, then bincode. Swapping the encoder or migrating
//! records touches only this file.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::StoreError;

/// First byte of every stored value; bump it when a record's shape changes.
const FORMAT_VERSION: u8 = 2;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard())
        .expect("writing to a Vec cannot fail");
    out
}

pub fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { key: hex::encode(key), reason };
    match bytes.split_first() {
        Some((&FORMAT_VERSION, rest)) => bincode::serde::decode_from_slice(rest, bincode::config::standard())
            .map(|(v, _)| v)
            .map_err(|e| corrupt(e.to_string())),
        Some((v, _)) => Err(corrupt(format!("format version {v}, this build reads {FORMAT_VERSION}"))),
        None => Err(corrupt("empty value".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_other_versions() {
        let value = (7u32, "busy".to_owned(), Some(503u16));
        let bytes = encode(&value);
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<(u32, String, Option<u16>)>(b"k", &bytes).unwrap(), value);
        let mut future = bytes.clone();
        future[0] = FORMAT_VERSION + 1;
        assert!(matches!(
            decode::<(u32, String, Option<u16>)>(b"k", &future),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(decode::<u32>(b"k", &[]), Err(StoreError::Corrupt { .. })));
    }
}
