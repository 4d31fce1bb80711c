//! Gateway API hostname rules: `*.example.com` matches any name with at least one more label.

/// Does `pattern` (exact, `*.suffix` or `*`) match the concrete or wildcard name `name`?
pub fn hostname_matches(pattern: &str, name: &str) -> bool {
    if pattern == "*" || pattern == name {
        return true;
    }
    match pattern.strip_prefix('*') {
        // `*.a.com` matches `x.a.com` and `*.x.a.com`, never `a.com`.
        Some(suffix) => {
            name.len() > suffix.len() && name.ends_with(suffix) && !name[..name.len() - suffix.len()].is_empty()
        }
        None => false,
    }
}

/// The hostnames a route serves on a listener, per the spec: the more specific side of each
/// intersecting pair. `None` when nothing intersects; `*` stands for "any host".
pub fn intersect_hostnames(listener: Option<&str>, route: &[String]) -> Option<Vec<String>> {
    let mut out: Vec<String> = match (listener, route.is_empty()) {
        (None, true) => vec!["*".into()],
        (None, false) => route.to_vec(),
        (Some(l), true) => vec![l.to_string()],
        (Some(l), false) => route
            .iter()
            .filter_map(|r| {
                if hostname_matches(l, r) {
                    Some(r.clone())
                } else if hostname_matches(r, l) {
                    Some(l.to_string())
                } else {
                    None
                }
            })
            .collect(),
    };
    out.sort();
    out.dedup();
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_need_an_extra_label() {
        assert!(hostname_matches("*.example.com", "a.example.com"));
        assert!(hostname_matches("*.example.com", "a.b.example.com"));
        assert!(!hostname_matches("*.example.com", "example.com"));
        assert!(!hostname_matches("*.example.com", "aexample.com"));
        assert!(hostname_matches("*", "anything"));
        assert!(!hostname_matches("a.com", "b.com"));
    }

    #[test]
    fn intersection_keeps_the_more_specific_name() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(intersect_hostnames(None, &[]), Some(v(&["*"])));
        assert_eq!(intersect_hostnames(Some("*.ex.com"), &[]), Some(v(&["*.ex.com"])));
        assert_eq!(
            intersect_hostnames(Some("*.ex.com"), &v(&["a.ex.com", "b.other.net", "*.com"])),
            Some(v(&["*.ex.com", "a.ex.com"]))
        );
        assert_eq!(
            intersect_hostnames(Some("a.ex.com"), &v(&["*.ex.com"])),
            Some(v(&["a.ex.com"]))
        );
        assert_eq!(intersect_hostnames(Some("a.ex.com"), &v(&["b.ex.com"])), None);
    }
}
