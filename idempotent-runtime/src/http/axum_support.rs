//! axum 0.8 integration: the [`IdempotencyKey`] extractor. (The layer also takes the
//! route axum matched as the default scope.)

use super::key::{KeyError, parse_key};
use super::problem::Problem;
use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::request::Parts;

/// The request's `Idempotency-Key`, for handlers that log it or pass it downstream.
///
/// As `IdempotencyKey` it is required (a request without the header, or with a
/// malformed one, is refused with 400 and an `application/problem+json` body); as
/// `Option<IdempotencyKey>` only a malformed header is refused. The layer checks the
/// key's length; the extractor takes whatever length reached it.
///
/// ```
/// use idempotent_runtime::http::IdempotencyKey;
///
/// async fn create_order(IdempotencyKey(key): IdempotencyKey) -> String {
///     format!("order for request {key}")
/// }
/// # let _ = axum::routing::post::<_, _, ()>(create_order);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(pub String);

impl IntoResponse for KeyError {
    fn into_response(self) -> Response {
        Problem::new(StatusCode::BAD_REQUEST, self.code(), self.to_string())
            .into_response::<axum::body::Body>()
            .map(axum::body::Body::new)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = KeyError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, KeyError> {
        match parse_key(&parts.headers, usize::MAX)? {
            Some(key) => Ok(IdempotencyKey(key)),
            None => Err(KeyError::Missing),
        }
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for IdempotencyKey {
    type Rejection = KeyError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Option<Self>, KeyError> {
        Ok(parse_key(&parts.headers, usize::MAX)?.map(IdempotencyKey))
    }
}

/// Whether an axum `Router` is routing `req`: it sets its path parameters on every
/// request it routes, those its fallback answers included, and a matched route's path
/// besides. A layer outside any router sees neither.
pub(crate) fn inside_router(req: &mut Parts) -> bool {
    use axum::extract::RawPathParams;
    use axum::extract::rejection::RawPathParamsRejection;
    use futures_util::FutureExt;
    // the extractor reads an extension: it is ready at once
    matches!(
        <RawPathParams as FromRequestParts<()>>::from_request_parts(req, &()).now_or_never(),
        Some(Ok(_) | Err(RawPathParamsRejection::InvalidUtf8InPathParam(_)))
    )
}
