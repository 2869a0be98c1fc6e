//! The default fingerprint of a request: what makes two requests under one key the same
//! request.
//!
//! It is the SHA-256 of the method, the path and query, the `Content-Encoding`, and the
//! content: the `Content-Type` and the body's bytes, or, for a `multipart/form-data`
//! body, its parts (RFC 7578). A form's boundary is chosen anew by the client for each
//! request (curl does), so neither the delimiters in the body nor the `boundary`
//! parameter take part: each part's name, filename, content type, other headers and
//! bytes do, in order, with the form's preamble and epilogue. A body that is not a well
//! formed form, or one under a `Content-Encoding`, is taken as raw bytes with the whole
//! `Content-Type`, boundary included.
//!
//! Every field enters the hash with its length (or a count, or a tag) in front of it,
//! so no two different sequences of fields hash the same bytes.

use http::header::{CONTENT_ENCODING, CONTENT_TYPE, GetAll, HeaderValue};
use http::request;
use sha2::{Digest, Sha256};

/// The content is the raw body with the whole `Content-Type`.
const RAW: u8 = 0;
/// The content is a parsed `multipart/form-data` body.
const FORM: u8 = 1;

/// Longest boundary RFC 2046 allows.
const MAX_BOUNDARY: usize = 70;

/// The default fingerprint of a request with its body: see the module documentation.
pub(crate) fn default_fingerprint(req: &request::Parts, body: &[u8]) -> [u8; 32] {
    let mut h = Fields(Sha256::new());
    h.field(req.method.as_str().as_bytes());
    h.field(
        req.uri
            .path_and_query()
            .map_or(req.uri.path(), |p| p.as_str())
            .as_bytes(),
    );
    h.values(req.headers.get_all(CONTENT_ENCODING));
    match form_data(req, body) {
        Some((media, form)) => {
            h.tag(FORM);
            h.field(&media.essence);
            // the boundary is the one parameter that changes between retries
            let params: Vec<_> = media
                .params
                .into_iter()
                .filter(|(name, _)| name != b"boundary")
                .collect();
            h.pairs(&params);
            h.field(form.preamble);
            h.count(form.parts.len());
            for part in &form.parts {
                h.field(&part.name);
                h.optional(part.filename.as_deref());
                h.pairs(&part.disposition);
                h.optional(part.content_type.as_deref());
                h.pairs(&part.headers);
                h.field(part.content);
            }
            h.field(form.epilogue);
        }
        None => {
            h.tag(RAW);
            h.values(req.headers.get_all(CONTENT_TYPE));
            h.field(body);
        }
    }
    h.0.finalize().into()
}

/// A hasher fed with self-delimiting fields.
struct Fields(Sha256);

impl Fields {
    fn count(&mut self, n: usize) {
        self.0.update((n as u64).to_be_bytes());
    }

    fn field(&mut self, bytes: &[u8]) {
        self.count(bytes.len());
        self.0.update(bytes);
    }

    fn tag(&mut self, tag: u8) {
        self.0.update([tag]);
    }

    fn optional(&mut self, v: Option<&[u8]>) {
        match v {
            None => self.tag(0),
            Some(v) => {
                self.tag(1);
                self.field(v);
            }
        }
    }

    fn pairs(&mut self, pairs: &[(Vec<u8>, Vec<u8>)]) {
        self.count(pairs.len());
        for (name, value) in pairs {
            self.field(name);
            self.field(value);
        }
    }

    /// Every value of a header, in order.
    fn values(&mut self, values: GetAll<'_, HeaderValue>) {
        self.count(values.iter().count());
        for v in values {
            self.field(v.as_bytes());
        }
    }
}

/// The request's form and media type when it carries one well-formed
/// `multipart/form-data` body, not content-encoded.
fn form_data<'a>(req: &request::Parts, body: &'a [u8]) -> Option<(MediaType, Form<'a>)> {
    if req.headers.contains_key(CONTENT_ENCODING) {
        return None;
    }
    let mut types = req.headers.get_all(CONTENT_TYPE).iter();
    let (Some(content_type), None) = (types.next(), types.next()) else {
        return None;
    };
    let media = media_type(content_type.as_bytes())?;
    if media.essence != b"multipart/form-data" {
        return None;
    }
    let boundary = media.param(b"boundary")?;
    if boundary.is_empty() || boundary.len() > MAX_BOUNDARY {
        return None;
    }
    let form = parse_form(body, boundary)?;
    Some((media, form))
}

