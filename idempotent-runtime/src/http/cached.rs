//! Responses as the store keeps them (raw bytes, through the output codec), the body
//! the layer answers with (streamed to the client while it is recorded), and reading
//! bodies under a size cap.
//!
//! A cached response is the raw-bytes output `1 | status (u16) | flags (u8) | header
//! count (u16) | (name length (u16) | name | value length (u32) | value)* | [trailer
//! count (u16) | (the same pairs)*] | body`, all integers big-endian; flag bit 0 says
//! the body was over the cap and is not cached, bit 1 that trailers follow the headers.

use crate::error::Error;
use crate::output::OutputBuf;
use crate::output::{Output, not_replayable, read_raw, write_raw};
use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode, response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::sync::oneshot;

/// The error type of [`ResponseBody`]: the inner body's error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

const FORMAT: u8 = 1;
const BODY_OMITTED: u8 = 1;
const HAS_TRAILERS: u8 = 2;

/// Headers never stored with a response: the hop-by-hop ones (RFC 9110 §7.6.1).
/// (`Trailer` is end to end: it is stored, and declares the trailers a replay sends.)
const HOP_BY_HOP: [HeaderName; 6] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TE,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// Whether a response header is stored for replays, and given on a replay.
pub(crate) fn replayable_header(name: &HeaderName, skip: &[HeaderName]) -> bool {
    !HOP_BY_HOP.contains(name) && !skip.contains(name)
}

/// What the inner service answered, or what a replay gives back: the protocol's output.
pub(crate) enum HttpOutput {
    /// A fresh response read whole before it goes to the client (a short body of known
    /// size); `body` is all of it, whatever the cap.
    Whole {
        head: response::Parts,
        body: Bytes,
        trailers: Option<HeaderMap>,
        cap: usize,
        skip: Arc<[HeaderName]>,
    },
    /// A fresh response that streamed to the client as it was produced; `body` is
    /// `None` when it was over the cap.
    Streamed {
        status: StatusCode,
        headers: HeaderMap,
        body: Option<Bytes>,
        trailers: Option<HeaderMap>,
        skip: Arc<[HeaderName]>,
    },
    /// A cached response; `body` is `None` when it was over the cap.
    Replayed {
        status: StatusCode,
        headers: HeaderMap,
        body: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
}

impl Output for HttpOutput {
    fn encode(&self, buf: &mut OutputBuf, _cap: usize) -> bool {
        // the layer applies its own body cap while reading the body
        match self {
            HttpOutput::Whole {
                head,
                body,
                trailers,
                cap,
                skip,
            } => encode_response(
                buf,
                head.status,
                &head.headers,
                (body.len() <= *cap).then_some(body),
                trailers.as_ref(),
                skip,
            ),
            HttpOutput::Streamed {
                status,
                headers,
                body,
                trailers,
                skip,
            } => encode_response(
                buf,
                *status,
                headers,
                body.as_ref(),
                trailers.as_ref(),
                skip,
            ),
            HttpOutput::Replayed { .. } => false,
        }
    }

