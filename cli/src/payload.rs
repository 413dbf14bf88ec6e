//! A stored payload (MessagePack, as rmp-serde wrote it) as JSON, for `dead-letters show`.
//!
//! Owns the conversion only, and takes whatever MessagePack holds: a map key that is not a
//! string is written as its JSON text, binary data as an array of byte values, a number JSON
//! cannot hold (NaN, infinity) as `null`. It must not guess at the message's Rust type: the
//! CLI has none of the application's types.

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use std::fmt;

/// `bytes` decoded as one MessagePack value, as JSON.
pub fn to_json(bytes: &[u8]) -> Result<Value, String> {
    rmp_serde::from_slice::<Json>(bytes)
        .map(|j| j.0)
        .map_err(|e| e.to_string())
}

/// A JSON value read from any self-describing serde format.
struct Json(Value);

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

fn float(f: f64) -> Json {
    Json(Number::from_f64(f).map_or(Value::Null, Value::Number))
}

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any MessagePack value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Json, E> {
        Ok(Json(Value::Bool(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Json, E> {
        Ok(Json(Value::Number(v.into())))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Json, E> {
        Ok(Json(Value::Number(v.into())))
    }

    fn visit_f32<E: de::Error>(self, v: f32) -> Result<Json, E> {
        Ok(float(f64::from(v)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Json, E> {
        Ok(float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Json, E> {
        Ok(Json(Value::String(v.to_string())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Json, E> {
        Ok(Json(Value::String(v)))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Json, E> {
        Ok(Json(Value::Array(
            v.iter().map(|b| Value::Number((*b).into())).collect(),
        )))
    }

    fn visit_none<E: de::Error>(self) -> Result<Json, E> {
        Ok(Json(Value::Null))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Json, E> {
        Ok(Json(Value::Null))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
        Json::deserialize(d)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
        Json::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(Json(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Json(Value::Array(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut object = Map::new();
        while let Some((Json(key), Json(value))) = map.next_entry()? {
            let key = match key {
                Value::String(s) => s,
                other => other.to_string(),
            };
            object.insert(key, value);
        }
        Ok(Json(Value::Object(object)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(serde::Serialize)]
    struct Line {
        sku: String,
        quantity: i32,
    }

    #[derive(serde::Serialize)]
    struct Order {
        order_id: String,
        lines: Vec<Line>,
        total: f64,
        note: Option<String>,
        by_code: BTreeMap<u32, bool>,
    }

    #[test]
    fn a_named_msgpack_message_reads_as_json() {
        let order = Order {
            order_id: "A-1".into(),
            lines: vec![Line {
                sku: "WIDGET".into(),
                quantity: 2,
            }],
            total: 12.5,
            note: None,
            by_code: BTreeMap::from([(7, true)]),
        };
        let bytes = rmp_serde::to_vec_named(&order).unwrap();
        assert_eq!(
            to_json(&bytes).unwrap(),
            serde_json::json!({
                "order_id": "A-1",
                "lines": [{"sku": "WIDGET", "quantity": 2}],
                "total": 12.5,
                "note": null,
                "by_code": {"7": true}
            })
        );
    }

    #[test]
    fn binary_and_non_finite_values_and_garbage() {
        let bytes = rmp_serde::to_vec(&(serde_bytes_like(), f64::NAN)).unwrap();
        assert_eq!(
            to_json(&bytes).unwrap(),
            serde_json::json!([[1, 2, 255], null])
        );
        assert!(
            to_json(&[0xc1]).is_err(),
            "0xc1 is never used in MessagePack"
        );
        assert!(to_json(&[]).is_err());
    }

    /// A value rmp-serde writes as MessagePack `bin`.
    fn serde_bytes_like() -> Bin {
        Bin(vec![1, 2, 255])
    }

    struct Bin(Vec<u8>);
    impl serde::Serialize for Bin {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(&self.0)
        }
    }
}
