//! Responses as the store keeps them (raw bytes, through the output codec), the body
//! the layer answers with, and reading bodies under a size cap.
//!
//! A cached response is the raw-bytes output `1 | status (u16) | flags (u8) | header
//! count (u16) | (name length (u16) | name | value length (u32) | value)* | body`, all
//! integers big-endian; flag bit 0 says the body was over the cap and is not cached.

use crate::Error;
use crate::output::OutputBuf;
use crate::output::{Output, not_replayable, read_raw, write_raw};
use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode, response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The error type of [`ResponseBody`]: the inner body's error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

const FORMAT: u8 = 1;
const BODY_OMITTED: u8 = 1;

/// Headers never stored with a response: the hop-by-hop ones (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// Whether a response header is stored for replays.
pub(crate) fn replayable_header(name: &HeaderName, skip: &[HeaderName]) -> bool {
    !HOP_BY_HOP.contains(name) && !skip.contains(name)
}

/// What the inner service answered, or what a replay gives back: the protocol's output.
pub(crate) enum HttpOutput<B> {
    /// A fresh response whose whole body was read (at most the cap).
    Whole {
        head: response::Parts,
        body: Bytes,
        /// headers not stored with the response
        skip: std::sync::Arc<[HeaderName]>,
    },
    /// A fresh response whose body is over the cap: `prefix` was read, `rest` follows.
    /// Its status and headers are cached, not its body.
    Over {
        head: response::Parts,
        prefix: Bytes,
        rest: Pin<Box<B>>,
        skip: std::sync::Arc<[HeaderName]>,
    },
    /// A cached response; `body` is `None` when it was over the cap.
    Replayed {
        status: StatusCode,
        headers: HeaderMap,
        body: Option<Bytes>,
    },
}

impl<B> Output for HttpOutput<B> {
    fn encode(&self, buf: &mut OutputBuf, _cap: usize) -> bool {
        // the layer applies its own body cap while reading the body
        let (head, body, skip) = match self {
            HttpOutput::Whole { head, body, skip } => (head, Some(body), skip),
            HttpOutput::Over { head, skip, .. } => (head, None, skip),
            HttpOutput::Replayed { .. } => return false,
        };
        let stored = || {
            head.headers.iter().filter(|(n, _)| {
                replayable_header(n, skip) && (body.is_some() || !is_body_header(n))
            })
        };
        let Ok(count) = u16::try_from(stored().count()) else {
            tracing::warn!("response has over 65535 headers; it is not cached");
            return false;
        };
        let flags = if body.is_some() { 0 } else { BODY_OMITTED };
        let status = head.status.as_u16().to_be_bytes();
        let count = count.to_be_bytes();
        write_raw(buf, &[&[FORMAT], &status, &[flags], &count]);
        for (name, value) in stored() {
            let (n, v) = (name.as_str().as_bytes(), value.as_bytes());
            // names are short and values are bounded by the server's header limits
            let (Ok(nl), Ok(vl)) = (u16::try_from(n.len()), u32::try_from(v.len())) else {
                return false;
            };
            write_raw_more(buf, &[&nl.to_be_bytes(), n, &vl.to_be_bytes(), v]);
        }
        if let Some(body) = body {
            write_raw_more(buf, &[body]);
        }
        true
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
        let count = r.u16()?;
        let mut headers = HeaderMap::with_capacity(usize::from(count));
        for _ in 0..count {
            let n = usize::from(r.u16()?);
            let name = HeaderName::from_bytes(&r.take(n)?)
                .map_err(|_| not_replayable("bad header name in the cached response"))?;
            let v = r.u32()? as usize;
            let value = HeaderValue::from_maybe_shared(r.take(v)?)
                .map_err(|_| not_replayable("bad header value in the cached response"))?;
            headers.append(name, value);
        }
        let body = (flags & BODY_OMITTED == 0).then(|| r.all.slice(r.pos..));
        Ok(HttpOutput::Replayed {
            status,
            headers,
            body,
        })
    }
}

/// Headers that describe a body, not stored when the body is not.
fn is_body_header(name: &HeaderName) -> bool {
    name == http::header::CONTENT_LENGTH
        || name == http::header::CONTENT_ENCODING
        || name == http::header::CONTENT_RANGE
}

fn write_raw_more(buf: &mut OutputBuf, parts: &[&[u8]]) {
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
}