    fn decode(cached: Option<Vec<u8>>) -> Result<Self, Error> {
        read_raw(cached.as_deref())?;
        // one buffer for all: header values and the body are slices of it, not copies
        let mut r = Reader {
            all: Bytes::from(cached.unwrap_or_default()),
            pos: 1, // after the raw-bytes tag
        };
        if r.take(1)?[..] != [FORMAT] {
            return Err(not_replayable("unknown cached response format"));
        }
        let status = StatusCode::from_u16(r.u16()?)
            .map_err(|_| not_replayable("bad status in the cached response"))?;
        let flags = r.take(1)?[0];
        let headers = r.fields()?;
        let trailers = if flags & HAS_TRAILERS != 0 {
            Some(r.fields()?)
        } else {
            None
        };
        let body = (flags & BODY_OMITTED == 0).then(|| r.all.slice(r.pos..));
        Ok(HttpOutput::Replayed {
            status,
            headers,
            body,
            trailers,
        })
    }
}

/// Writes one response in the cached format; `body` is `None` when it is not kept.
fn encode_response(
    buf: &mut OutputBuf,
    status: StatusCode,
    headers: &HeaderMap,
    body: Option<&Bytes>,
    trailers: Option<&HeaderMap>,
    skip: &[HeaderName],
) -> bool {
    let stored =
        |n: &HeaderName| replayable_header(n, skip) && (body.is_some() || !is_body_header(n));
    let Some(count) = field_count(headers, stored) else {
        tracing::warn!("response has over 65535 headers; it is not cached");
        return false;
    };
    let mut flags = if body.is_some() { 0 } else { BODY_OMITTED };
    if trailers.is_some() {
        flags |= HAS_TRAILERS;
    }
    write_raw(
        buf,
        &[
            &[FORMAT],
            &status.as_u16().to_be_bytes(),
            &[flags],
            &count.to_be_bytes(),
        ],
    );
    if !write_fields(buf, headers, stored) {
        return false;
    }
    if let Some(trailers) = trailers {
        let all = |_: &HeaderName| true;
        let Some(count) = field_count(trailers, all) else {
            return false;
        };
        write_more(buf, &[&count.to_be_bytes()]);
        if !write_fields(buf, trailers, all) {
            return false;
        }
    }
    if let Some(body) = body {
        write_more(buf, &[body]);
    }
    true
}

fn field_count(fields: &HeaderMap, keep: impl Fn(&HeaderName) -> bool) -> Option<u16> {
    u16::try_from(fields.iter().filter(|(n, _)| keep(n)).count()).ok()
}

fn write_fields(
    buf: &mut OutputBuf,
    fields: &HeaderMap,
    keep: impl Fn(&HeaderName) -> bool,
) -> bool {
    for (name, value) in fields.iter().filter(|(n, _)| keep(n)) {
        let (n, v) = (name.as_str().as_bytes(), value.as_bytes());
        // names are short and values are bounded by the server's header limits
        let (Ok(nl), Ok(vl)) = (u16::try_from(n.len()), u32::try_from(v.len())) else {
            return false;
        };
        write_more(buf, &[&nl.to_be_bytes(), n, &vl.to_be_bytes(), v]);
    }
    true
}

/// Headers that describe a body, not stored when the body is not.
fn is_body_header(name: &HeaderName) -> bool {
    name == http::header::CONTENT_LENGTH
        || name == http::header::CONTENT_ENCODING
        || name == http::header::CONTENT_RANGE
}

fn write_more(buf: &mut OutputBuf, parts: &[&[u8]]) {
    use std::io::Write;
    for p in parts {
        // an OutputBuf never fails a write
        let _ = buf.write_all(p);
    }
}

/// Reads a cached response from `pos` on.
struct Reader {
    all: Bytes,
    pos: usize,
}

impl Reader {
    fn take(&mut self, n: usize) -> Result<Bytes, Error> {
        if self.all.len() - self.pos < n {
            return Err(not_replayable("the cached response is truncated"));
        }
        let b = self.all.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, Error> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, Error> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A count, then that many name–value pairs.
    fn fields(&mut self) -> Result<HeaderMap, Error> {
        let count = self.u16()?;
        let mut fields = HeaderMap::with_capacity(usize::from(count));
        for _ in 0..count {
            let n = usize::from(self.u16()?);
            let name = HeaderName::from_bytes(&self.take(n)?)
                .map_err(|_| not_replayable("bad header name in the cached response"))?;
            let v = self.u32()? as usize;
            let value = HeaderValue::from_maybe_shared(self.take(v)?)
                .map_err(|_| not_replayable("bad header value in the cached response"))?;
            fields.append(name, value);
        }
        Ok(fields)
    }
}

/// What a response body carried, as far as a record keeps it: its bytes up to a cap
/// (none once over it) and its trailers.
#[derive(Debug)]
pub(crate) struct Capture {
    data: BytesMut,
    cap: usize,
    over: bool,
    trailers: Option<HeaderMap>,
}

impl Capture {
    pub(crate) fn new(cap: usize) -> Self {
        Capture {
            data: BytesMut::new(),
            cap,
            over: false,
            trailers: None,
        }
    }

