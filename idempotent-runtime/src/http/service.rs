//! The service the layer wraps around the application: one request under the protocol.
//!
//! ```text
//! request ──no key / Off / no route matched / anonymous (Process)──▶ inner service as is
//!    │ key
//!    ├─bad key / body over cap / anonymous (Reject)──▶ 400 / 413 / 401 problem
//!    └─read body, fingerprint, claim (scope, client digest, key)   [in a task of its own]
//!         ├─Acquired──▶ inner service (lease renewed) ──2xx/3xx/4xx──▶ body streamed to the
//!         │                                          │                client and recorded;
//!         │                                          │                at its end complete
//!         │                                          └─5xx/408/429/401/403──▶ release, response as is
//!         ├─Completed──▶ recorded response + Idempotent-Replayed: true
//!         ├─InProgress──▶ 409 + Retry-After, or wait for the response
//!         ├─FingerprintMismatch──▶ 422
//!         └─store error──▶ 503, or inner service as is (on_store_error = process)
//! ```

use super::cached::{BoxError, Capture, HttpOutput, Read, ResponseBody, Tee, TeeEnd, read_body};
use super::config::{BODY_OMITTED, Clients, Config, KeyPolicy, REPLAYED};
use super::identity::{Anonymous, client_digest};
use super::key::{KeyError, parse_key};
use super::problem::Problem;
use crate::error::Error;
use crate::key::RecordKey;
use crate::protocol::single::{Call, CallKey, execute};
use crate::protocol::telemetry::{disabled, note_disabled};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, request};
use http_body::Body;
use pin_project_lite::pin_project;
use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::oneshot;
use tracing::Instrument;

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
    /// The response went to the client, and its body failed on the way.
    Streamed,
}

impl<E, B> From<Error> for Failure<E, B> {
    fn from(e: Error) -> Self {
        Failure::Protocol(e)
    }
}

type Answer<B, E> = Result<Response<ResponseBody<B>>, E>;
type BoxRun<E, B> = Pin<Box<dyn Future<Output = Result<HttpOutput, Failure<E, B>>> + Send>>;

/// Where a keyed request's answer goes: given once, by whoever has it first (the
/// response as soon as its head is known, or the protocol's answer).
struct Reply<B, E>(Arc<Mutex<Option<AnswerTx<B, E>>>>);

type AnswerTx<B, E> = oneshot::Sender<Answer<B, E>>;

impl<B, E> Clone for Reply<B, E> {
    fn clone(&self) -> Self {
        Reply(self.0.clone())
    }
}

impl<B, E> Reply<B, E> {
    fn new() -> (Self, oneshot::Receiver<Answer<B, E>>) {
        let (tx, rx) = oneshot::channel();
        (Reply(Arc::new(Mutex::new(Some(tx)))), rx)
    }

    /// Gives the answer, unless one was given; dropped when the client is gone.
    fn send(&self, answer: Answer<B, E>) {
        let tx = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(tx) = tx {
            let _ = tx.send(answer);
        }
    }
}

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
        if disabled() {
            note_disabled();
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        let (mut parts, body) = req.into_parts();
        let policy = (self.config.policy)(&parts);
        if policy == KeyPolicy::Off {
            return ResponseFuture::passthrough(self.inner.call(Request::from_parts(parts, body)));
        }
        // a request no route matched gets the router's answer, and is never recorded
        let Some(scope) = self.config.scope_of(&mut parts) else {
            return ResponseFuture::passthrough(self.inner.call(Request::from_parts(parts, body)));
        };
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
        let client = match &self.config.clients {
            Clients::Shared => None,
            Clients::Identified {
                identity,
                anonymous,
            } => match identity(&parts).filter(|id| !id.is_empty()) {
                Some(id) => Some(client_digest(&id)),
                None => match anonymous {
                    Anonymous::Reject(status) => {
                        return ResponseFuture::problem(Problem::new(
                            *status,
                            "idempotency_client_unidentified",
                            "a request with an Idempotency-Key must come from an identified client; authenticate and retry with the same key",
                        ));
                    }
                    Anonymous::Process => {
                        return ResponseFuture::passthrough(
                            self.inner.call(Request::from_parts(parts, body)),
                        );
                    }
                },
            },
        };
        // the ready service goes with the request; a clone stays for the next one
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let (reply, rx) = Reply::new();
        let request = Keyed {
            config: self.config.clone(),
            scope,
            client,
            key,
        };
        // The request runs in a task of its own: a client that goes away neither stops
        // the service nor keeps its response from being recorded, and a response body
        // streams to the client while the task records it.
        tokio::spawn(keyed(request, inner, parts, body, reply).in_current_span());
        ResponseFuture {
            state: State::Keyed { rx },
        }
    }
}

fn key_problem(e: KeyError) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, e.code(), e.to_string())
}

/// What a keyed request is recorded under.
struct Keyed {
    config: Arc<Config>,
    scope: Cow<'static, str>,
    /// the client's digest; `None` in a shared key space
    client: Option<String>,
    key: String,
}