pin_project! {
    /// The body of a response that went through the layer: the inner service's body as
    /// is, a body read in full (fresh or replayed), or the part of a long body read so
    /// far followed by the rest.
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
        Full { data: Option<Bytes> },
        Prefixed { prefix: Option<Bytes>, rest: Pin<Box<B>> },
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
        ResponseBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// A body that fails with `error` (the inner body failed while the layer read it).
    pub(crate) fn failed(error: BoxError) -> Self {
        ResponseBody {
            kind: Kind::Failed { error: Some(error) },
        }
    }

    pub(crate) fn prefixed(prefix: Bytes, rest: Pin<Box<B>>) -> Self {
        ResponseBody {
            kind: Kind::Prefixed {
                prefix: (!prefix.is_empty()).then_some(prefix),
                rest,
            },
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
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Prefixed { prefix, rest } => match prefix.take() {
                Some(p) => Poll::Ready(Some(Ok(Frame::data(p)))),
                None => rest.as_mut().poll_frame(cx).map_err(Into::into),
            },
            KindProj::Failed { error } => Poll::Ready(error.take().map(Err)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
            Kind::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
            Kind::Failed { error } => error.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Prefixed { prefix, rest } => {
                let p = prefix.as_ref().map_or(0, |d| d.len() as u64);
                let r = rest.size_hint();
                let mut h = SizeHint::new();
                h.set_lower(r.lower() + p);
                if let Some(u) = r.upper() {
                    h.set_upper(u + p);
                }
                h
            }
            Kind::Failed { .. } => SizeHint::new(),
        }
    }
}

/// A body read under a cap.
pub(crate) enum Read<E> {
    /// The whole body (trailers are dropped).
    Whole(Bytes),
    /// Over the cap: what was read; the rest is still in the body.
    Over(Bytes),
    /// The body failed.
    Failed(E),
}

/// Reads `body` to its end, or until it is over `cap` bytes.
pub(crate) async fn read_body<B: Body<Data = Bytes>>(
    mut body: Pin<&mut B>,
    cap: usize,
) -> Read<B::Error> {
    if body.size_hint().lower() > cap as u64 {
        return Read::Over(Bytes::new());
    }
    let mut first: Option<Bytes> = None;
    let mut more: Option<BytesMut> = None;
    let mut len = 0usize;
    loop {
        if body.is_end_stream() {
            break;
        }
        match poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            None => break,
            Some(Err(e)) => return Read::Failed(e),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers
                };
                len += data.len();
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
                if len > cap {
                    return Read::Over(match more {
                        Some(m) => m.freeze(),
                        None => first.unwrap_or_default(),
                    });
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
    use std::sync::Arc;

    fn head(status: u16, headers: &[(&'static str, &'static str)]) -> response::Parts {
        let mut res = http::Response::new(());
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        for (n, v) in headers {
            res.headers_mut().append(*n, HeaderValue::from_static(v));
        }
        res.into_parts().0
    }

    fn encoded(out: &HttpOutput<()>) -> Vec<u8> {
        let mut buf = OutputBuf::new();
        assert!(out.encode(&mut buf, 0));
        buf.as_slice().to_vec()
    }

    #[test]
    fn a_recorded_response_comes_back_whole_without_hop_by_hop_headers() {
        let out = HttpOutput::<()>::Whole {
            head: head(
                201,
                &[
                    ("content-type", "application/json"),
                    ("set-cookie", "a=1"),
                    ("set-cookie", "b=2"),
                    ("connection", "keep-alive"),
                    ("x-skipped", "1"),
                ],
            ),
            body: Bytes::from_static(b"{\"id\":17}"),
            skip: Arc::new([HeaderName::from_static("x-skipped")]),
        };
        let HttpOutput::Replayed {
            status,
            headers,
            body,
        } = HttpOutput::<()>::decode(Some(encoded(&out))).unwrap()
        else {
            panic!("a replay");
        };
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(headers.len(), 3);
        assert_eq!(headers.get_all("set-cookie").iter().count(), 2);
        assert!(!headers.contains_key("connection") && !headers.contains_key("x-skipped"));
        assert_eq!(body.unwrap(), Bytes::from_static(b"{\"id\":17}"));
    }

    #[test]
    fn an_over_cap_response_is_recorded_without_its_body() {
        let out = HttpOutput::<()>::Over {
            head: head(200, &[("content-length", "999999"), ("location", "/x/1")]),
            prefix: Bytes::new(),
            rest: Box::pin(()),
            skip: Arc::new([]),
        };
        let HttpOutput::Replayed { headers, body, .. } =
            HttpOutput::<()>::decode(Some(encoded(&out))).unwrap()
        else {
            panic!("a replay");
        };
        assert!(body.is_none());
        assert!(!headers.contains_key("content-length"));
        assert_eq!(headers["location"], "/x/1");
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        let out = HttpOutput::<()>::Whole {
            head: head(200, &[("x-a", "b")]),
            body: Bytes::from_static(b"body"),
            skip: Arc::new([]),
        };
        let good = encoded(&out);
        for cut in 0..good.len() - 4 {
            assert!(HttpOutput::<()>::decode(Some(good[..cut].to_vec())).is_err());
        }
        assert!(HttpOutput::<()>::decode(Some(b"{\"json\":1}".to_vec())).is_err());
        assert!(HttpOutput::<()>::decode(None).is_err());
        let mut bad_status = good.clone();
        bad_status[2..4].copy_from_slice(&1000u16.to_be_bytes());
        assert!(HttpOutput::<()>::decode(Some(bad_status)).is_err());
    }
}