    fn frame(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            if self.over {
                return;
            }
            if self.data.len() + data.len() > self.cap {
                tracing::warn!(
                    cap = self.cap,
                    "response body is over the cache cap; replays get its status and headers without it"
                );
                self.over = true;
                self.data = BytesMut::new();
            } else {
                self.data.extend_from_slice(data);
            }
        } else if let Some(trailers) = frame.trailers_ref() {
            self.trailers = Some(trailers.clone());
        }
    }

    /// The body (`None` when it was over the cap) and the trailers.
    pub(crate) fn finish(self) -> (Option<Bytes>, Option<HeaderMap>) {
        ((!self.over).then(|| self.data.freeze()), self.trailers)
    }

    /// Reads the rest of `body` into the capture.
    pub(crate) async fn read_rest<B>(&mut self, mut body: Pin<&mut B>) -> Result<(), BoxError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        while !body.is_end_stream() {
            match poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
                None => break,
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(frame)) => self.frame(&frame),
            }
        }
        Ok(())
    }
}

/// How a body streamed through the layer ended.
pub(crate) enum TeeEnd<B> {
    /// It ended: what it carried.
    Ended(Capture),
    /// It failed; the client got the error.
    Failed,
    /// The client went away before its end: the rest, and what was captured so far.
    Dropped { rest: Pin<Box<B>>, capture: Capture },
}

/// A body on its way to the client that keeps what it carries for the record, and
/// tells the layer how it ended. Its end (the last frame, or the end of the stream)
/// reaches the client once the layer has recorded it, as a response read whole does:
/// a client that has the whole response and retries gets the replay.
pub(crate) struct Tee<B> {
    body: Option<Pin<Box<B>>>,
    capture: Option<Capture>,
    end: Option<oneshot::Sender<TeeEnd<B>>>,
    /// closed when the layer is done recording
    recorded: oneshot::Receiver<()>,
    finish: Finish,
}

/// Where a [`Tee`] is in giving its end to the client.
enum Finish {
    Streaming,
    /// The inner body ended: its last frame, if it came with the end, is held until
    /// the record is done.
    Holding(Option<Frame<Bytes>>),
    /// The end went out.
    Done,
}

impl<B> std::fmt::Debug for Tee<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tee")
            .field("ended", &self.body.is_none())
            .field("capture", &self.capture)
            .finish_non_exhaustive()
    }
}

impl<B> Tee<B> {
    /// The tee of `body`, capturing up to `cap` bytes; where its end is told; and
    /// `recorded`, which the layer closes once the response is recorded.
    pub(crate) fn new(
        body: B,
        cap: usize,
        recorded: oneshot::Receiver<()>,
    ) -> (Self, oneshot::Receiver<TeeEnd<B>>) {
        let (tx, rx) = oneshot::channel();
        let tee = Tee {
            body: Some(Box::pin(body)),
            capture: Some(Capture::new(cap)),
            end: Some(tx),
            recorded,
            finish: Finish::Streaming,
        };
        (tee, rx)
    }

    fn end(&mut self, how: impl FnOnce(Capture) -> TeeEnd<B>) {
        if let (Some(tx), Some(capture)) = (self.end.take(), self.capture.take()) {
            // the layer may be gone (its task ended): nothing to record then
            let _ = tx.send(how(capture));
        }
    }
}

impl<B> Drop for Tee<B> {
    fn drop(&mut self) {
        if let (Some(tx), Some(capture), Some(rest)) =
            (self.end.take(), self.capture.take(), self.body.take())
        {
            let _ = tx.send(TeeEnd::Dropped { rest, capture });
        }
    }
}

