//! The service the layer wraps around the application: one request under the protocol.
//!
//! ```text
//! request ──no key / Off──▶ inner service as is
//!    │ key
//!    ├─bad key / body over cap──▶ 400 / 413 problem
//!    └─read body, fingerprint, claim (scope, identity, key)
//!         ├─Acquired──▶ inner service (lease renewed) ──2xx/3xx/4xx──▶ complete(status, headers, body)
//!         │                                          └─5xx/408/429──▶ release, response as is
//!         ├─Completed──▶ recorded response + Idempotent-Replayed: true
//!         ├─InProgress──▶ 409 + Retry-After, or wait for the response
//!         ├─FingerprintMismatch──▶ 422
//!         └─store error──▶ 503, or inner service as is (on_store_error = process)
//! ```

use super::cached::{BoxError, HttpOutput, Read, ResponseBody, read_body};
use super::key::{KeyError, parse_key};
use super::problem::Problem;
use super::{BODY_OMITTED, Config, KeyPolicy, REPLAYED, ScopeRule};
use crate::protocol::{self, Call, CallKey};
use crate::{Error, RecordKey};
use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response, StatusCode, request};
use http_body::Body;
use pin_project_lite::pin_project;
use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The service [`IdempotencyLayer`](super::IdempotencyLayer) wraps around an inner
/// service.
#[derive(Clone)]
pub struct Idempotent<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Idempotent<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        Idempotent { inner, config }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for Idempotent<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotent")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish()
    }
}

/// How the inner service's answer ended, when it is not a response to record.
enum Failure<E, B> {
    /// The protocol's answer (in use, mismatch, store down, …).
    Protocol(Error),
    /// A status in the release set: the claim was released; the response goes out as is.
    Released(Response<B>),
    /// The inner service failed.
    Service(E),
    /// The inner service's body failed while the layer read it.
    Body(http::response::Parts, BoxError),
}

impl<E, B> From<Error> for Failure<E, B> {
    fn from(e: Error) -> Self {
        Failure::Protocol(e)
    }
}

type Answer<B, E> = Result<Response<ResponseBody<B>>, E>;
type BoxAnswer<B, E> = Pin<Box<dyn Future<Output = Answer<B, E>> + Send>>;
type BoxRun<B, E> = Pin<Box<dyn Future<Output = Result<HttpOutput<B>, Failure<E, B>>> + Send>>;

impl<S, ReqB, ResB> tower::Service<Request<ReqB>> for Idempotent<S>
where
    S: tower::Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if protocol::disabled() {
            protocol::note_disabled();
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        let (parts, body) = req.into_parts();
        let policy = (self.config.policy)(&parts);
        if policy == KeyPolicy::Off {
            return ResponseFuture::passthrough(self.inner.call(Request::from_parts(parts, body)));
        }
        let key = match parse_key(&parts.headers, self.config.max_key_len) {
            Ok(Some(key)) => key,
            Ok(None) if policy == KeyPolicy::Optional => {
                return ResponseFuture::passthrough(
                    self.inner.call(Request::from_parts(parts, body)),
                );
            }
            Ok(None) => return ResponseFuture::problem(key_problem(KeyError::Missing)),
            Err(e) => return ResponseFuture::problem(key_problem(e)),
        };
        // the ready service goes with the request; a clone stays for the next one
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let fut: BoxAnswer<ResB, S::Error> =
            Box::pin(keyed(self.config.clone(), inner, parts, body, key));
        ResponseFuture {
            state: State::Keyed {
                fut: Detached(Some(fut)),
            },
        }
    }
}

fn key_problem(e: KeyError) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, e.code(), e.to_string())
}