/// One request with a key, under the protocol; its answer goes to `reply`.
async fn keyed<S, ReqB, ResB>(
    request: Keyed,
    mut inner: S,
    parts: request::Parts,
    body: ReqB,
    reply: Reply<ResB, S::Error>,
) where
    S: tower::Service<Request<ReqB>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let Keyed {
        config,
        scope,
        client,
        key,
    } = request;
    let mut body = std::pin::pin!(body);
    let body = match read_body(body.as_mut(), config.max_request_body).await {
        Read::Whole(b) => b,
        Read::Over => {
            return reply.send(Ok(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_body_too_large",
                format!(
                    "a request with an Idempotency-Key may have a body of at most {} bytes",
                    config.max_request_body
                ),
            )
            .into_response()));
        }
        Read::Failed(e) => {
            let e: BoxError = e.into();
            return reply.send(Ok(Problem::new(
                StatusCode::BAD_REQUEST,
                "request_body_unreadable",
                format!("the request body could not be read: {e}"),
            )
            .into_response()));
        }
    };
    let fingerprint = config.fingerprint_of(&parts, &body);
    let record_key = match &client {
        Some(client) => RecordKey::new(&scope, &(client.as_str(), key.as_str())),
        None => RecordKey::new(&scope, key.as_str()),
    };
    let record_key = match record_key {
        Ok(k) => k,
        Err(e) => return reply.send(Ok(protocol_problem(e, &config).into_response())),
    };
    let req = Request::from_parts(parts, ReqB::from(body));
    let (release_on, cap, skip) = (
        config.release_on,
        config.max_cached_body,
        config.skip_headers.clone(),
    );
    let streamed = reply.clone();
    // closed when this task is done recording: a streamed body's end waits for it
    let (recorded, recorded_rx) = oneshot::channel::<()>();
    // boxed: the protocol's future moves it, and it holds the request
    let run: BoxRun<S::Error, ResB> = Box::pin(async move {
        let res = inner.call(req).await.map_err(Failure::Service)?;
        if release_on(res.status()) {
            return Err(Failure::Released(res));
        }
        let (head, body) = res.into_parts();
        if body.size_hint().upper().is_some_and(|n| n <= cap as u64) {
            // it fits (as most do): read in place, answer when it is recorded
            let mut capture = Capture::new(usize::MAX);
            return match capture.read_rest(std::pin::pin!(body)).await {
                Ok(()) => {
                    let (body, trailers) = capture.finish();
                    Ok(HttpOutput::Whole {
                        head,
                        body: body.unwrap_or_default(),
                        trailers,
                        cap,
                        skip,
                    })
                }
                Err(e) => Err(Failure::Body(head, e)),
            };
        }
        // streamed to the client as it comes, recorded when it ends
        let (status, headers) = (head.status, head.headers.clone());
        let (tee, end) = Tee::new(body, cap, recorded_rx);
        streamed.send(Ok(Response::from_parts(head, ResponseBody::tee(tee))));
        let capture = match end.await {
            Ok(TeeEnd::Ended(capture)) => capture,
            // the client went away: the rest is read here, and recorded
            Ok(TeeEnd::Dropped {
                mut rest,
                mut capture,
            }) => {
                capture
                    .read_rest(rest.as_mut())
                    .await
                    .map_err(|_| Failure::Streamed)?;
                capture
            }
            Ok(TeeEnd::Failed) | Err(_) => return Err(Failure::Streamed),
        };
        let (body, trailers) = capture.finish();
        Ok(HttpOutput::Streamed {
            status,
            headers,
            body,
            trailers,
            skip,
        })
    });
    let call = Call {
        scope: (&scope).into(),
        store: config.store.at(),
        key: CallKey::Finished(record_key),
        fingerprint,
    };
    let outcome = execute(&config.settings, call, run).await;
    drop(recorded);
    let answer = match outcome {
        Ok(HttpOutput::Whole {
            head,
            body,
            trailers,
            ..
        }) => Ok(Response::from_parts(
            head,
            ResponseBody::full_with_trailers(body, trailers),
        )),
        // answered when its head was known
        Ok(HttpOutput::Streamed { .. }) | Err(Failure::Streamed) => return,
        Ok(HttpOutput::Replayed {
            status,
            mut headers,
            body,
            trailers,
        }) => {
            // records written before a header was skipped do not give it either
            for name in config.skip_headers.iter() {
                headers.remove(name);
            }
            let omitted = body.is_none();
            let mut res = Response::new(ResponseBody::full_with_trailers(
                body.unwrap_or_default(),
                trailers,
            ));
            *res.status_mut() = status;
            *res.headers_mut() = headers;
            mark_replayed(res.headers_mut(), omitted);
            Ok(res)
        }
        Err(Failure::Released(res)) => Ok(res.map(ResponseBody::inner)),
        Err(Failure::Service(e)) => Err(e),
        Err(Failure::Body(head, e)) => Ok(Response::from_parts(head, ResponseBody::failed(e))),
        Err(Failure::Protocol(e)) => Ok(protocol_problem(e, &config).into_response()),
    };
    reply.send(answer);
}

fn mark_replayed(headers: &mut HeaderMap, omitted: bool) {
    headers.insert(REPLAYED, HeaderValue::from_static("true"));
    if omitted {
        headers.insert(BODY_OMITTED, HeaderValue::from_static("true"));
    }
}

/// The answer to a protocol outcome other than a response.
fn protocol_problem(e: Error, config: &Config) -> Problem {
    match e {
        Error::InProgress { retry_after } => Problem::new(
            StatusCode::CONFLICT,
            "idempotency_key_in_use",
            "a request with this Idempotency-Key is being processed; retry after the time in Retry-After",
        )
        // a short hint, never past the running request's lease
        .retry_after(config.retry_after.min(retry_after)),
        Error::FingerprintMismatch => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used for a request with another method, path, content type or body; use a new key for a new request",
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
        Keyed { #[pin] rx: oneshot::Receiver<Answer<B, E>> },
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
            StateProj::Keyed { rx } => rx.poll(cx).map(|r| match r {
                Ok(answer) => answer,
                // the request's task ended without an answer: the service panicked
                Err(_) => Ok(Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "idempotency_error",
                    "the request ended without a response; its Idempotency-Key was released, retry with the same key",
                )
                .into_response()),
            }),
        }
    }
}