impl<B> Tee<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Finish::Holding(last) = &mut self.finish {
            // whether recorded or not (the layer's task is gone), the end goes out
            let _ = ready!(Pin::new(&mut self.recorded).poll(cx));
            let last = last.take();
            self.finish = Finish::Done;
            return Poll::Ready(last.map(Ok));
        }
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(body.as_mut().poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(c) = self.capture.as_mut() {
                    c.frame(&frame);
                }
                // trailers are the last frame, whatever the body says
                if !body.is_end_stream() && !frame.is_trailers() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                self.body = None;
                self.end(TeeEnd::Ended);
                self.finish = Finish::Holding(Some(frame));
                self.poll_frame(cx)
            }
            Some(Err(e)) => {
                self.body = None;
                self.end(|_| TeeEnd::Failed);
                Poll::Ready(Some(Err(e.into())))
            }
            None => {
                self.body = None;
                self.end(TeeEnd::Ended);
                self.finish = Finish::Holding(None);
                self.poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_none() && !matches!(self.finish, Finish::Holding(_))
    }
}

pin_project! {
    /// The body of a response that went through the layer: the inner service's body as
    /// is, a body read in full (fresh or replayed) with its trailers, or the inner
    /// service's body streamed to the client while it is recorded.
    #[project = ResponseBodyProj]
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Full { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Tee { tee: Tee<B> },
        Failed { error: Option<BoxError> },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        ResponseBody {
            kind: Kind::Inner { body },
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        Self::full_with_trailers(data, None)
    }

    pub(crate) fn full_with_trailers(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        ResponseBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    /// A body that fails with `error` (the inner body failed while the layer read it).
    pub(crate) fn failed(error: BoxError) -> Self {
        ResponseBody {
            kind: Kind::Failed { error: Some(error) },
        }
    }

    pub(crate) fn tee(tee: Tee<B>) -> Self {
        ResponseBody {
            kind: Kind::Tee { tee },
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            KindProj::Full { data, trailers } => Poll::Ready(match data.take() {
                Some(d) => Some(Ok(Frame::data(d))),
                None => trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
            KindProj::Tee { tee } => tee.poll_frame(cx),
            KindProj::Failed { error } => Poll::Ready(error.take().map(Err)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Tee { tee } => tee.is_end_stream(),
            Kind::Failed { error } => error.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Full { data, trailers } => {
                let len = data.as_ref().map_or(0, |d| d.len() as u64);
                if trailers.is_none() {
                    SizeHint::with_exact(len)
                } else {
                    // no exact length: HTTP/1.1 then sends the body chunked, with trailers
                    let mut hint = SizeHint::new();
                    hint.set_lower(len);
                    hint
                }
            }
            Kind::Tee { tee } => tee
                .body
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint()),
            Kind::Failed { .. } => SizeHint::new(),
        }
    }
}

/// A request body read under a cap.
pub(crate) enum Read<E> {
    /// The whole body (trailers are dropped).
    Whole(Bytes),
    /// Over the cap.
    Over,
    /// The body failed.
    Failed(E),
}

/// Reads `body` to its end, unless it is over `cap` bytes.
pub(crate) async fn read_body<B: Body<Data = Bytes>>(
    mut body: Pin<&mut B>,
    cap: usize,
) -> Read<B::Error> {
    if body.size_hint().lower() > cap as u64 {
        return Read::Over;
    }
    let mut first: Option<Bytes> = None;
    let mut more: Option<BytesMut> = None;
    let mut len = 0usize;
    while !body.is_end_stream() {
        match poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            None => break,
            Some(Err(e)) => return Read::Failed(e),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers
                };
                len += data.len();
                if len > cap {
                    return Read::Over;
                }
                // one chunk (the usual case) is kept as is, without a copy
                match (&mut first, &mut more) {
                    (None, _) => first = Some(data),
                    (Some(f), None) => {
                        let mut m = BytesMut::with_capacity(f.len() + data.len());
                        m.extend_from_slice(f);
                        m.extend_from_slice(&data);
                        more = Some(m);
                    }
                    (_, Some(m)) => m.extend_from_slice(&data),
                }
            }
        }
    }
    Read::Whole(match more {
        Some(m) => m.freeze(),
        None => first.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(status: u16, headers: &[(&'static str, &'static str)]) -> response::Parts {
        let mut res = http::Response::new(());
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        for (n, v) in headers {
            res.headers_mut().append(*n, HeaderValue::from_static(v));
        }
        res.into_parts().0
    }

    fn encoded(out: &HttpOutput) -> Vec<u8> {
        let mut buf = OutputBuf::new();
        assert!(out.encode(&mut buf, 0));
        buf.as_slice().to_vec()
    }

    fn replayed(out: &HttpOutput) -> (StatusCode, HeaderMap, Option<Bytes>, Option<HeaderMap>) {
        match HttpOutput::decode(Some(encoded(out))).unwrap() {
            HttpOutput::Replayed {
                status,
                headers,
                body,
                trailers,
            } => (status, headers, body, trailers),
            _ => panic!("a replay"),
        }
    }

    #[test]
    fn a_recorded_response_comes_back_whole_without_skipped_headers() {
        let out = HttpOutput::Whole {
            head: head(
                201,
                &[
                    ("content-type", "application/json"),
                    ("set-cookie", "a=1"),
                    ("x-request-id", "1"),
                    ("x-request-id", "2"),
                    ("connection", "keep-alive"),
                    ("x-skipped", "1"),
                ],
            ),
            body: Bytes::from_static(b"{\"id\":17}"),
            trailers: None,
            cap: 1024,
            skip: Arc::new([
                http::header::SET_COOKIE,
                HeaderName::from_static("x-skipped"),
            ]),
        };
        let (status, headers, body, trailers) = replayed(&out);
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(headers.len(), 3);
        assert_eq!(headers.get_all("x-request-id").iter().count(), 2);
        assert!(!headers.contains_key("connection") && !headers.contains_key("x-skipped"));
        assert!(!headers.contains_key("set-cookie"));
        assert_eq!(body.unwrap(), Bytes::from_static(b"{\"id\":17}"));
        assert!(trailers.is_none());
    }

    #[test]
    fn trailers_are_recorded_and_come_back() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        t.insert("grpc-message", HeaderValue::from_static("ok"));
        let out = HttpOutput::Streamed {
            status: StatusCode::OK,
            headers: head(200, &[("content-type", "application/grpc")]).headers,
            body: Some(Bytes::from_static(b"\0\0\0\0\x01x")),
            trailers: Some(t.clone()),
            skip: Arc::new([]),
        };
        let (_, headers, body, trailers) = replayed(&out);
        assert_eq!(headers["content-type"], "application/grpc");
        assert_eq!(body.unwrap(), Bytes::from_static(b"\0\0\0\0\x01x"));
        assert_eq!(trailers.unwrap(), t);
    }

    #[test]
    fn an_over_cap_response_is_recorded_without_its_body() {
        let out = HttpOutput::Whole {
            head: head(200, &[("content-length", "5"), ("location", "/x/1")]),
            body: Bytes::from_static(b"12345"),
            trailers: None,
            cap: 4,
            skip: Arc::new([]),
        };
        let (_, headers, body, _) = replayed(&out);
        assert!(body.is_none());
        assert!(!headers.contains_key("content-length"));
        assert_eq!(headers["location"], "/x/1");
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        let out = HttpOutput::Streamed {
            status: StatusCode::OK,
            headers: head(200, &[("x-a", "b")]).headers,
            body: Some(Bytes::from_static(b"body")),
            trailers: Some(t),
            skip: Arc::new([]),
        };
        let good = encoded(&out);
        for cut in 0..good.len() - 4 {
            assert!(HttpOutput::decode(Some(good[..cut].to_vec())).is_err());
        }
        assert!(HttpOutput::decode(Some(b"{\"json\":1}".to_vec())).is_err());
        assert!(HttpOutput::decode(None).is_err());
        let mut bad_status = good.clone();
        bad_status[2..4].copy_from_slice(&1000u16.to_be_bytes());
        assert!(HttpOutput::decode(Some(bad_status)).is_err());
    }
}
