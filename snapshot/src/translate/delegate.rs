//! VirtualService delegation (Istio `delegate`): an `http` route of a root VirtualService that
//! names a delegate is replaced by the delegate's routes, in their order, each merged with it as
//! Istio merges them — the delegate's matches must lie within the root route's (a delegate
//! match that cannot, e.g. a path outside the root's prefix, is dropped; a route none of whose
//! matches can is dropped), and what the delegate's route leaves unset (rewrite, timeout,
//! retries, fault, mirrors, headers, CORS) is the root route's. One level only; a delegate has
//! no `hosts` and is applied only through the roots that name it. A delegation that cannot be
//! followed (no such VirtualService, one with hosts, one that delegates again) takes no
//! requests, as in Istio, and is reported; the root's other routes serve.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::istio::{VirtualService, VsHttpRoute, VsMatch, VsStringMatch};

use super::Reason;

/// A field and why the VirtualService cannot be applied.
type Refusal = (String, Reason, String);

/// One route to translate: the route, the namespace its destinations' short names resolve in
/// (the delegate's, for a delegate's route), and where it is written.
pub(crate) struct Expanded<'a> {
    pub route: Cow<'a, VsHttpRoute>,
    pub namespace: &'a str,
    pub at: String,
}

/// `vs`'s `http` routes (in namespace `ns`) with every delegating route replaced by its
/// delegate's routes merged into it (`all` is every VirtualService), and the delegations that
/// could not be followed. A delegating route with destinations of its own keeps `vs` out.
pub(crate) fn expand<'a>(
    vs: &'a VirtualService,
    ns: &'a str,
    all: &'a [Arc<VirtualService>],
) -> Result<(Vec<Expanded<'a>>, Vec<Refusal>), Refusal> {
    let mut out = Vec::new();
    let mut unfollowed = Vec::new();
    for (i, root) in vs.spec.http.iter().enumerate() {
        let at = format!("spec.http[{i}]");
        let Some(d) = &root.delegate else {
            out.push(Expanded {
                route: Cow::Borrowed(root),
                namespace: ns,
                at,
            });
            continue;
        };
        if !root.route.is_empty() || root.redirect.is_some() || root.direct_response.is_some() {
            return Err((
                format!("{at}.delegate"),
                Reason::Invalid,
                "a delegating route has no route, redirect or directResponse of its own".into(),
            ));
        }
        let dns = d.namespace.as_deref().unwrap_or(ns);
        let delegate = match find(all, dns, &d.name) {
            Ok(v) => v,
            Err((reason, why)) => {
                let why = format!("VirtualService {dns}/{} {why}; the route takes no requests", d.name);
                unfollowed.push((format!("{at}.delegate"), reason, why));
                continue;
            }
        };
        for (j, leaf) in delegate.spec.http.iter().enumerate() {
            if let Some(route) = merged(root, leaf) {
                out.push(Expanded {
                    route: Cow::Owned(route),
                    namespace: dns,
                    at: format!("{at}.delegate({dns}/{}).http[{j}]", d.name),
                });
            }
        }
    }
    Ok((out, unfollowed))
}

/// The delegate `ns/name`, or why it cannot be one.
fn find<'a>(
    all: &'a [Arc<VirtualService>],
    ns: &str,
    name: &str,
) -> Result<&'a VirtualService, (Reason, &'static str)> {
    let found = all.iter().find(|v| {
        v.metadata.name.as_deref() == Some(name) && v.metadata.namespace.as_deref().unwrap_or("default") == ns
    });
    match found {
        None => Err((Reason::BackendNotFound, "does not exist")),
        Some(v) if !v.spec.hosts.is_empty() => Err((Reason::Invalid, "has hosts: a delegate has none")),
        Some(v) if v.spec.http.iter().any(|h| h.delegate.is_some()) => {
            Err((Reason::UnsupportedValue, "delegates again: one level only"))
        }
        Some(v) => Ok(v),
    }
}

/// The delegate's route `leaf` within the root's route: `None` when none of its matches lies
/// within one of the root's.
fn merged(root: &VsHttpRoute, leaf: &VsHttpRoute) -> Option<VsHttpRoute> {
    let mut out = leaf.clone();
    out.matches = match (root.matches.is_empty(), leaf.matches.is_empty()) {
        (true, _) => leaf.matches.clone(),
        (false, true) => root.matches.clone(),
        (false, false) => {
            let within: Vec<VsMatch> = root
                .matches
                .iter()
                .flat_map(|r| leaf.matches.iter().filter_map(move |l| merged_match(r, l)))
                .collect();
            if within.is_empty() {
                return None;
            }
            within
        }
    };
    fn or<T: Clone>(leaf: &mut Option<T>, root: &Option<T>) {
        if leaf.is_none() {
            leaf.clone_from(root);
        }
    }
    or(&mut out.rewrite, &root.rewrite);
    or(&mut out.timeout, &root.timeout);
    or(&mut out.retries, &root.retries);
    or(&mut out.fault, &root.fault);
    or(&mut out.headers, &root.headers);
    or(&mut out.cors_policy, &root.cors_policy);
    if out.mirror.is_none() && out.mirrors.is_empty() {
        out.mirror.clone_from(&root.mirror);
        out.mirror_percentage.clone_from(&root.mirror_percentage);
        out.mirrors.clone_from(&root.mirrors);
    }
    // What the root route has that Ferrum does not read stays, to be refused with the rest.
    for (k, v) in &root.other {
        out.other.entry(k.clone()).or_insert_with(|| v.clone());
    }
    Some(out)
}

