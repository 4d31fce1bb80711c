//! Request path normalisation before matching (RFC 3986 §6.2.2): percent-decoding of
//! unreserved characters, dot-segment removal, optional slash merging. What cannot be normalised
//! safely is refused: by default an encoded `/` or `\` (a backend may decode it into a separator
//! the route match never saw, as Envoy's `path_with_escaped_slashes_action: REJECT_REQUEST`
//! does; [`EscapedSlashes`] can keep or decode them instead), a raw `\`, and broken
//! percent-encoding.

use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("encoded '/' or '\\' in the path")]
    EscapedSlash,
    #[error("'\\' in the path")]
    Backslash,
    #[error("invalid percent-encoding in the path")]
    BadEncoding,
}

/// What an encoded `/` or `\` (`%2F`, `%5C`) in a path gets (Envoy's
/// `path_with_escaped_slashes_action`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EscapedSlashes {
    /// 400 `invalid_path`: the safe default.
    #[default]
    Reject,
    /// Left encoded, part of its segment, for apps that carry `/` in a segment's data (a route or
    /// policy sees `%2F`; a backend that decodes it again must not resolve what follows).
    Keep,
    /// Decoded to `/` before dot segments are removed, so what is matched is what a backend that
    /// decodes them would resolve.
    Unescape,
}

/// The normalised path; borrowed (no allocation) when the path is already normal.
pub fn normalize(path: &str, merge_slashes: bool, escaped: EscapedSlashes) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        // `*` (OPTIONS) and authority-form targets have no path to normalise.
        return Ok(Cow::Borrowed(path));
    }
    let b = path.as_bytes();
    let found = scan(b);
    if found.backslash {
        return Err(PathError::Backslash);
    }
    let encoded = found.encoded;
    if !(encoded || found.dot_segment || merge_slashes && found.double_slash) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = if encoded {
        Cow::Owned(decode_unreserved(b, escaped)?)
    } else {
        Cow::Borrowed(path)
    };
    Ok(Cow::Owned(remove_dot_segments(&decoded, merge_slashes)))
}

/// What a path holds that normalising would change, or refuse.
#[derive(Default)]
struct Found {
    backslash: bool,
    encoded: bool,
    double_slash: bool,
    dot_segment: bool,
}

/// One pass over the path's bytes (four searches cost more than the rest of a short path's
/// handling).
fn scan(b: &[u8]) -> Found {
    let mut found = Found::default();
    let dots = |seg: &[u8]| seg == b"." || seg == b"..";
    let mut segment = 0;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'\\' => found.backslash = true,
            b'%' => found.encoded = true,
            b'/' => {
                found.double_slash |= i > 0 && b[i - 1] == b'/';
                found.dot_segment |= dots(&b[segment..i]);
                segment = i + 1;
            }
            _ => {}
        }
    }
    found.dot_segment |= dots(&b[segment..]);
    found
}

/// Decodes `%XX` of unreserved characters (and of `/` and `\`, as `/`, when unescaping them);
/// keeps every other escape, with upper-case hex.
fn decode_unreserved(b: &[u8], escaped: EscapedSlashes) -> Result<String, PathError> {
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            out.push(b[i] as char);
            i += 1;
            continue;
        }
        let hex = |c: u8| (c as char).to_digit(16);
        let (Some(hi), Some(lo)) = (b.get(i + 1).and_then(|c| hex(*c)), b.get(i + 2).and_then(|c| hex(*c))) else {
            return Err(PathError::BadEncoding);
        };
        let c = (hi * 16 + lo) as u8;
        match c {
            b'/' | b'\\' if escaped == EscapedSlashes::Reject => return Err(PathError::EscapedSlash),
            b'/' | b'\\' if escaped == EscapedSlashes::Unescape => out.push('/'),
            c if c.is_ascii_alphanumeric() || b"-._~".contains(&c) => out.push(c as char),
            c => {
                out.push('%');
                out.push_str(&format!("{c:02X}"));
            }
        }
        i += 3;
    }
    Ok(out)
}