/// One request with a key, under the protocol.
async fn keyed<S, ReqB, ResB>(
    config: Arc<Config>,
    mut inner: S,
    parts: request::Parts,
    body: ReqB,
    key: String,
) -> Answer<ResB, S::Error>
where
    S: tower::Service<Request<ReqB>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    ReqB: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    let body = match read_body(body.as_mut(), config.max_request_body).await {
        Read::Whole(b) => b,
        Read::Over(..) => {
            return Ok(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_body_too_large",
                format!(
                    "a request with an Idempotency-Key may have a body of at most {} bytes",
                    config.max_request_body
                ),
            )
            .into_response());
        }
        Read::Failed(e) => {
            let e: BoxError = e.into();
            return Ok(Problem::new(
                StatusCode::BAD_REQUEST,
                "request_body_unreadable",
                format!("the request body could not be read: {e}"),
            )
            .into_response());
        }
    };
    let fingerprint = config.fingerprint_of(&parts, &body);
    let computed;
    let scope: &Cow<'static, str> = match &config.scope {
        ScopeRule::Fixed(s) => s,
        ScopeRule::MethodAndRoute => {
            computed = config.scope_of(&parts);
            &computed
        }
    };
    let identity = config.identity.as_ref().and_then(|f| f(&parts));
    let record_key = match identity.as_deref() {
        Some(id) if !id.is_empty() => RecordKey::new(scope, &(id, key.as_str())),
        _ => RecordKey::new(scope, key.as_str()),
    };
    let record_key = match record_key {
        Ok(k) => k,
        Err(e) => return Ok(protocol_problem(e).into_response()),
    };
    let req = Request::from_parts(parts, ReqB::from(body));
    let (release_on, cap, skip) = (
        config.release_on,
        config.max_cached_body,
        config.skip_headers.clone(),
    );
    // boxed: the protocol's future moves it, and it holds the request
    let run: BoxRun<ResB, S::Error> = Box::pin(async move {
        let res = inner.call(req).await.map_err(Failure::Service)?;
        if release_on(res.status()) {
            return Err(Failure::Released(res));
        }
        let (head, body) = res.into_parts();
        if body.size_hint().upper().is_some_and(|n| n <= cap as u64) {
            // it fits (as most do): read in place, no box for the rest
            let mut body = std::pin::pin!(body);
            return match read_body(body.as_mut(), usize::MAX).await {
                Read::Whole(body) | Read::Over(body) => Ok(HttpOutput::Whole { head, body, skip }),
                Read::Failed(e) => Err(Failure::Body(head, e.into())),
            };
        }
        let mut rest = Box::pin(body);
        match read_body(rest.as_mut(), cap).await {
            Read::Whole(body) => Ok(HttpOutput::Whole { head, body, skip }),
            Read::Over(prefix) => {
                tracing::warn!(
                    cap,
                    "response body is over the cache cap; replays get its status and headers without it"
                );
                Ok(HttpOutput::Over {
                    head,
                    prefix,
                    rest,
                    skip,
                })
            }
            Read::Failed(e) => Err(Failure::Body(head, e.into())),
        }
    });
    let call = Call {
        scope: scope.into(),
        store: config.store.at(),
        key: CallKey::Finished(record_key),
        fingerprint,
    };
    match protocol::execute(&config.settings, call, run).await {
        Ok(HttpOutput::Whole { head, body, .. }) => {
            Ok(Response::from_parts(head, ResponseBody::full(body)))
        }
        Ok(HttpOutput::Over {
            head, prefix, rest, ..
        }) => Ok(Response::from_parts(
            head,
            ResponseBody::prefixed(prefix, rest),
        )),
        Ok(HttpOutput::Replayed {
            status,
            headers,
            body,
        }) => {
            let omitted = body.is_none();
            let mut res = Response::new(ResponseBody::full(body.unwrap_or_default()));
            *res.status_mut() = status;
            *res.headers_mut() = headers;
            res.headers_mut()
                .insert(REPLAYED, HeaderValue::from_static("true"));
            if omitted {
                res.headers_mut()
                    .insert(BODY_OMITTED, HeaderValue::from_static("true"));
            }
            Ok(res)
        }
        Err(Failure::Released(res)) => Ok(res.map(ResponseBody::inner)),
        Err(Failure::Service(e)) => Err(e),
        Err(Failure::Body(head, e)) => Ok(Response::from_parts(head, ResponseBody::failed(e))),
        Err(Failure::Protocol(e)) => Ok(protocol_problem(e).into_response()),
    }
}

/// The answer to a protocol outcome other than a response.
fn protocol_problem(e: Error) -> Problem {
    match e {
        Error::InProgress { retry_after } => Problem::new(
            StatusCode::CONFLICT,
            "idempotency_key_in_use",
            "a request with this Idempotency-Key is being processed; retry after the time in Retry-After",
        )
        .retry_after(retry_after),
        Error::FingerprintMismatch => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used for a request with another method, path or body; use a new key for a new request",
        ),
        Error::AttemptsExhausted { attempts } => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_exhausted",
            format!("the request with this Idempotency-Key failed {attempts} times; it is not tried again"),
        ),
        Error::Store(e) => {
            tracing::warn!(error = %e, "idempotency store unavailable; answering 503");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "idempotency_store_unavailable",
                "the request could not be checked for duplicates; nothing was done, retry later with the same Idempotency-Key",
            )
            .retry_after(std::time::Duration::from_secs(1))
        }
        Error::OutputNotReplayable { .. } => Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "idempotency_replay_unreadable",
            "a request with this Idempotency-Key completed, but its recorded response cannot be read",
        ),
        e => Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "idempotency_error",
            e.to_string(),
        ),
    }
}

/// A request future that, if dropped before it finishes (the client went away), is
/// handed to the runtime to finish: the inner service's work is recorded, and the
/// client's retry gets its response.
struct Detached<O: 'static>(Option<Pin<Box<dyn Future<Output = O> + Send>>>);

impl<O> Future for Detached<O> {
    type Output = O;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<O> {
        let Some(fut) = self.0.as_mut() else {
            panic!("request future polled after it completed");
        };
        let out = std::task::ready!(fut.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(out)
    }
}

impl<O: 'static> Drop for Detached<O> {
    fn drop(&mut self) {
        if let Some(fut) = self.0.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = fut.await;
            });
        }
    }
}

pin_project! {
    /// The future of [`Idempotent`]'s response.
    pub struct ResponseFuture<F, B: 'static, E: 'static> {
        #[pin]
        state: State<F, B, E>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B: 'static, E: 'static> {
        Passthrough { #[pin] fut: F },
        Ready { res: Option<Response<ResponseBody<B>>> },
        Keyed { fut: Detached<Answer<B, E>> },
    }
}

impl<F, B: 'static, E> ResponseFuture<F, B, E> {
    fn passthrough(fut: F) -> Self {
        ResponseFuture {
            state: State::Passthrough { fut },
        }
    }

    fn problem(p: Problem) -> Self {
        ResponseFuture {
            state: State::Ready {
                res: Some(p.into_response()),
            },
        }
    }
}

impl<F, B: 'static, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Passthrough { .. } => "passthrough",
            State::Ready { .. } => "ready",
            State::Keyed { .. } => "keyed",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<F, B: 'static, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Answer<B, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Passthrough { fut } => fut
                .poll(cx)
                .map(|r| r.map(|res| res.map(ResponseBody::inner))),
            StateProj::Ready { res } => match res.take() {
                Some(res) => Poll::Ready(Ok(res)),
                None => panic!("response future polled after it completed"),
            },
            StateProj::Keyed { fut } => Pin::new(fut).poll(cx),
        }
    }
}
