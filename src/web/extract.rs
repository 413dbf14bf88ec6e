//! Request extractors that answer their failures as problems: a JSON body ([`Json`]) and the
//! `Idempotency-Key` header ([`IdempotencyKey`]).
//!
//! Owns reading and checking what a client sent before any dispatch: the content type (415),
//! the size against the limit in [`BodyLimit`] (413), the JSON (400 naming the field at
//! fault), the idempotency key's form (400). It must not dispatch anything nor store keys:
//! what a key means is the store's business (`DispatchOptions::idempotency_key`).

use super::problem::Problem;
use actix_web::dev::Payload;
use actix_web::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use actix_web::{FromRequest, HttpRequest, web};
use futures::StreamExt as _;
use futures::future::{LocalBoxFuture, Ready, ready};
use serde::de::DeserializeOwned;

/// The most bytes a [`Json`] body may have; register it as app data
/// (`App::new().app_data(BodyLimit::from_config(runtime.config()))`). Without it the limit is
/// [`BodyLimit::DEFAULT`], the default of `transport.max_message_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimit(pub usize);

impl BodyLimit {
    /// 1 MiB, the default of `transport.max_message_bytes`.
    pub const DEFAULT: BodyLimit = BodyLimit(1_048_576);

    /// `transport.max_message_bytes`: a body larger than what the transport carries is refused
    /// before it is parsed.
    pub fn from_config(config: &crate::Config) -> BodyLimit {
        BodyLimit(config.transport.max_message_bytes as usize)
    }
}

impl Default for BodyLimit {
    fn default() -> BodyLimit {
        BodyLimit::DEFAULT
    }
}

/// A JSON request body of type `T`. Refuses with a problem: 415 when the content type is not
/// `application/json` (or `…+json`), 413 over the [`BodyLimit`], 400 when the body does not
/// parse into `T`, naming the field (`lines[0].quantity`) in the problem's `field` member.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T> Json<T> {
    /// The parsed body.
    pub fn into_inner(self) -> T {
        self.0
    }
}

/// Whether `content_type` names JSON (`application/json`, `application/problem+json`, with any
/// parameters).
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Parses `body` into `T`, naming the field at fault when it does not.
// A `Problem` is a refused request's whole answer, built once per refusal, never on the path
// of a request that succeeds: its size costs nothing worth a box.
#[allow(clippy::result_large_err)]
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let problem = Problem::bad_request(format!("the body is not a valid request: {inner}"));
        // `.` is the root: the JSON itself is broken (or a member is missing at the top).
        if path == "." {
            problem
        } else {
            problem.with_field(path)
        }
    })
}

impl<T: DeserializeOwned + 'static> FromRequest for Json<T> {
    type Error = Problem;
    type Future = LocalBoxFuture<'static, Result<Json<T>, Problem>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let limit = req
            .app_data::<BodyLimit>()
            .or_else(|| req.app_data::<web::Data<BodyLimit>>().map(|d| d.get_ref()))
            .copied()
            .unwrap_or_default()
            .0;
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("(not text)").to_string());
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let mut payload = payload.take();
        Box::pin(async move {
            match content_type.as_deref() {
                Some(ct) if is_json(ct) => {}
                other => return Err(Problem::unsupported_media_type(other)),
            }
            if let Some(size) = declared
                && size > limit
            {
                return Err(Problem::too_large(Some(size), limit));
            }
            let mut body = web::BytesMut::new();
            while let Some(chunk) = payload.next().await {
                let chunk = chunk.map_err(|e| {
                    Problem::bad_request(format!("the body could not be read: {e}"))
                })?;
                if body.len() + chunk.len() > limit {
                    return Err(Problem::too_large(None, limit));
                }
                body.extend_from_slice(&chunk);
            }
            parse_json(&body).map(Json)
        })
    }
}

/// The `Idempotency-Key` request header: `None` when absent. A key is 1 to
/// [`IdempotencyKey::MAX_LEN`] printable ASCII characters; anything else is refused with 400
/// naming the header. Put it in `DispatchOptions::idempotency_key`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdempotencyKey(pub Option<String>);

