//! `pods/proxy`, `services/proxy` and `nodes/proxy`: the API server relays an HTTP request
//! (or an upgraded connection) to a pod, to one of a service's endpoints, or to a node — what
//! `kubectl proxy` users and the conformance `Proxy version v1` tests reach through it.
//!
//! As kube-apiserver does:
//! - the name may carry a scheme and a port, `[http:|https:]name[:port]`: a pod's default
//!   port is its first declared container port; a service's port is a port name (or number,
//!   mapped to its name) resolved through the service's `Endpoints` to a ready pod address;
//!   a node's default port is its agent's, reached with the agent's credentials;
//! - `…/proxy` with no path answers `GET`/`HEAD` with `301` to `…/proxy/`;
//! - the caller's credentials are not passed on; the query string and body are;
//! - an HTML answer's links that point at the backend (`href="/x"`) are rewritten to go
//!   through the proxy again (`href="/api/v1/…/proxy/x"`), as is a redirect's `Location`.
//!
//! Backends' TLS certificates are not verified (kube-apiserver's proxy transport does not
//! either); an unreachable backend is a `503` `Status`.

use std::io::Read as _;
use std::net::IpAddr;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use serde_json::Value;

use crate::engine::Engine;
use crate::error::ApiError;
use crate::request::Target;
use crate::stream::NodeEndpoint;

/// The largest HTML answer rewritten; a larger one passes through as it is.
const REWRITE_LIMIT: usize = 16 << 20;

/// What is proxied to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `namespaces/{ns}/pods/{id}/proxy`.
    Pod,
    /// `namespaces/{ns}/services/{id}/proxy`.
    Service,
    /// `nodes/{id}/proxy`.
    Node,
}

/// A request for a `proxy` subresource, parsed from its raw path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyRequest {
    /// Pod, service or node.
    pub kind: Kind,
    /// The pod's or service's namespace.
    pub namespace: Option<String>,
    /// `[scheme:]name[:port]`.
    pub id: String,
    /// The path after `/proxy`, still URL-encoded: empty, or starting with `/`.
    pub path: String,
    /// The request path up to and including `/proxy`: what rewritten links start with.
    pub prefix: String,
}

impl ProxyRequest {
    /// Parses a raw request path (`/api/v1/…`); `None` when it names no proxy subresource.
    pub fn parse(path: &str) -> Option<ProxyRequest> {
        let rest = path.strip_prefix("/api/v1/")?;
        let mut segments = rest.splitn(6, '/');
        let first = segments.next()?;
        let (kind, namespace, id, tail) = if first == "namespaces" {
            let namespace = segments.next()?;
            let kind = match segments.next()? {
                "pods" => Kind::Pod,
                "services" => Kind::Service,
                _ => return None,
            };
            let id = segments.next()?;
            (kind, Some(namespace), id, segments.next()?)
        } else if first == "nodes" {
            let id = segments.next()?;
            let tail = segments.next()?;
            (Kind::Node, None, id, tail)
        } else {
            return None;
        };
        if tail != "proxy" {
            return None;
        }
        let consumed = match namespace {
            Some(ns) => format!("/api/v1/namespaces/{ns}/{}/{id}/proxy", kind.plural()),
            None => format!("/api/v1/nodes/{id}/proxy"),
        };
        let path = path.get(consumed.len()..)?;
        // `…/proxy` ends exactly or continues with a path: `…/proxyfoo` is not a proxy.
        if !(path.is_empty() || path.starts_with('/')) || id.is_empty() {
            return None;
        }
        Some(ProxyRequest {
            kind,
            namespace: namespace.map(str::to_owned),
            id: id.to_owned(),
            path: path.to_owned(),
            prefix: consumed,
        })
    }
}

impl Kind {
    fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Service => "services",
            Kind::Node => "nodes",
        }
    }
}

/// Splits `[scheme:]name[:port]` as kube's `SplitSchemeNamePort`: the scheme, when given,
/// is `http` or `https`, and the name is not empty.
pub fn split_scheme_name_port(id: &str) -> Option<(&str, &str, &str)> {
    let parts: Vec<&str> = id.split(':').collect();
    let (scheme, name, port) = match parts.as_slice() {
        [name] => ("", *name, ""),
        [name, port] => ("", *name, *port),
        [scheme, name, port] => (*scheme, *name, *port),
        _ => return None,
    };
    (!name.is_empty() && matches!(scheme, "" | "http" | "https")).then_some((scheme, name, port))
}