/// `leaf` narrowed by `root`: each condition the leaf leaves open is the root's; `None` when
/// the leaf's condition does not lie within the root's.
fn merged_match(root: &VsMatch, leaf: &VsMatch) -> Option<VsMatch> {
    let mut out = leaf.clone();
    out.name = match (&root.name, &leaf.name) {
        (Some(r), Some(l)) => Some(format!("{r}-{l}")),
        (r, l) => l.clone().or_else(|| r.clone()),
    };
    out.uri = narrowed(&root.uri, &leaf.uri, uri_within)?;
    out.method = narrowed(&root.method, &leaf.method, |r, l| r == l)?;
    out.headers = narrowed_map(&root.headers, &leaf.headers, |r, l| r == l)?;
    out.query_params = narrowed_map(&root.query_params, &leaf.query_params, |r, l| r == l)?;
    out.port = narrowed(&root.port, &leaf.port, |r, l| r == l)?;
    out.source_labels = narrowed_map(&root.source_labels, &leaf.source_labels, |r, l| r == l)?;
    out.source_namespace = narrowed(&root.source_namespace, &leaf.source_namespace, |r, l| r == l)?;
    out.ignore_uri_case |= root.ignore_uri_case;
    for (k, v) in &root.other {
        out.other.entry(k.clone()).or_insert_with(|| v.clone());
    }
    Some(out)
}

/// The leaf's condition if it lies within the root's, the root's if the leaf has none.
fn narrowed<T: Clone>(root: &Option<T>, leaf: &Option<T>, within: impl Fn(&T, &T) -> bool) -> Option<Option<T>> {
    match (root, leaf) {
        (Some(r), Some(l)) => within(r, l).then(|| Some(l.clone())),
        (r, None) => Some(r.clone()),
        (None, l) => Some(l.clone()),
    }
}

fn narrowed_map<K: Ord + Clone, V: Clone>(
    root: &BTreeMap<K, V>,
    leaf: &BTreeMap<K, V>,
    within: impl Fn(&V, &V) -> bool,
) -> Option<BTreeMap<K, V>> {
    let mut out = leaf.clone();
    for (k, r) in root {
        match leaf.get(k) {
            Some(l) if !within(r, l) => return None,
            Some(_) => {}
            None => {
                out.insert(k.clone(), r.clone());
            }
        }
    }
    Some(out)
}

/// Whether the leaf's path condition lies within the root's (Istio's rule): an exact path only
/// within the same exact path or a prefix of it, a prefix within a shorter prefix, a regex only
/// within the same regex.
fn uri_within(root: &VsStringMatch, leaf: &VsStringMatch) -> bool {
    match (root, leaf) {
        (VsStringMatch { exact: Some(r), .. }, VsStringMatch { exact: Some(l), .. }) => r == l,
        (VsStringMatch { prefix: Some(r), .. }, VsStringMatch { exact: Some(l), .. })
        | (VsStringMatch { prefix: Some(r), .. }, VsStringMatch { prefix: Some(l), .. }) => l.starts_with(r.as_str()),
        (VsStringMatch { regex: Some(r), .. }, VsStringMatch { regex: Some(l), .. }) => r == l,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(yaml: &str) -> VsMatch {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn a_delegates_match_lies_within_the_roots_or_is_dropped() {
        let root = m("{uri: {prefix: /shop}, headers: {x-env: {exact: prod}}}");
        let inside = merged_match(&root, &m("{uri: {prefix: /shop/cart}, port: 80}")).unwrap();
        assert_eq!(inside.uri.unwrap().prefix.as_deref(), Some("/shop/cart"));
        assert_eq!(
            inside.headers["x-env"].exact.as_deref(),
            Some("prod"),
            "the root's condition added"
        );
        assert_eq!(inside.port, Some(80));
        let exact = merged_match(&root, &m("{uri: {exact: /shop/checkout}}")).unwrap();
        assert_eq!(exact.uri.unwrap().exact.as_deref(), Some("/shop/checkout"));
        assert!(
            merged_match(&root, &m("{uri: {prefix: /admin}}")).is_none(),
            "outside the root's prefix"
        );
        assert!(merged_match(&root, &m("{uri: {regex: '/shop/.*'}}")).is_none());
        assert!(
            merged_match(&root, &m("{headers: {x-env: {exact: dev}}}")).is_none(),
            "a conflicting header"
        );
        let open = merged_match(&root, &m("{method: {exact: GET}}")).unwrap();
        assert_eq!(
            open.uri.unwrap().prefix.as_deref(),
            Some("/shop"),
            "the root's path where the leaf has none"
        );
    }

    #[test]
    fn what_the_delegates_route_leaves_unset_is_the_roots() {
        let root: VsHttpRoute = serde_yaml::from_str(
            "{match: [{uri: {prefix: /api}}], timeout: 3s, headers: {request: {set: {x-root: 'yes'}}}, delegate: {name: d}}",
        )
        .unwrap();
        let leaf: VsHttpRoute =
            serde_yaml::from_str("{match: [{uri: {prefix: /api/v1}}, {uri: {prefix: /web}}], timeout: 1s, route: [{destination: {host: b}}]}")
                .unwrap();
        let r = merged(&root, &leaf).unwrap();
        assert_eq!(r.matches.len(), 1, "/web is outside /api");
        assert_eq!(r.timeout.as_deref(), Some("1s"), "the delegate's own");
        assert!(r.headers.is_some(), "the root's, where the delegate has none");
        assert!(r.delegate.is_none());
        let outside: VsHttpRoute =
            serde_yaml::from_str("{match: [{uri: {prefix: /web}}], route: [{destination: {host: b}}]}").unwrap();
        assert!(merged(&root, &outside).is_none());
    }
}
