//! What an application message is: commands (intent, handled by exactly one receptor) and events
//! (facts, applied by any number of perspectives).
//!
//! Owns the traits users implement on their message types and the payload codec (rmp-serde).
//! It must not know about envelopes, actors or storage.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Every message has a stable type name (what the store and the wire carry; never `TypeId`,
/// which changes between builds) and belongs to a stream (an aggregate or entity id). Messages
/// of one stream are stored, published and applied in order.
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stable name of this message type, e.g. `"OrderCreated"`.
    const TYPE_NAME: &'static str;

    /// The stream this message belongs to.
    fn stream_id(&self) -> String;
}

/// A request to do something, handled by the one receptor registered for its type.
pub trait Command: Message {}

/// A fact that happened, appended to the event store and applied by perspectives.
pub trait Event: Message {}

/// A payload that could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The message could not be serialized.
    #[error("cannot encode {type_name}: {message}")]
    Encode {
        /// The message's type name.
        type_name: String,
        /// What rmp-serde said.
        message: String,
    },
    /// The bytes are not a valid encoding of the type.
    #[error("cannot decode {type_name}: {message}")]
    Decode {
        /// The type the bytes were read as.
        type_name: String,
        /// What rmp-serde said.
        message: String,
    },
}

/// Encodes a message body with rmp-serde (MessagePack, field names kept so that adding a field
/// stays compatible with older readers).
pub fn encode<M: Message>(message: &M) -> Result<Vec<u8>, CodecError> {
    // Grown from empty, a small message's buffer was reallocated three or four times.
    let mut body = Vec::with_capacity(64);
    rmp_serde::encode::write_named(&mut body, message).map_err(|e| CodecError::Encode {
        type_name: M::TYPE_NAME.into(),
        message: e.to_string(),
    })?;
    Ok(body)
}

/// Decodes a message body produced by [`encode`].
pub fn decode<M: Message>(bytes: &[u8]) -> Result<M, CodecError> {
    rmp_serde::from_slice(bytes).map_err(|e| CodecError::Decode {
        type_name: M::TYPE_NAME.into(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Ping {
        id: String,
        n: u32,
    }
    impl Message for Ping {
        const TYPE_NAME: &'static str = "Ping";
        fn stream_id(&self) -> String {
            self.id.clone()
        }
    }

    #[test]
    fn round_trips_and_rejects_garbage() {
        let p = Ping {
            id: "s-1".into(),
            n: 7,
        };
        let bytes = encode(&p).unwrap();
        assert_eq!(decode::<Ping>(&bytes).unwrap(), p);
        let err = decode::<Ping>(&[0xc1, 0x00]).unwrap_err();
        assert!(err.to_string().contains("Ping"));
    }
}