/// Where a proxied request goes.
struct Backend {
    /// `scheme://host:port`.
    base: String,
    /// The node agent's bearer token, when the backend is an agent.
    token: Option<String>,
}

/// The methods a proxy passes on (kube-apiserver's `proxyMethods`).
fn proxied(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET
            | Method::HEAD
            | Method::POST
            | Method::PUT
            | Method::PATCH
            | Method::DELETE
            | Method::OPTIONS
    )
}

/// Serves a proxy request: resolves the backend, then relays the request and its answer.
pub async fn serve(
    engine: &Engine,
    proxy: ProxyRequest,
    mut request: Request,
) -> Result<Response, ApiError> {
    if !proxied(request.method()) {
        return Err(ApiError::MethodNotAllowed);
    }
    let (scheme, name, port) = split_scheme_name_port(&proxy.id).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "invalid {} request {:?}",
            match proxy.kind {
                Kind::Pod => "pod",
                Kind::Service => "service",
                Kind::Node => "node",
            },
            proxy.id
        ))
    })?;
    let namespace = proxy.namespace.as_deref().unwrap_or("");
    let backend = match proxy.kind {
        Kind::Pod => pod_backend(engine, namespace, scheme, name, port).await?,
        Kind::Service => service_backend(engine, namespace, scheme, name, port, &proxy.id).await?,
        Kind::Node => node_backend(engine, scheme, name, port).await?,
    };
    let query = request.uri().query().map(str::to_owned);
    // kube's hack for https://issue.k8s.io/4958: a browser needs the trailing slash for
    // relative links to resolve under the proxy.
    if proxy.path.is_empty() && matches!(*request.method(), Method::GET | Method::HEAD) {
        let location = match &query {
            Some(q) => format!("{}/?{q}", proxy.prefix),
            None => format!("{}/", proxy.prefix),
        };
        return Ok(redirect(&location));
    }
    let path = if proxy.path.is_empty() {
        "/"
    } else {
        &proxy.path
    };
    let url = match &query {
        Some(q) => format!("{}{path}?{q}", backend.base),
        None => format!("{}{path}", backend.base),
    };
    let upgrade = request.headers().contains_key(header::UPGRADE);
    let request_host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut upstream = engine
        .node_client()?
        .request(request.method().clone(), &url)
        .headers(forwarded_headers(request.headers(), upgrade));
    if let Some(token) = &backend.token {
        upstream = upstream.bearer_auth(token);
    }
    let has_body = request.headers().contains_key(header::CONTENT_LENGTH)
        || request.headers().contains_key(header::TRANSFER_ENCODING);
    if !upgrade && has_body {
        let body = std::mem::take(request.body_mut());
        upstream = upstream.body(reqwest::Body::wrap_stream(body.into_data_stream()));
    }
    let answer = upstream
        .send()
        .await
        .map_err(|e| ApiError::ServiceUnavailable(format!("error trying to reach service: {e}")))?;
    if upgrade && answer.status() == StatusCode::SWITCHING_PROTOCOLS {
        let headers: Vec<String> = answer.headers().keys().map(|k| k.to_string()).collect();
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        return Ok(crate::stream::relay(&mut request, answer, &headers));
    }
    let backend_host = answer
        .url()
        .host_str()
        .map(|h| match answer.url().port() {
            Some(p) => format!("{h}:{p}"),
            None => h.to_owned(),
        })
        .unwrap_or_default();
    let rewriter = Rewriter {
        prefix: &proxy.prefix,
        backend_host: &backend_host,
        request_host: &request_host,
    };
    Ok(respond(answer, &rewriter).await)
}

/// A `301` to `location`, with the short HTML body Go's `http.Redirect` writes.
fn redirect(location: &str) -> Response {
    let body = format!(
        "<a href=\"{}\">Moved Permanently</a>.\n\n",
        html_escape(location)
    );
    (
        StatusCode::MOVED_PERMANENTLY,
        [
            (header::LOCATION, location.to_owned()),
            (header::CONTENT_TYPE, "text/html; charset=utf-8".to_owned()),
        ],
        body,
    )
        .into_response()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&#34;")
}