impl IdempotencyKey {
    /// The header's name.
    pub const HEADER: &'static str = "Idempotency-Key";
    /// The longest key accepted.
    pub const MAX_LEN: usize = 255;

    /// Checks a header value: printable ASCII (space to `~`), 1 to 255 characters.
    #[allow(clippy::result_large_err)] // a refusal's whole answer, as for `parse_json`
    pub fn parse(value: &[u8]) -> Result<String, Problem> {
        let invalid = |why: &str| {
            Problem::bad_request(format!("the Idempotency-Key header {why}"))
                .with_field(IdempotencyKey::HEADER)
        };
        if value.is_empty() {
            return Err(invalid("is empty"));
        }
        if value.len() > IdempotencyKey::MAX_LEN {
            return Err(invalid(&format!(
                "is {} characters, over the limit of {}",
                value.len(),
                IdempotencyKey::MAX_LEN
            )));
        }
        if !value.iter().all(|b| (0x20..=0x7e).contains(b)) {
            return Err(invalid("must be printable ASCII"));
        }
        // Checked above: every byte is ASCII.
        Ok(value.iter().map(|&b| char::from(b)).collect())
    }

    /// The request's key, if it has one; 400 when it is malformed or sent twice.
    #[allow(clippy::result_large_err)] // a refusal's whole answer, as for `parse_json`
    pub fn of(req: &HttpRequest) -> Result<IdempotencyKey, Problem> {
        let mut values = req.headers().get_all(IdempotencyKey::HEADER);
        match (values.next(), values.next()) {
            (None, _) => Ok(IdempotencyKey(None)),
            (Some(_), Some(_)) => Err(Problem::bad_request(
                "the Idempotency-Key header was sent more than once",
            )
            .with_field(IdempotencyKey::HEADER)),
            (Some(v), None) => IdempotencyKey::parse(v.as_bytes()).map(|k| IdempotencyKey(Some(k))),
        }
    }

    /// The key, if the request had one.
    pub fn into_inner(self) -> Option<String> {
        self.0
    }
}

impl FromRequest for IdempotencyKey {
    type Error = Problem;
    type Future = Ready<Result<IdempotencyKey, Problem>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        ready(IdempotencyKey::of(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Line {
        sku: String,
        quantity: i32,
    }
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Order {
        order_id: String,
        lines: Vec<Line>,
    }

    #[test]
    fn a_bad_field_is_named() {
        let p = parse_json::<Order>(br#"{"order_id":"1","lines":[{"sku":"A","quantity":"x"}]}"#)
            .unwrap_err();
        assert_eq!(p.status, 400);
        assert_eq!(p.field.as_deref(), Some("lines[0].quantity"));
        // Cut short inside a member: that member is named.
        let cut = parse_json::<Order>(b"{\"order_id\":").unwrap_err();
        assert_eq!(cut.field.as_deref(), Some("order_id"));
        let broken = parse_json::<Order>(b"not json").unwrap_err();
        assert_eq!(broken.status, 400);
        assert_eq!(broken.field, None);
    }

    #[test]
    fn json_content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/merge-patch+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json("application/x-www-form-urlencoded"));
    }

    #[test]
    fn idempotency_keys_are_printable_ascii_up_to_255() {
        assert_eq!(IdempotencyKey::parse(b"order 42/a").unwrap(), "order 42/a");
        assert!(IdempotencyKey::parse(b"").is_err());
        assert!(IdempotencyKey::parse("é".as_bytes()).is_err());
        assert!(IdempotencyKey::parse(b"a\tb").is_err());
        assert!(IdempotencyKey::parse(&[b'k'; 255]).is_ok());
        let long = IdempotencyKey::parse(&[b'k'; 256]).unwrap_err();
        assert_eq!(long.field.as_deref(), Some("Idempotency-Key"));
    }
}