/// RFC 3986 §5.2.4 on an absolute path; a trailing `.` or `..` leaves a trailing slash.
fn remove_dot_segments(path: &str, merge_slashes: bool) -> String {
    let segs: Vec<&str> = path[1..].split('/').collect();
    let last = segs.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segs.len());
    for (i, seg) in segs.iter().enumerate() {
        match *seg {
            "." => {}
            ".." => {
                out.pop();
            }
            "" if merge_slashes && i != last => continue,
            s => out.push(s),
        }
        if i == last && (*seg == "." || *seg == "..") {
            out.push("");
        }
    }
    let mut s = String::with_capacity(path.len());
    s.push('/');
    s.push_str(&out.join("/"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p, true, EscapedSlashes::Reject).map(Cow::into_owned)
    }

    #[test]
    fn traversal_is_resolved_before_matching() {
        assert_eq!(n("/public/../admin").unwrap(), "/admin");
        assert_eq!(n("/public/%2e%2e/admin").unwrap(), "/admin");
        assert_eq!(n("/public/%2E./admin").unwrap(), "/admin");
        assert_eq!(n("/a/./b/.").unwrap(), "/a/b/");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/../../x").unwrap(), "/x");
        assert_eq!(n("/..").unwrap(), "/");
        assert_eq!(n("/a/..b/c.").unwrap(), "/a/..b/c.");
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_kept() {
        assert_eq!(n("/%7Euser/%41b%2d").unwrap(), "/~user/Ab-");
        assert_eq!(n("/a%20b/%c3%a9").unwrap(), "/a%20b/%C3%A9");
        assert_eq!(n("/q%3f").unwrap(), "/q%3F");
    }

    #[test]
    fn slashes_merge_when_configured() {
        assert_eq!(n("//a///b//").unwrap(), "/a/b/");
        let kept = |p| normalize(p, false, EscapedSlashes::Reject).unwrap();
        assert_eq!(kept("//a//b"), "//a//b");
        assert_eq!(kept("/a//../b"), "/a/b");
    }

    #[test]
    fn unsafe_paths_are_refused() {
        assert_eq!(n("/public/..%2fadmin"), Err(PathError::EscapedSlash));
        assert_eq!(n("/a%5Cb"), Err(PathError::EscapedSlash));
        assert_eq!(n("/a\\b"), Err(PathError::Backslash));
        assert_eq!(n("/a%zz"), Err(PathError::BadEncoding));
        assert_eq!(n("/a%4"), Err(PathError::BadEncoding));
    }

    #[test]
    fn escaped_slashes_can_be_kept_or_decoded() {
        let keep = |p| normalize(p, true, EscapedSlashes::Keep).map(Cow::into_owned);
        assert_eq!(keep("/repos/a%2fb/tags").unwrap(), "/repos/a%2Fb/tags");
        assert_eq!(keep("/public/..%2fadmin").unwrap(), "/public/..%2Fadmin", "one segment");
        assert_eq!(keep("/a%5Cb/../c").unwrap(), "/c");
        assert_eq!(keep("/a\\b"), Err(PathError::Backslash), "a raw one is still refused");
        let unescape = |p| normalize(p, true, EscapedSlashes::Unescape).map(Cow::into_owned);
        assert_eq!(unescape("/public/..%2fadmin").unwrap(), "/admin");
        assert_eq!(unescape("/public/%5c..%5cadmin").unwrap(), "/admin");
        assert_eq!(unescape("/a%2F%2Fb").unwrap(), "/a/b", "merged once decoded");
        assert_eq!(unescape("/a%252Fb").unwrap(), "/a%252Fb", "decoded once, not twice");
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/a/b", "/a/b/", "/a.b/c..d", "*"] {
            assert!(
                matches!(normalize(p, true, EscapedSlashes::Reject), Ok(Cow::Borrowed(x)) if x == p),
                "{p}"
            );
        }
    }
}