/// Headers that belong to one hop of a connection, never passed on (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The client's headers the backend gets: not its credentials (nor impersonation), not
/// the hop-by-hop ones — except an upgrade's own. `Content-Length` stays: the body is
/// streamed with that length (servers that take no chunked request bodies exist).
fn forwarded_headers(headers: &HeaderMap, upgrade: bool) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        let n = name.as_str();
        let hop = HOP_BY_HOP.contains(&n) && !(upgrade && matches!(n, "connection" | "upgrade"));
        if hop || n == "authorization" || n == "host" || n.starts_with("impersonate-") {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// The backend's answer as the client's response: hop-by-hop headers dropped, a redirect's
/// `Location` and an HTML body's links rewritten to go through the proxy.
async fn respond(answer: reqwest::Response, rewriter: &Rewriter<'_>) -> Response {
    let status = answer.status();
    let mut headers = HeaderMap::new();
    for (name, value) in answer.headers() {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(location) = headers
        .get(header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .map(|l| rewriter.url(l))
        && let Ok(value) = HeaderValue::from_str(&location)
    {
        headers.insert(header::LOCATION, value);
    }
    let html = headers
        .get(header::CONTENT_TYPE)
        .and_then(|t| t.to_str().ok())
        .and_then(|t| t.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/html"));
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|e| e.to_str().ok())
        .unwrap_or("identity")
        .to_ascii_lowercase();
    let small = answer
        .content_length()
        .is_none_or(|n| n <= REWRITE_LIMIT as u64);
    if html && small && matches!(encoding.as_str(), "identity" | "gzip") {
        let mut bytes = Vec::new();
        let mut stream = answer;
        let mut whole = true;
        loop {
            match stream.chunk().await {
                Ok(Some(chunk)) if bytes.len() + chunk.len() <= REWRITE_LIMIT => {
                    bytes.extend_from_slice(&chunk)
                }
                Ok(None) => break,
                Ok(Some(chunk)) => {
                    bytes.extend_from_slice(&chunk);
                    whole = false;
                    break;
                }
                Err(_) => {
                    whole = false;
                    break;
                }
            }
        }
        // The whole (decoded) document, or what arrived when it is too large or cut short
        // (a cut-short answer is cut short for the client too).
        let decoded: Result<Vec<u8>, Vec<u8>> = if !whole {
            Err(bytes)
        } else if encoding == "gzip" {
            let mut plain = Vec::new();
            match flate2::read::GzDecoder::new(bytes.as_slice()).read_to_end(&mut plain) {
                Ok(_) => Ok(plain),
                Err(_) => Err(bytes),
            }
        } else {
            Ok(bytes)
        };
        let body = match decoded {
            Ok(plain) => {
                headers.remove(header::CONTENT_ENCODING);
                headers.remove(header::CONTENT_LENGTH);
                rewrite_html(&plain, |url| rewriter.url(url))
            }
            Err(arrived) => {
                // Passed through as it is: the rest of a large answer follows.
                let rest = stream.bytes_stream();
                let mut response = Response::new(Body::from_stream(
                    futures::stream::once(async move { Ok(bytes::Bytes::from(arrived)) })
                        .chain(rest),
                ));
                *response.status_mut() = status;
                *response.headers_mut() = headers;
                return response;
            }
        };
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        return response;
    }
    let mut response = Response::new(Body::from_stream(answer.bytes_stream()));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// Rewrites a backend's URLs to go through the proxy again (kube's proxy `Transport`).
struct Rewriter<'a> {
    /// `/api/v1/…/proxy`.
    prefix: &'a str,
    /// `host:port` the request went to.
    backend_host: &'a str,
    /// The `Host` the client asked the API server for.
    request_host: &'a str,
}

impl Rewriter<'_> {
    /// `/x` (or `http://backend/x`) becomes `{prefix}/x`; a relative URL, another host's,
    /// or one already under the prefix stays as it is.
    fn url(&self, url: &str) -> String {
        let (host, rest) = if let Some(after) = url.strip_prefix("//") {
            split_host(after)
        } else if let Some((scheme, after)) = url.split_once("://")
            && !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        {
            split_host(after)
        } else {
            ("", url)
        };
        let other_host = !host.is_empty() && host != self.backend_host && host != self.request_host;
        if other_host || !rest.starts_with('/') {
            return url.to_owned();
        }
        // A link to the API server's own address stays absolute (kube: no scheme or host
        // to rewrite to).
        if !host.is_empty() && host == self.request_host {
            if rest.starts_with(self.prefix) {
                return url.to_owned();
            }
            let cut = url.len() - rest.len();
            return format!("{}{}{rest}", &url[..cut], self.prefix);
        }
        if rest.starts_with(self.prefix) {
            return rest.to_owned();
        }
        format!("{}{rest}", self.prefix.trim_end_matches('/'))
    }
}

/// `host[:port]` and the rest (from the path on) of a URL after its `scheme://`.
fn split_host(after: &str) -> (&str, &str) {
    let end = after.find(['/', '?', '#']).unwrap_or(after.len());
    (&after[..end], &after[end..])
}

/// The URL-valued attributes of HTML elements (kube's proxy `atomsToAttrs`).
fn url_attribute(element: &str, attribute: &str) -> bool {
    let attrs: &[&str] = match element {
        "a" | "area" | "base" | "link" => &["href"],
        "applet" => &["codebase"],
        "audio" | "embed" | "script" | "source" => &["src"],
        "blockquote" | "del" | "ins" | "q" => &["cite"],
        "body" => &["background"],
        "button" => &["formaction"],
        "command" => &["icon"],
        "form" => &["action"],
        "frame" | "iframe" => &["longdesc", "src"],
        "head" => &["profile"],
        "html" => &["manifest"],
        "img" => &["longdesc", "src", "usemap"],
        "input" => &["src", "usemap", "formaction"],
        "object" => &["classid", "codebase", "data", "usemap"],
        "video" => &["poster", "src"],
        _ => &[],
    };
    attrs.contains(&attribute)
}

/// Rewrites the URL-valued attributes of an HTML document's start tags with `rewrite`;
/// everything else (text, comments, script and style bodies) is copied byte for byte.
pub fn rewrite_html(html: &[u8], rewrite: impl Fn(&str) -> String) -> Vec<u8> {
    let mut out = Vec::with_capacity(html.len() + 256);
    let mut i = 0;
    while i < html.len() {
        let Some(lt) = html[i..].iter().position(|&b| b == b'<') else {
            out.extend_from_slice(&html[i..]);
            break;
        };
        out.extend_from_slice(&html[i..i + lt]);
        i += lt;
        if html[i..].starts_with(b"<!--") {
            let end = find(&html[i + 4..], b"-->").map_or(html.len(), |e| i + 4 + e + 3);
            out.extend_from_slice(&html[i..end]);
            i = end;
            continue;
        }
        let name_start = i + 1;
        let name_len = html[name_start..]
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric())
            .count();
        if name_len == 0 || !html[name_start].is_ascii_alphabetic() {
            out.push(b'<');
            i += 1;
            continue;
        }
        let element =
            String::from_utf8_lossy(&html[name_start..name_start + name_len]).to_ascii_lowercase();
        out.extend_from_slice(&html[i..name_start + name_len]);
        i = rewrite_attributes(html, name_start + name_len, &element, &mut out, &rewrite);
        // The bodies of `script` and `style` are raw text, not markup.
        if matches!(element.as_str(), "script" | "style") {
            let close = format!("</{element}");
            let end = find_ignore_case(&html[i..], close.as_bytes()).map_or(html.len(), |e| i + e);
            out.extend_from_slice(&html[i..end]);
            i = end;
        }
    }
    out
}

/// Copies a start tag's attributes from `i` to its `>`, rewriting the URL-valued ones;
/// returns the index after the tag.
fn rewrite_attributes(
    html: &[u8],
    mut i: usize,
    element: &str,
    out: &mut Vec<u8>,
    rewrite: &impl Fn(&str) -> String,
) -> usize {
    loop {
        let spaces = html[i..]
            .iter()
            .take_while(|b| b.is_ascii_whitespace() || **b == b'/')
            .count();
        out.extend_from_slice(&html[i..i + spaces]);
        i += spaces;
        match html.get(i) {
            None => return i,
            Some(b'>') => {
                out.push(b'>');
                return i + 1;
            }
            _ => {}
        }
        let name_len = html[i..]
            .iter()
            .take_while(|b| !b.is_ascii_whitespace() && !matches!(b, b'=' | b'>' | b'/'))
            .count()
            .max(1);
        let attribute = String::from_utf8_lossy(&html[i..i + name_len]).to_ascii_lowercase();
        out.extend_from_slice(&html[i..i + name_len]);
        i += name_len;
        let before_eq = html[i..]
            .iter()
            .take_while(|b| b.is_ascii_whitespace())
            .count();
        if html.get(i + before_eq) != Some(&b'=') {
            continue;
        }
        let after_eq = html[i + before_eq + 1..]
            .iter()
            .take_while(|b| b.is_ascii_whitespace())
            .count();
        let value_start = i + before_eq + 1 + after_eq;
        out.extend_from_slice(&html[i..value_start]);
        i = value_start;
        let (quote, start) = match html.get(i) {
            Some(q @ (b'"' | b'\'')) => (Some(*q), i + 1),
            _ => (None, i),
        };
        let len = html[start..]
            .iter()
            .take_while(|b| match quote {
                Some(q) => **b != q,
                None => !b.is_ascii_whitespace() && **b != b'>',
            })
            .count();
        let value = &html[start..start + len];
        if let Some(q) = quote {
            out.push(q);
        }
        match std::str::from_utf8(value) {
            Ok(v) if url_attribute(element, &attribute) => {
                out.extend_from_slice(rewrite(v).as_bytes())
            }
            _ => out.extend_from_slice(value),
        }
        i = start + len;
        if let Some(q) = quote
            && html.get(i) == Some(&q)
        {
            out.push(q);
            i += 1;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn find_ignore_case(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
}

/// A pod's address: `[scheme://]podIP[:port]`, the port defaulting to the first declared
/// container port.
async fn pod_backend(
    engine: &Engine,
    namespace: &str,
    scheme: &str,
    name: &str,
    port: &str,
) -> Result<Backend, ApiError> {
    let target = Target::parse(
        &engine.registry,
        "",
        "v1",
        &format!("namespaces/{namespace}/pods/{name}"),
    )?;
    let pod = engine.get(&target).await?;
    let port = if port.is_empty() {
        pod.pointer("/spec/containers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find_map(|c| c.pointer("/ports/0/containerPort").and_then(Value::as_i64))
            .map(|p| p.to_string())
            .unwrap_or_default()
    } else {
        port.to_owned()
    };
    let ip = pod
        .pointer("/status/podIP")
        .and_then(Value::as_str)
        .and_then(|ip| ip.parse::<IpAddr>().ok())
        .filter(global_unicast)
        .ok_or_else(|| ApiError::BadRequest("address not allowed".into()))?;
    Ok(Backend {
        base: base_url(scheme, &ip.to_string(), &port),
        token: None,
    })
}

/// Go's `IP.IsGlobalUnicast`: not unspecified, loopback, multicast or link-local.
fn global_unicast(ip: &IpAddr) -> bool {
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    };
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || link_local)
}

fn base_url(scheme: &str, host: &str, port: &str) -> String {
    let scheme = if scheme.is_empty() { "http" } else { scheme };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    if port.is_empty() {
        format!("{scheme}://{host}")
    } else {
        format!("{scheme}://{host}:{port}")
    }
}

/// One of a service's endpoints for the port named (or numbered) `port`, checked to be a pod
/// of the namespace that still has the address.
async fn service_backend(
    engine: &Engine,
    namespace: &str,
    scheme: &str,
    name: &str,
    port: &str,
    id: &str,
) -> Result<Backend, ApiError> {
    let mut port_name = port.to_owned();
    if let Ok(number) = port.parse::<i64>() {
        let target = Target::parse(
            &engine.registry,
            "",
            "v1",
            &format!("namespaces/{namespace}/services/{name}"),
        )?;
        let service = engine.get(&target).await?;
        port_name = service
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|p| p["port"].as_i64() == Some(number))
            .map(|p| p["name"].as_str().unwrap_or("").to_owned())
            .ok_or_else(|| {
                ApiError::ServiceUnavailable(format!(
                    "no service port {number} found for service \"{name}\""
                ))
            })?;
    }
    let target = Target::parse(
        &engine.registry,
        "",
        "v1",
        &format!("namespaces/{namespace}/endpoints/{name}"),
    )?;
    let endpoints = engine.get(&target).await?;
    let subsets = endpoints
        .pointer("/subsets")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if subsets.is_empty() {
        return Err(ApiError::ServiceUnavailable(format!(
            "no endpoints available for service \"{name}\""
        )));
    }
    // Start from a different subset and address each time, spreading requests.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as usize);
    for s in 0..subsets.len() {
        let subset = &subsets[(seed + s) % subsets.len()];
        let addresses = subset["addresses"].as_array().cloned().unwrap_or_default();
        let Some(number) = subset["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"].as_str().unwrap_or("") == port_name)
            .and_then(|p| p["port"].as_i64())
        else {
            continue;
        };
        for a in 0..addresses.len() {
            let address = &addresses[(seed / 7 + a) % addresses.len()];
            let Some(ip) = address["ip"].as_str() else {
                continue;
            };
            if is_pod_address(engine, namespace, address, ip).await {
                return Ok(Backend {
                    base: base_url(scheme, ip, &number.to_string()),
                    token: None,
                });
            }
        }
    }
    Err(ApiError::ServiceUnavailable(format!(
        "no endpoints available for service \"{id}\""
    )))
}

/// Whether an endpoint address names a pod of `namespace` that has `ip` (kube proxies only
/// to addresses that are pods).
async fn is_pod_address(engine: &Engine, namespace: &str, address: &Value, ip: &str) -> bool {
    let Some(pod) = address.get("targetRef").filter(|r| {
        r["kind"].as_str().is_none_or(|k| k == "Pod") && r["namespace"].as_str() == Some(namespace)
    }) else {
        return false;
    };
    let Some(pod_name) = pod["name"].as_str() else {
        return false;
    };
    let Ok(target) = Target::parse(
        &engine.registry,
        "",
        "v1",
        &format!("namespaces/{namespace}/pods/{pod_name}"),
    ) else {
        return false;
    };
    let Ok(pod) = engine.get(&target).await else {
        return false;
    };
    pod.pointer("/status/podIPs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|p| p["ip"].as_str() == Some(ip))
        || pod.pointer("/status/podIP").and_then(Value::as_str) == Some(ip)
}

/// A node: its agent (with the agent's credentials) when no port or the agent's port is
/// asked for, otherwise `scheme://address:port`.
async fn node_backend(
    engine: &Engine,
    scheme: &str,
    name: &str,
    port: &str,
) -> Result<Backend, ApiError> {
    let node = NodeEndpoint::of(engine, name).await?;
    if port.is_empty() || port == node.port.to_string() {
        return Ok(Backend {
            base: node.agent_url(),
            token: engine.kubelet_token.get().cloned(),
        });
    }
    Ok(Backend {
        base: base_url(scheme, node.host.trim_matches(['[', ']']), port),
        token: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proxy_paths() {
        let p =
            ProxyRequest::parse("/api/v1/namespaces/ns/pods/https:web:443/proxy/a/b/?x=1").unwrap();
        assert_eq!(p.kind, Kind::Pod);
        assert_eq!(p.namespace.as_deref(), Some("ns"));
        assert_eq!(p.id, "https:web:443");
        assert_eq!(p.path, "/a/b/?x=1");
        assert_eq!(p.prefix, "/api/v1/namespaces/ns/pods/https:web:443/proxy");
        let p = ProxyRequest::parse("/api/v1/namespaces/ns/services/svc:http/proxy").unwrap();
        assert_eq!((p.kind, p.path.as_str()), (Kind::Service, ""));
        let p = ProxyRequest::parse("/api/v1/nodes/n1/proxy/metrics").unwrap();
        assert_eq!(
            (p.kind, p.namespace, p.path.as_str()),
            (Kind::Node, None, "/metrics")
        );
        for not in [
            "/api/v1/namespaces/ns/pods/web",
            "/api/v1/namespaces/ns/pods/web/log",
            "/api/v1/namespaces/ns/pods/web/proxyx",
            "/api/v1/namespaces/ns/configmaps/c/proxy",
            "/apis/apps/v1/namespaces/ns/deployments/d/proxy",
            "/api/v1/nodes//proxy",
        ] {
            assert_eq!(ProxyRequest::parse(not), None, "{not}");
        }
    }

    #[test]
    fn splits_scheme_name_and_port() {
        assert_eq!(split_scheme_name_port("web"), Some(("", "web", "")));
        assert_eq!(split_scheme_name_port("web:80"), Some(("", "web", "80")));
        assert_eq!(
            split_scheme_name_port("https:web:443"),
            Some(("https", "web", "443"))
        );
        assert_eq!(
            split_scheme_name_port("https:web:"),
            Some(("https", "web", ""))
        );
        assert_eq!(split_scheme_name_port("ftp:web:21"), None);
        assert_eq!(split_scheme_name_port(":80"), None);
        assert_eq!(split_scheme_name_port("a:b:c:d"), None);
    }

    fn rewriter() -> Rewriter<'static> {
        Rewriter {
            prefix: "/api/v1/namespaces/ns/pods/web/proxy",
            backend_host: "10.42.0.5:80",
            request_host: "127.0.0.1:6443",
        }
    }

    #[test]
    fn rewrites_urls_that_point_at_the_backend() {
        let r = rewriter();
        let p = "/api/v1/namespaces/ns/pods/web/proxy";
        assert_eq!(r.url("/rewriteme"), format!("{p}/rewriteme"));
        assert_eq!(r.url("/a/b/?q=1#f"), format!("{p}/a/b/?q=1#f"));
        assert_eq!(r.url("http://10.42.0.5:80/x"), format!("{p}/x"));
        assert_eq!(r.url("//10.42.0.5:80/x"), format!("{p}/x"));
        assert_eq!(r.url(&format!("{p}/already")), format!("{p}/already"));
        assert_eq!(
            r.url("https://127.0.0.1:6443/x"),
            format!("https://127.0.0.1:6443{p}/x")
        );
        // Relative links resolve under the proxy already; other hosts are left alone.
        assert_eq!(r.url("relative/x"), "relative/x");
        assert_eq!(r.url("https://example.com/x"), "https://example.com/x");
        assert_eq!(r.url("mailto:a@b"), "mailto:a@b");
    }

    #[test]
    fn rewrites_html_link_attributes_only() {
        let r = rewriter();
        let html = br#"<!DOCTYPE html><html><head><link rel="stylesheet" href='/s.css'>
<script src=/app.js>var x = "<a href='/not'>";</script></head>
<body><!-- <a href="/comment"> --><a class=x HREF="/rewriteme">test</a>
<img src="/i.png" alt="/alt"><p data-href="/no">1 < 2</p><form action="/post"></form></body></html>"#;
        let out = String::from_utf8(rewrite_html(html, |u| r.url(u))).unwrap();
        let p = "/api/v1/namespaces/ns/pods/web/proxy";
        assert!(out.contains(&format!("href='{p}/s.css'")), "{out}");
        assert!(out.contains(&format!("src={p}/app.js>")), "{out}");
        assert!(out.contains(r#"var x = "<a href='/not'>";"#), "{out}");
        assert!(out.contains(r#"<!-- <a href="/comment"> -->"#), "{out}");
        assert!(
            out.contains(&format!(r#"<a class=x HREF="{p}/rewriteme">test</a>"#)),
            "{out}"
        );
        assert!(
            out.contains(&format!(r#"<img src="{p}/i.png" alt="/alt">"#)),
            "{out}"
        );
        assert!(out.contains(r#"<p data-href="/no">1 < 2</p>"#), "{out}");
        assert!(
            out.contains(&format!(r#"<form action="{p}/post">"#)),
            "{out}"
        );
        // Nothing else changes: rewriting a document with no links is the identity.
        let plain = b"<p>just <b>text</b> & more</p>";
        assert_eq!(rewrite_html(plain, |u| r.url(u)), plain);
    }
}
