//! The layer's own answers: `application/problem+json` bodies (RFC 9457).

use super::cached::ResponseBody;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use std::time::Duration;

/// A problem the layer answers itself, without running the inner service (or after it,
/// for a replay that cannot be given).
#[derive(Debug)]
pub(crate) struct Problem {
    pub(crate) status: StatusCode,
    /// stable, machine-readable name: the `code` member
    pub(crate) code: &'static str,
    pub(crate) detail: String,
    pub(crate) retry_after: Option<Duration>,
}

impl Problem {
    pub(crate) fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            status,
            code,
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub(crate) fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The response: `{"type":"about:blank","title":…,"status":…,"detail":…,"code":…}`
    /// and, when set, `Retry-After` in whole seconds (rounded up, at least 1).
    pub(crate) fn into_response<B>(self) -> Response<ResponseBody<B>> {
        // members in the order RFC 9457 lists them; strings escaped as JSON
        let text = |s: &str| serde_json::Value::from(s).to_string();
        let body = format!(
            r#"{{"type":"about:blank","title":{},"status":{},"detail":{},"code":{}}}"#,
            text(self.status.canonical_reason().unwrap_or("Error")),
            self.status.as_u16(),
            text(&self.detail),
            text(self.code),
        );
        let mut res = Response::new(ResponseBody::full(Bytes::from(body)));
        *res.status_mut() = self.status;
        res.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(after) = self.retry_after {
            let secs = after.as_millis().div_ceil(1000).max(1);
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs as u64));
        }
        res
    }
}
