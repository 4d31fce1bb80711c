//! `explain --request 'GET http://host:port/path?q -H name:value'`: which listener, host and
//! route a request would take and where it would go — answered by ferrum-dp's own router on
//! the compiled configuration, so the answer is the proxy's, not a second implementation's.

use std::fmt::Write as _;
use std::sync::Arc;

use ferrum_dp::compile::{Compiled, Compiler};
use ferrum_dp::mesh::policy::GatewayDecision;
use ferrum_dp::telemetry::Registry;
use ferrum_snapshot::model::Route;
use ferrum_snapshot::{Secrets, Snapshot};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// A request as `--request` describes it.
#[derive(Debug)]
pub struct Request {
    pub method: Method,
    pub host: String,
    pub port: u16,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
}

/// `METHOD URL [-H 'name: value']...`.
pub fn parse(s: &str) -> Result<Request, String> {
    let mut parts = s.split(" -H ");
    let line = parts.next().unwrap_or_default();
    let mut words = line.split_whitespace();
    let (Some(method), Some(url), None) = (words.next(), words.next(), words.next()) else {
        return Err(format!(
            "{line:?}: want `METHOD URL`, e.g. `GET http://shop.example.com/cart`"
        ));
    };
    let method: Method = method
        .parse()
        .map_err(|_| format!("{method:?} is not an HTTP method"))?;
    let uri: http::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("{url:?} has no host"))?.to_string();
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
    let mut headers = HeaderMap::new();
    for h in parts {
        let (name, value) = h
            .trim()
            .trim_matches(|c| c == '\'' || c == '"')
            .split_once(':')
            .ok_or_else(|| format!("-H {h:?}: want `name: value`"))?;
        let name: HeaderName = name
            .trim()
            .parse()
            .map_err(|_| format!("{name:?} is not a header name"))?;
        let value = HeaderValue::from_str(value.trim()).map_err(|_| format!("{value:?} is not a header value"))?;
        headers.append(name, value);
    }
    Ok(Request {
        method,
        host,
        port,
        path: uri.path().to_string(),
        query: uri.query().map(String::from),
        headers,
    })
}

/// The request as the proxy's policies see it.
pub fn http_parts(req: &Request, path: &str) -> http::request::Parts {
    let target = match &req.query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut r = http::Request::new(());
    *r.method_mut() = req.method.clone();
    *r.uri_mut() = target.parse().unwrap_or_default();
    *r.headers_mut() = req.headers.clone();
    if let Ok(h) = HeaderValue::from_str(&req.host) {
        r.headers_mut().insert(http::header::HOST, h);
    }
    r.into_parts().0
}

/// The model route named `name` (its match and action, as the snapshot says them).
fn model_route<'a>(snap: &'a Snapshot, name: &str) -> Option<&'a Route> {
    snap.listeners
        .iter()
        .flat_map(|l| &l.virtual_hosts)
        .flat_map(|v| &v.routes)
        .find(|r| r.name == name)
        .map(|r| &**r)
}

/// `snap` compiled as ferrum-dp compiles it: for the sidecar of pod `me` (`namespace`, `name`),
/// or (`None`) for every Gateway.
pub fn compile_as(snap: Snapshot, secrets: &Secrets, me: Option<(String, String)>) -> Result<Compiled, String> {
    // Cluster runtimes start health checks: they need a runtime to exist in.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let _in_rt = rt.enter();
    let compiler = Compiler::new(Arc::new(Registry::default()), 1);
    if let Some(me) = me {
        let _ = compiler.me.set(me);
    }
    compiler
        .compile(snap, secrets, &Compiled::empty())
        .map_err(|e| format!("the configuration does not compile: {e}"))
}

/// What happens to `req` under `snap`, as text; `Err` for a configuration that does not compile.
pub fn explain(snap: Snapshot, secrets: &Secrets, req: &Request) -> Result<String, String> {
    let compiled = compile_as(snap, secrets, None)?;
    let mut out = String::new();
    let Some((addr, l)) = compiled.listeners.iter().find(|(a, _)| a.port() == req.port) else {
        let _ = writeln!(out, "no listener on port {}: the connection is refused", req.port);
        return Ok(out);
    };
    match l.name == addr.to_string() {
        true => writeln!(out, "listener {addr}"),
        false => writeln!(out, "listener {} ({addr})", l.name),
    }
    .expect("writing to a String");
    // As a proxy with the default flags normalises it.
    let limits = ferrum_dp::limits::Limits::default();
    let path = match ferrum_dp::proxy::path::normalize(&req.path, limits.merge_slashes, limits.escaped_slashes) {
        Ok(p) => p.into_owned(),
        Err(e) => {
            let _ = writeln!(out, "path {:?} is refused: {e} (400)", req.path);
            return Ok(out);
        }
    };
    if path != req.path {
        let _ = writeln!(out, "path normalised to {path}");
    }
    let Some(vh) = l.hosts.find(&req.host) else {
        let _ = writeln!(out, "no virtual host for {:?}: 404", req.host);
        return Ok(out);
    };
    if let Some(p) = &vh.policies {
        let mut parts = http_parts(req, &path);
        // Source-address rules see a loopback client, or the trusted X-Forwarded-For hop.
        let mut conn = ferrum_dp::proxy::ConnInfo::direct(*addr, std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        conn.trust_forwarded(&parts.headers, l.client_address.xff_trusted_hops);
        let mut decision = p.decide(&mut parts, &conn);
        if let GatewayDecision::Ask(provider, rest) = decision {
            let _ = writeln!(
                out,
                "asks external authorization provider {provider:?} first; if it allows:"
            );
            decision = *rest;
        }
        match decision {
            GatewayDecision::Allow | GatewayDecision::Ask(..) => {
                let _ = writeln!(out, "allowed by the Gateway's policies");
            }
            GatewayDecision::Unauthenticated(why) => {
                let _ = writeln!(out, "token refused by the Gateway's RequestAuthentication ({why}): 401");
                return Ok(out);
            }
            GatewayDecision::Deny(why) => {
                let _ = writeln!(out, "denied by the Gateway's AuthorizationPolicies ({why}): 403");
                return Ok(out);
            }
        }
    }
    let Some(r) = vh.find(&req.method, &path, req.query.as_deref(), &req.headers) else {
        let _ = writeln!(out, "host {:?}: no route matches: 404", req.host);
        return Ok(out);
    };
    let _ = writeln!(out, "route {}", r.name);
    if let Some(m) = model_route(&compiled.snapshot, &r.name) {
        let _ = writeln!(out, "  -> {}", crate::explain::action(m));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_headers_and_defaults() {
        let r = parse("POST https://shop.example.com/cart?x=1 -H 'x-canary: true' -H accept:json").unwrap();
        assert_eq!(
            (r.method, r.host.as_str(), r.port),
            (Method::POST, "shop.example.com", 443)
        );
        assert_eq!((r.path.as_str(), r.query.as_deref()), ("/cart", Some("x=1")));
        assert_eq!(r.headers["x-canary"], "true");
        assert_eq!(r.headers["accept"], "json");
        assert!(parse("GET").is_err());
        assert!(parse("GET http://a/ -H nocolon").is_err());
    }
}