/// A `type/subtype` with its parameters.
#[derive(Debug)]
struct MediaType {
    /// `type/subtype`, lowercase.
    essence: Vec<u8>,
    /// Names lowercase, values unquoted; each name once.
    params: Vec<(Vec<u8>, Vec<u8>)>,
}

impl MediaType {
    fn param(&self, name: &[u8]) -> Option<&[u8]> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// `type "/" subtype *( OWS ";" OWS name "=" value )` (RFC 9110, 8.3.1).
fn media_type(v: &[u8]) -> Option<MediaType> {
    let v = trim_ows(v);
    let (ty, rest) = token(v)?;
    let rest = rest.strip_prefix(b"/")?;
    let (subtype, rest) = token(rest)?;
    let mut essence = ty.to_ascii_lowercase();
    essence.push(b'/');
    essence.extend(subtype.to_ascii_lowercase());
    Some(MediaType {
        essence,
        params: params(rest)?,
    })
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_start_ows(v: &[u8]) -> &[u8] {
    &v[v.iter().position(|&b| !is_ows(b)).unwrap_or(v.len())..]
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let v = trim_start_ows(v);
    &v[..v.iter().rposition(|&b| !is_ows(b)).map_or(0, |i| i + 1)]
}

/// A non-empty run of `tchar`, and what follows it.
fn token(v: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = v.iter().take_while(|&&b| is_tchar(b)).count();
    (n > 0).then(|| v.split_at(n))
}

/// `*( OWS ";" OWS name "=" value )`: names lowercase, values a quoted-string
/// (unescaped) or a run of characters other than `;`, `"` and whitespace (boundaries
/// such as `----=_Part_0` are often sent so). A trailing `;` is allowed; a name given
/// twice is not (which value counts would be a guess).
fn params(mut rest: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    loop {
        rest = trim_start_ows(rest);
        if rest.is_empty() {
            return Some(out);
        }
        rest = trim_start_ows(rest.strip_prefix(b";")?);
        if rest.is_empty() {
            return Some(out);
        }
        let (name, after) = token(rest)?;
        let name = name.to_ascii_lowercase();
        let after = after.strip_prefix(b"=")?;
        let (value, after) = if after.first() == Some(&b'"') {
            quoted_string(after)?
        } else {
            let n = after
                .iter()
                .take_while(|&&b| b != b';' && b != b'"' && !is_ows(b))
                .count();
            if n == 0 {
                return None;
            }
            (after[..n].to_vec(), &after[n..])
        };
        if out.iter().any(|(n, _)| *n == name) {
            return None;
        }
        out.push((name, value));
        rest = after;
    }
}

/// A `"…"` with `\` escapes, unescaped, and what follows it.
fn quoted_string(v: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let mut out = Vec::new();
    let mut i = 1;
    loop {
        match *v.get(i)? {
            b'"' => return Some((out, &v[i + 1..])),
            b'\\' => {
                out.push(*v.get(i + 1)?);
                i += 2;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
}

/// A `multipart/form-data` body.
#[derive(Debug)]
struct Form<'a> {
    /// Before the first delimiter.
    preamble: &'a [u8],
    parts: Vec<Part<'a>>,
    /// After the close delimiter and its line break.
    epilogue: &'a [u8],
}

/// One part of a form.
#[derive(Debug)]
struct Part<'a> {
    /// The `name` parameter of its `Content-Disposition: form-data`.
    name: Vec<u8>,
    /// Its `filename` parameter.
    filename: Option<Vec<u8>>,
    /// The other parameters of its `Content-Disposition`, in order.
    disposition: Vec<(Vec<u8>, Vec<u8>)>,
    /// Its `Content-Type`, as sent.
    content_type: Option<Vec<u8>>,
    /// Its other headers, in order: names lowercase, values as sent.
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    content: &'a [u8],
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut from = 0;
    while let Some(i) = haystack[from..].iter().position(|&b| b == first) {
        let at = from + i;
        if haystack[at..].starts_with(needle) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// The parts of `body` delimited by `boundary` (RFC 2046, 5.1.1): an optional preamble,
/// `--boundary` (after a CRLF unless it opens the body), transport padding and CRLF
/// before each part, `--boundary--` after the last; CRLF line breaks throughout.
/// `None` when the body does not follow it.
fn parse_form<'a>(body: &'a [u8], boundary: &[u8]) -> Option<Form<'a>> {
    let dash_boundary = [b"--".as_slice(), boundary].concat();
    let delimiter = [b"\r\n".as_slice(), &dash_boundary].concat();
    let (preamble, mut rest) = match body.strip_prefix(dash_boundary.as_slice()) {
        Some(rest) => (&body[..0], rest),
        None => {
            let at = find(body, &delimiter)?;
            (&body[..at], &body[at + delimiter.len()..])
        }
    };
    let mut parts = Vec::new();
    loop {
        if let Some(close) = rest.strip_prefix(b"--") {
            let close = trim_start_ows(close);
            let epilogue = if close.is_empty() {
                close
            } else {
                close.strip_prefix(b"\r\n")?
            };
            return Some(Form {
                preamble,
                parts,
                epilogue,
            });
        }
        let part = trim_start_ows(rest).strip_prefix(b"\r\n")?;
        let end = find(part, &delimiter)?;
        parts.push(parse_part(&part[..end])?);
        rest = &part[end + delimiter.len()..];
    }
}

/// A part: header lines, an empty line, the content. It must have one
/// `Content-Disposition: form-data` with a `name` (RFC 7578, 4.2), and at most one
/// `Content-Type`.
fn parse_part(raw: &[u8]) -> Option<Part<'_>> {
    let (head, content) = match raw.strip_prefix(b"\r\n") {
        Some(content) => (&raw[..0], content),
        None => {
            let at = find(raw, b"\r\n\r\n")?;
            (&raw[..at], &raw[at + 4..])
        }
    };
    let mut disposition = None;
    let mut content_type = None;
    let mut headers = Vec::new();
    for (name, value) in header_lines(head)? {
        match name.as_slice() {
            b"content-disposition" => {
                if disposition.replace(value).is_some() {
                    return None;
                }
            }
            b"content-type" => {
                if content_type.replace(value).is_some() {
                    return None;
                }
            }
            _ => headers.push((name, value)),
        }
    }
    let disposition = disposition?;
    let (kind, rest) = token(&disposition)?;
    if !kind.eq_ignore_ascii_case(b"form-data") {
        return None;
    }
    let mut disposition = params(rest)?;
    let name = take_param(&mut disposition, b"name")?;
    let filename = take_param(&mut disposition, b"filename");
    Some(Part {
        name,
        filename,
        disposition,
        content_type,
        headers,
        content,
    })
}

fn take_param(params: &mut Vec<(Vec<u8>, Vec<u8>)>, name: &[u8]) -> Option<Vec<u8>> {
    let at = params.iter().position(|(n, _)| n == name)?;
    Some(params.remove(at).1)
}

/// `name: value` lines separated by CRLF, values without the whitespace around them;
/// a line that starts with whitespace continues the previous value (obsolete folding,
/// joined with one space). Names lowercase.
fn header_lines(head: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    if head.is_empty() {
        return Some(out);
    }
    let mut lines = head.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        // each line but the last ends with CRLF; no other CR or LF may appear
        let line = if lines.peek().is_some() {
            line.strip_suffix(b"\r")?
        } else {
            line
        };
        if line.contains(&b'\r') {
            return None;
        }
        if line.first().is_some_and(|&b| is_ows(b)) {
            let (_, value) = out.last_mut()?;
            let more = trim_ows(line);
            if !value.is_empty() && !more.is_empty() {
                value.push(b' ');
            }
            value.extend(more);
        } else {
            let (name, rest) = token(line)?;
            let value = rest.strip_prefix(b":")?;
            out.push((name.to_ascii_lowercase(), trim_ows(value).to_vec()));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> request::Parts {
        let mut b = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            b = b.header(*name, *value);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn post(headers: &[(&str, &str)], body: &[u8]) -> [u8; 32] {
        default_fingerprint(&parts("POST", "/orders?x=1", headers), body)
    }

    fn form_type(boundary: &str) -> String {
        format!("multipart/form-data; boundary={boundary}")
    }

    /// `(name, filename, content type, content)` as a client writes it.
    type Field<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);

    fn encode(boundary: &str, fields: &[Field<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, filename, content_type, content) in fields {
            out.extend(format!("--{boundary}\r\n").as_bytes());
            out.extend(format!("Content-Disposition: form-data; name=\"{name}\"").as_bytes());
            if let Some(f) = filename {
                out.extend(format!("; filename=\"{f}\"").as_bytes());
            }
            out.extend(b"\r\n");
            if let Some(t) = content_type {
                out.extend(format!("Content-Type: {t}\r\n").as_bytes());
            }
            out.extend(b"\r\n");
            out.extend(*content);
            out.extend(b"\r\n");
        }
        out.extend(format!("--{boundary}--\r\n").as_bytes());
        out
    }

    fn form_fp(boundary: &str, fields: &[Field<'_>]) -> [u8; 32] {
        post(
            &[("content-type", &form_type(boundary))],
            &encode(boundary, fields),
        )
    }

    const AMOUNT: Field<'static> = ("amount", None, None, b"5");
    const NOTE: Field<'static> = (
        "note",
        Some("note.txt"),
        Some("text/plain"),
        b"line one\r\nline two",
    );

    #[test]
    fn method_path_and_query_count() {
        let base = default_fingerprint(&parts("POST", "/a?x=1", &[]), b"b");
        assert_eq!(
            base,
            default_fingerprint(&parts("POST", "/a?x=1", &[]), b"b")
        );
        assert_ne!(
            base,
            default_fingerprint(&parts("PATCH", "/a?x=1", &[]), b"b")
        );
        assert_ne!(
            base,
            default_fingerprint(&parts("POST", "/a?x=2", &[]), b"b")
        );
        assert_ne!(
            base,
            default_fingerprint(&parts("POST", "/b?x=1", &[]), b"b")
        );
        assert_ne!(
            base,
            default_fingerprint(&parts("POST", "/a?x=1", &[]), b"c")
        );
        // fields cannot run together: the path's end and the body's start
        assert_ne!(
            default_fingerprint(&parts("POST", "/ab", &[]), b"c"),
            default_fingerprint(&parts("POST", "/a", &[]), b"bc")
        );
    }

    #[test]
    fn json_and_form_of_the_same_bytes_differ() {
        let body = br#"{"amount":5}"#;
        let json = post(&[("content-type", "application/json")], body);
        let form = post(
            &[("content-type", "application/x-www-form-urlencoded")],
            body,
        );
        let none = post(&[], body);
        assert_ne!(json, form);
        assert_ne!(json, none);
        assert_ne!(form, none);
        assert_eq!(json, post(&[("content-type", "application/json")], body));
    }

    #[test]
    fn content_encoding_counts() {
        let ct = ("content-type", "application/json");
        let plain = post(&[ct], b"\x1f\x8b...");
        let gzip = post(&[ct, ("content-encoding", "gzip")], b"\x1f\x8b...");
        let br = post(&[ct, ("content-encoding", "br")], b"\x1f\x8b...");
        assert_ne!(plain, gzip);
        assert_ne!(gzip, br);
        assert_ne!(plain, br);
        // an encoded form is bytes: its boundary counts
        let a = post(
            &[
                ("content-type", &form_type("aaa")),
                ("content-encoding", "identity"),
            ],
            &encode("aaa", &[AMOUNT]),
        );
        let b = post(
            &[
                ("content-type", &form_type("bbb")),
                ("content-encoding", "identity"),
            ],
            &encode("bbb", &[AMOUNT]),
        );
        assert_ne!(a, b);
    }

    #[test]
    fn same_form_with_two_boundaries_is_equal() {
        let a = form_fp("------------------------d74496d66958873e", &[AMOUNT, NOTE]);
        let b = form_fp("------------------------5c0a7d2f3e9b8841", &[AMOUNT, NOTE]);
        assert_eq!(a, b);
        // a quoted boundary, and other letter case in the media type and header names
        let boundary = "----=_part_0_1.2";
        let body = encode(boundary, &[AMOUNT, NOTE]).to_ascii_lowercase();
        let quoted = post(
            &[(
                "content-type",
                &format!("Multipart/Form-Data; Boundary=\"{boundary}\""),
            )],
            &body,
        );
        assert_eq!(quoted, a);
        // the media type's other parameters still count
        let with_charset = post(
            &[(
                "content-type",
                "multipart/form-data; boundary=x; charset=utf-8",
            )],
            &encode("x", &[AMOUNT, NOTE]),
        );
        assert_ne!(with_charset, a);
    }

    #[test]
    fn a_field_value_counts() {
        let five = form_fp("b1", &[AMOUNT, NOTE]);
        let fifty = form_fp("b2", &[("amount", None, None, b"50"), NOTE]);
        assert_ne!(five, fifty);
        let renamed = form_fp("b2", &[("amount2", None, None, b"5"), NOTE]);
        assert_ne!(five, renamed);
        let typed = form_fp("b2", &[("amount", None, Some("text/plain"), b"5"), NOTE]);
        assert_ne!(five, typed);
    }

    #[test]
    fn a_filename_counts() {
        let a = form_fp("b1", &[AMOUNT, NOTE]);
        let other = (NOTE.0, Some("other.txt"), NOTE.2, NOTE.3);
        assert_ne!(a, form_fp("b2", &[AMOUNT, other]));
        let none = (NOTE.0, None, NOTE.2, NOTE.3);
        assert_ne!(a, form_fp("b2", &[AMOUNT, none]));
        let empty = (NOTE.0, Some(""), NOTE.2, NOTE.3);
        assert_ne!(form_fp("b", &[empty]), form_fp("b", &[none]));
    }

    #[test]
    fn part_order_counts() {
        assert_ne!(form_fp("b", &[AMOUNT, NOTE]), form_fp("b", &[NOTE, AMOUNT]));
        assert_ne!(form_fp("b", &[AMOUNT]), form_fp("b", &[AMOUNT, AMOUNT]));
        assert_ne!(form_fp("b", &[]), form_fp("b", &[AMOUNT]));
    }

    #[test]
    fn parts_are_read() {
        let body = encode("xyz", &[AMOUNT, NOTE]);
        let form = parse_form(&body, b"xyz").unwrap();
        assert_eq!(form.parts.len(), 2);
        assert_eq!(form.parts[0].name, b"amount");
        assert_eq!(form.parts[0].filename, None);
        assert_eq!(form.parts[0].content_type, None);
        assert_eq!(form.parts[0].content, b"5");
        assert_eq!(form.parts[1].name, b"note");
        assert_eq!(form.parts[1].filename.as_deref(), Some(&b"note.txt"[..]));
        assert_eq!(
            form.parts[1].content_type.as_deref(),
            Some(&b"text/plain"[..])
        );
        assert_eq!(form.parts[1].content, b"line one\r\nline two");
        assert_eq!((form.preamble, form.epilogue), (&b""[..], &b""[..]));

        // preamble, transport padding, escapes, folded and other headers, epilogue
        let body = b"ignored\r\n--xyz \t\r\n\
            content-disposition: form-data;\r\n name=\"a\\\"b\"; filename*=UTF-8''n%C3%A9\r\n\
            X-Extra:  1 \r\n\
            \r\n\
            v\r\n\
            --xyz--  \r\nthe end";
        let form = parse_form(body, b"xyz").unwrap();
        assert_eq!(form.preamble, b"ignored");
        assert_eq!(form.epilogue, b"the end");
        let p = &form.parts[0];
        assert_eq!(p.name, b"a\"b");
        assert_eq!(
            p.disposition,
            vec![(b"filename*".to_vec(), b"UTF-8''n%C3%A9".to_vec())]
        );
        assert_eq!(p.headers, vec![(b"x-extra".to_vec(), b"1".to_vec())]);
        assert_eq!(p.content, b"v");

        // a part without headers is not form-data
        assert!(parse_form(b"--x\r\n\r\nv\r\n--x--", b"x").is_none());
        // an empty form
        assert_eq!(parse_form(b"--x--", b"x").unwrap().parts.len(), 0);
    }

    /// Bodies that are not forms: the raw bytes and the whole `Content-Type` count, so
    /// two of them differ whenever their bytes or boundaries do.
    #[test]
    fn malformed_forms_are_raw_bytes() {
        let good = encode("b", &[AMOUNT]);
        let cases: Vec<(String, Vec<u8>)> = vec![
            ("multipart/form-data".into(), good.clone()),
            ("multipart/form-data; boundary=".into(), good.clone()),
            ("multipart/form-data; boundary=\"b".into(), good.clone()),
            (
                "multipart/form-data; boundary=b; boundary=c".into(),
                good.clone(),
            ),
            (form_type(&"b".repeat(71)), good.clone()),
            (form_type("c"), good.clone()),
            (form_type("b"), good[..good.len() - 4].to_vec()),
            (form_type("b"), good.replace_all(b"\r\n", b"\n")),
            (
                form_type("b"),
                good.replace_all(b"form-data; ", b"attachment; "),
            ),
            (form_type("b"), good.replace_all(b"name=", b"nom=")),
            (form_type("b"), good.replace_all(b"--b--", b"--bX--")),
            (form_type("b"), b"--b--x".to_vec()),
            (form_type("b"), Vec::new()),
            ("multipart/mixed; boundary=b".into(), good.clone()),
        ];
        for (content_type, body) in &cases {
            // never a panic
            let _ = post(&[("content-type", content_type)], body);
        }
        // what follows the close delimiter's line break is an epilogue
        let body = [good.as_slice(), b"garbage"].concat();
        assert_eq!(parse_form(&body, b"b").unwrap().epilogue, b"garbage");
        for (ct, body) in &cases {
            let r = parts("POST", "/", &[("content-type", ct)]);
            assert!(
                form_data(&r, body).is_none(),
                "{ct} {:?}",
                String::from_utf8_lossy(body)
            );
        }
        // a body whose boundary is missing or does not match: bytes and boundary count
        let fields = [AMOUNT];
        for ct in ["multipart/form-data", &form_type("nope")] {
            let one = post(&[("content-type", ct)], &encode("b", &fields));
            let other = post(&[("content-type", ct)], &encode("c", &fields));
            assert_ne!(one, other);
        }
        assert_ne!(
            post(&[("content-type", &form_type("x"))], &encode("b", &fields)),
            post(&[("content-type", &form_type("y"))], &encode("b", &fields))
        );
    }

    #[test]
    fn truncated_forms_all_differ() {
        let ct = form_type("bnd");
        let body = encode("bnd", &[AMOUNT, NOTE]);
        let mut seen = std::collections::HashMap::new();
        for len in 0..=body.len() {
            let fp = post(&[("content-type", &ct)], &body[..len]);
            if let Some(earlier) = seen.insert(fp, len) {
                // only the close delimiter's optional line break may go
                assert_eq!((earlier, len), (body.len() - 2, body.len()));
            }
        }
    }

    trait ReplaceAll {
        fn replace_all(&self, from: &[u8], to: &[u8]) -> Vec<u8>;
    }

    impl ReplaceAll for Vec<u8> {
        fn replace_all(&self, from: &[u8], to: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            let mut rest = self.as_slice();
            while let Some(at) = find(rest, from) {
                out.extend(&rest[..at]);
                out.extend(to);
                rest = &rest[at + from.len()..];
            }
            out.extend(rest);
            out
        }
    }

    /// xorshift64*: reproducible random inputs without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
            &from[self.below(from.len())]
        }

        fn text(&mut self, alphabet: &[u8], max: usize) -> Vec<u8> {
            let len = self.below(max + 1);
            (0..len).map(|_| *self.pick(alphabet)).collect()
        }
    }

    /// Random bodies built from the pieces of forms, under random content types: no
    /// panic, the same input always gives the same fingerprint, and bodies that are not
    /// forms differ whenever their bytes do.
    #[test]
    fn random_bodies_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let pieces: [&[u8]; 14] = [
            b"--",
            b"--b",
            b"--b--",
            b"\r\n",
            b"\r",
            b"\n",
            b" ",
            b"\"",
            b";",
            b"\\",
            b"Content-Disposition: form-data; name=\"a\"",
            b"content-type: text/plain",
            b"filename=",
            b"x",
        ];
        let types = [
            "multipart/form-data; boundary=b",
            "multipart/form-data; boundary=\"b\"",
            "multipart/form-data",
            "multipart/form-data; boundary",
            "multipart/form-data; boundary=b; boundary=b",
            "multipart/form-data;;boundary=\"b\\",
            "application/json",
        ];
        let mut raw: std::collections::HashMap<[u8; 32], (String, Vec<u8>)> = Default::default();
        for _ in 0..20_000 {
            let n = rng.below(24);
            let body: Vec<u8> = (0..n).flat_map(|_| rng.pick(&pieces).to_vec()).collect();
            let ct = *rng.pick(&types);
            let fp = post(&[("content-type", ct)], &body);
            assert_eq!(fp, post(&[("content-type", ct)], &body));
            let r = parts("POST", "/orders?x=1", &[("content-type", ct)]);
            if form_data(&r, &body).is_none()
                && let Some(earlier) = raw.insert(fp, (ct.to_owned(), body.clone()))
            {
                assert_eq!(earlier, (ct.to_owned(), body));
            }
        }
        // and arbitrary bytes
        for _ in 0..5_000 {
            let body = rng.text(&(0..=255).collect::<Vec<u8>>(), 200);
            let _ = post(
                &[("content-type", "multipart/form-data; boundary=b")],
                &body,
            );
        }
    }

