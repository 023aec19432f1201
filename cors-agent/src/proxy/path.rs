//! The request path as RFC 3986 §6.2.2 normalises it, so the route (and so the CORS policy) is
//! chosen for the same resource the app serves: the app receives the normalised path too.
//!
//! - `%XX` for an unreserved character (ALPHA DIGIT `-` `.` `_` `~`) is decoded; other escapes
//!   keep their meaning and get uppercase hex.
//! - `.` and `..` segments are resolved (`remove_dot_segments`; `..` above the root stays at
//!   the root), and repeated slashes are merged (`//` -> `/`, as nginx's `merge_slashes`).
//! - Refused: an encoded slash or backslash (`%2F`, `%5C`), a raw backslash, a NUL (raw or
//!   `%00`) and an invalid escape (`%zz`, a truncated `%4`), because apps disagree on them.
//!
//! The query string is not part of the path and is never touched.

/// Why a path is refused (400, never forwarded).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path has an encoded slash or backslash")]
    EncodedSeparator,
    #[error("the path has a backslash")]
    Backslash,
    #[error("the path has a NUL")]
    Nul,
    #[error("the path has an invalid percent-escape")]
    BadEscape,
}

/// The normalised form of `path`, or `None` when `path` already is normal (the common case,
/// which allocates nothing).
pub fn normalize(path: &str) -> Result<Option<String>, PathError> {
    if !path.starts_with('/') {
        // `*` (OPTIONS *) and authority-form targets have no path to normalise.
        return Ok(None);
    }
    if is_clean(path.as_bytes()) {
        return Ok(None);
    }
    let decoded = decode_unreserved(path)?;
    let normal = remove_dot_segments(&decoded);
    Ok((normal != path).then_some(normal))
}

/// No escape, backslash or NUL, no empty segment and no dot segment: nothing to do.
fn is_clean(bytes: &[u8]) -> bool {
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' | b'\\' | 0 => return false,
            b'/' => {
                let rest = &bytes[i + 1..];
                let segment_end = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
                match &rest[..segment_end] {
                    // `//`, or `.`/`..` segments. (A trailing `/` is an empty last segment
                    // and is kept as it is.)
                    b"" if segment_end < rest.len() => return false,
                    b"." | b".." => return false,
                    _ => {}
                }
            }
            _ => {}
        }
        i += 1;
    }
    true
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes escapes of unreserved characters, uppercases the others, refuses the dangerous ones.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let value = hi * 16 + lo;
                match value {
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    0 => return Err(PathError::Nul),
                    v if is_unreserved(v) => out.push(char::from(v)),
                    v => {
                        const HEX: &[u8; 16] = b"0123456789ABCDEF";
                        out.push('%');
                        out.push(char::from(HEX[usize::from(v >> 4)]));
                        out.push(char::from(HEX[usize::from(v & 0xf)]));
                    }
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            0 => return Err(PathError::Nul),
            _ => {
                // Copy the run up to the next byte of interest in one go (keeps UTF-8 whole).
                let run = bytes[i..]
                    .iter()
                    .position(|&b| matches!(b, b'%' | b'\\' | 0))
                    .map_or(bytes.len(), |n| i + n);
                out.push_str(&path[i..run]);
                i = run;
            }
        }
    }
    Ok(out)
}

/// RFC 3986 §5.2.4 on an absolute path, with empty segments dropped (`//` -> `/`). A final
/// `.`, `..` or empty segment leaves a trailing slash, as the RFC does.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    let segments = path.strip_prefix('/').unwrap_or(path).split('/');
    for segment in segments {
        trailing_slash = false;
        match segment {
            "" | "." => trailing_slash = true,
            ".." => {
                kept.pop();
                trailing_slash = true;
            }
            s => kept.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &kept {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || kept.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_rfc_3986() {
        let cases: &[(&str, &str)] = &[
            ("/public/..%2fprivate", "!"),
            ("/public/../private/secret", "/private/secret"),
            ("/public/%2e%2e/private/secret", "/private/secret"),
            ("/public/%2E%2E/private", "/private"),
            ("/public/.%2e/private", "/private"),
            ("//private/secret", "/private/secret"),
            ("/a///b//", "/a/b/"),
            ("/a/./b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/..", "/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/a/..", "/"),
            ("/.", "/"),
            ("//", "/"),
            ("/%7Euser/%41%62c", "/~user/Abc"),
            ("/%e2%82%ac", "/%E2%82%AC"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
            ("/€/x", "/€/x"),
            ("/%2e%2e%2e", "/..."),
        ];
        for (input, want) in cases {
            let got = normalize(input).map(|n| n.unwrap_or_else(|| input.to_string()));
            if *want == "!" {
                assert!(got.is_err(), "{input:?} -> {got:?}");
            } else {
                assert_eq!(got.as_deref(), Ok(*want), "{input:?}");
            }
        }
    }

    #[test]
    fn clean_paths_are_left_alone() {
        for path in [
            "/",
            "/a",
            "/a/b/",
            "/.well-known/x",
            "/a/..b",
            "/a.b/c..",
            "*",
            "",
            "/a%20b",
        ] {
            let got = normalize(path);
            assert!(
                matches!(got, Ok(None)),
                "{path:?} should be unchanged, got {got:?}"
            );
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        let cases: &[(&str, PathError)] = &[
            ("/a%2fb", PathError::EncodedSeparator),
            ("/a%2Fb", PathError::EncodedSeparator),
            ("/a%5cb", PathError::EncodedSeparator),
            ("/a%5Cb", PathError::EncodedSeparator),
            ("/a\\b", PathError::Backslash),
            ("/a\0b", PathError::Nul),
            ("/a%00b", PathError::Nul),
            ("/a%zzb", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/a%", PathError::BadEscape),
            ("/a%g1", PathError::BadEscape),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input), Err(*want), "{input:?}");
        }
    }
}