    /// A [`Field`] that owns its name, filename and content.
    type OwnedField = (String, Option<String>, Option<&'static str>, Vec<u8>);

    /// Random forms: encoded under two random boundaries they fingerprint the same;
    /// changing one byte of one field's content changes the fingerprint.
    #[test]
    fn random_forms_ignore_their_boundary() {
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        let names = b"abcdefghijklmnopqrstuvwxyz0123456789_-[] ";
        let content = b"ab\r\n-=\"; \t\x00\xff";
        let boundary_chars =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789'()+_,-./:=?";
        for _ in 0..2_000 {
            let owned: Vec<OwnedField> = (0..rng.below(5))
                .map(|_| {
                    let name = String::from_utf8(rng.text(names, 8)).unwrap();
                    let filename =
                        (rng.below(2) == 0).then(|| String::from_utf8(rng.text(names, 8)).unwrap());
                    let ct = *rng.pick(&[None, Some("text/plain"), Some("image/png")]);
                    (name, filename, ct, rng.text(content, 40))
                })
                .collect();
            let fields: Vec<Field<'_>> = owned
                .iter()
                .map(|(n, f, t, c)| (n.as_str(), f.as_deref(), *t, c.as_slice()))
                .collect();
            let boundary = |rng: &mut Rng| {
                let len = 1 + rng.below(MAX_BOUNDARY);
                let b: String = (0..len)
                    .map(|_| char::from(*rng.pick(boundary_chars)))
                    .collect();
                // a boundary ending in a space must be quoted; quote the odd ones
                format!("\"{b}\"")
            };
            // a client picks a boundary that does not occur in its content
            let fresh = |rng: &mut Rng| loop {
                let b = boundary(rng);
                let dashed = format!("--{}", b.trim_matches('"'));
                if !fields
                    .iter()
                    .any(|f| find(f.3, dashed.as_bytes()).is_some())
                {
                    return b;
                }
            };
            let (a, b) = (fresh(&mut rng), fresh(&mut rng));
            let enc = |quoted: &str, fields: &[Field<'_>]| {
                let bare = quoted.trim_matches('"');
                let body = encode(bare, fields);
                let r = parts(
                    "POST",
                    "/f",
                    &[(
                        "content-type",
                        &format!("multipart/form-data; boundary={quoted}"),
                    )],
                );
                (
                    form_data(&r, &body).is_some(),
                    default_fingerprint(&r, &body),
                )
            };
            let (parsed_a, fp_a) = enc(&a, &fields);
            let (parsed_b, fp_b) = enc(&b, &fields);
            assert!(parsed_a && parsed_b, "{a} {b} {owned:?}");
            assert_eq!(fp_a, fp_b);

            let Some(i) = (0..fields.len()).find(|&i| !fields[i].3.is_empty()) else {
                continue;
            };
            let mut changed = owned[i].3.clone();
            let at = rng.below(changed.len());
            changed[at] ^= 1 + rng.below(255) as u8;
            let mut other = fields.clone();
            other[i].3 = &changed;
            let (parsed, fp) = enc(&a, &other);
            if parsed {
                assert_ne!(fp, fp_a);
            }
        }
    }
}
