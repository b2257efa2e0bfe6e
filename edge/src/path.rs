//! Request-path normalisation (RFC 3986 section 6.2.2), done before a path is routed.
//!
//! Backends and the gateway must agree on what a path means. A backend that resolves
//! `/ws/x/../admin` to `/ws/admin` would otherwise serve a path the gateway routed (and ran
//! policies for) as something else, and `../` could climb out of the backend's base path. So
//! the gateway routes on, and forwards, the normalised path only:
//!
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, and the hex
//!   digits of every other percent-encoding are upper-cased (section 6.2.2.1-2), so `%2e%2E` is
//!   a `.` segment like any other;
//! - `.` and `..` segments are removed (section 5.2.4) and `//` is merged into `/`;
//! - what cannot be made safe is refused: an encoded `/` (`%2F`, a segment boundary the
//!   backend may or may not honour), a `\` raw or encoded (Windows-style separators some
//!   servers accept), an encoded NUL, a malformed percent-encoding, a `..` that would climb
//!   above the root, and `..;params` / `.;params` (dot segments to servlet containers).
//!
//! [`Normalised::lowest_after_climb`] records how high the path climbed, so the router can
//! refuse a path that climbed out of the API it ends up in (see [`Normalised::climbs_out_of`]).
//!
//! Hand-written rather than taken from a URL crate: `url` and `http` parse a path but do not
//! decode unreserved characters before dot-segment removal, and neither reports a climb.

use std::fmt;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not an absolute path (`/...`).
    NotAbsolute,
    /// `%` not followed by two hex digits.
    BadPercentEncoding,
    /// `%2F`: a `/` that is not a segment separator.
    EncodedSlash,
    /// `\`, raw or as `%5C`.
    Backslash,
    /// `%00`.
    EncodedNul,
    /// A `..` segment with nothing left to remove.
    AboveRoot,
    /// A `.` or `..` with path parameters (`..;x`): RFC 3986 says it is an ordinary segment,
    /// but servlet containers strip the parameters and treat it as a dot segment, which would
    /// let `/api/x/..;/admin` reach what the gateway never routed.
    DotSegmentWithParams,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "the path must start with `/`",
            PathError::BadPercentEncoding => "malformed percent-encoding in the path",
            PathError::EncodedSlash => "an encoded `/` (%2F) is not allowed in the path",
            PathError::Backslash => "a `\\` (raw or %5C) is not allowed in the path",
            PathError::EncodedNul => "an encoded NUL (%00) is not allowed in the path",
            PathError::AboveRoot => "the path climbs above the root with `..`",
            PathError::DotSegmentWithParams => {
                "a `.` or `..` segment with `;` parameters is not allowed in the path"
            }
        })
    }
}

impl std::error::Error for PathError {}

/// A normalised absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalised {
    /// Starts with `/`; no `.`/`..` or empty segments (a single trailing `/` is kept).
    pub path: String,
    /// The smallest number of segments left right after a `..` removed one, if any `..` did:
    /// `/a/b/../c` climbed back to depth 1. `None` when the path had no effective `..`.
    pub lowest_after_climb: Option<usize>,
}

impl Normalised {
    /// Whether the path, on its way to `self.path`, climbed above the first `depth` segments:
    /// for an API whose `url_suffix` has `depth` segments, that is a path that left the API
    /// (e.g. `/chat/x/../admin` routed to `chat/admin`, or `/chat/../other`).
    pub fn climbs_above(&self, depth: usize) -> bool {
        self.lowest_after_climb.is_some_and(|d| d < depth)
    }

    /// [`Normalised::climbs_above`] the segments of `url_suffix` (`chat/admin`: 2). The suffix
    /// is only looked at for a path that had an effective `..`.
    pub fn climbs_out_of(&self, url_suffix: &str) -> bool {
        self.lowest_after_climb.is_some()
            && self.climbs_above(url_suffix.split('/').filter(|s| !s.is_empty()).count())
    }
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

/// Decodes percent-encoded unreserved characters of one segment and upper-cases the rest.
fn normalise_segment(seg: &str, out: &mut String) -> Result<(), PathError> {
    let bytes = seg.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadPercentEncoding);
                };
                let v = h * 16 + l;
                match v {
                    b'/' => return Err(PathError::EncodedSlash),
                    b'\\' => return Err(PathError::Backslash),
                    0 => return Err(PathError::EncodedNul),
                    v if is_unreserved(v) => out.push(v as char),
                    v => {
                        const HEX: &[u8; 16] = b"0123456789ABCDEF";
                        out.push('%');
                        out.push(HEX[usize::from(v >> 4)] as char);
                        out.push(HEX[usize::from(v & 15)] as char);
                    }
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            _ => {
                // Copy the run of ordinary characters up to the next `%` or `\` at once (the
                // input is a `str`, so a run never splits a UTF-8 sequence).
                let end = bytes[i..]
                    .iter()
                    .position(|&c| c == b'%' || c == b'\\')
                    .map_or(bytes.len(), |p| i + p);
                out.push_str(&seg[i..end]);
                i = end;
            }
        }
    }
    Ok(())
}

/// Normalises an absolute request path (the path of an origin-form request target, without
/// the query).
pub fn normalise(raw: &str) -> Result<Normalised, PathError> {
    let Some(rest) = raw.strip_prefix('/') else {
        return Err(PathError::NotAbsolute);
    };
    // Nearly every real path is already normal: without a `%`, a `\`, an empty segment or a
    // segment starting with `.`, nothing below would change it. Skip the per-segment work (and
    // its allocations) on the handshake path.
    if !raw.contains(['%', '\\']) && !raw.contains("//") && !raw.contains("/.") {
        return Ok(Normalised {
            path: raw.to_owned(),
            lowest_after_climb: None,
        });
    }
    let mut segments: Vec<String> = Vec::new();
    let mut lowest: Option<usize> = None;
    // Whether the output ends in `/` (the last input segment was empty, `.` or `..`).
    let mut trailing = false;
    let mut decoded = String::new();
    for seg in rest.split('/') {
        decoded.clear();
        normalise_segment(seg, &mut decoded)?;
        if let Some((head, _)) = decoded.split_once(';') {
            if head == "." || head == ".." {
                return Err(PathError::DotSegmentWithParams);
            }
        }
        match decoded.as_str() {
            "" => {
                // `//` merged; a final empty segment is the trailing slash.
                trailing = true;
            }
            "." => trailing = true,
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                let depth = segments.len();
                lowest = Some(lowest.map_or(depth, |l: usize| l.min(depth)));
                trailing = true;
            }
            s => {
                segments.push(s.to_owned());
                trailing = false;
            }
        }
    }
    let mut path = String::with_capacity(raw.len());
    for s in &segments {
        path.push('/');
        path.push_str(s);
    }
    if trailing || segments.is_empty() {
        path.push('/');
    }
    Ok(Normalised {
        path,
        lowest_after_climb: lowest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalise(p).map(|n| n.path)
    }

    #[test]
    fn plain_paths_are_unchanged() {
        for p in [
            "/",
            "/chat",
            "/chat/",
            "/chat/room/1",
            "/a%20b",
            "/caf%C3%A9",
            "/é",
        ] {
            assert_eq!(n(p).as_deref(), Ok(p), "{p}");
        }
    }

    #[test]
    fn dot_segments_and_double_slashes_are_removed() {
        assert_eq!(n("/chat/x/../admin").as_deref(), Ok("/chat/admin"));
        assert_eq!(n("/chat/./room").as_deref(), Ok("/chat/room"));
        assert_eq!(n("/chat//room///1").as_deref(), Ok("/chat/room/1"));
        assert_eq!(n("//chat").as_deref(), Ok("/chat"));
        assert_eq!(n("/chat/..").as_deref(), Ok("/"));
        assert_eq!(n("/chat/x/..").as_deref(), Ok("/chat/"));
        assert_eq!(n("/chat/.").as_deref(), Ok("/chat/"));
        assert_eq!(n("/a/b/c/../../d").as_deref(), Ok("/a/d"));
    }

    #[test]
    fn encoded_dots_are_dot_segments() {
        assert_eq!(n("/chat/x/%2e%2e/admin").as_deref(), Ok("/chat/admin"));
        assert_eq!(n("/chat/x/%2E./admin").as_deref(), Ok("/chat/admin"));
        assert_eq!(n("/chat/%2e/room").as_deref(), Ok("/chat/room"));
        assert_eq!(n("/%63hat").as_deref(), Ok("/chat"));
        assert_eq!(n("/a%7eb%2db").as_deref(), Ok("/a~b-b"));
    }

    #[test]
    fn other_encodings_are_kept_with_upper_case_hex() {
        assert_eq!(n("/a%3fb").as_deref(), Ok("/a%3Fb"));
        assert_eq!(n("/a%c3%a9").as_deref(), Ok("/a%C3%A9"));
        assert_eq!(n("/%25").as_deref(), Ok("/%25"));
        // `%252e` is an encoded `%` then `2e`: not a dot.
        assert_eq!(n("/x/%252e%252e/y").as_deref(), Ok("/x/%252e%252e/y"));
    }

    #[test]
    fn unsafe_paths_are_refused() {
        assert_eq!(n("/chat/..%2fadmin"), Err(PathError::EncodedSlash));
        assert_eq!(n("/chat/a%2Fb"), Err(PathError::EncodedSlash));
        assert_eq!(n("/chat/a%5cb"), Err(PathError::Backslash));
        assert_eq!(n("/chat/a\\b"), Err(PathError::Backslash));
        assert_eq!(n("/chat/a%00"), Err(PathError::EncodedNul));
        assert_eq!(n("/chat/%zz"), Err(PathError::BadPercentEncoding));
        assert_eq!(n("/chat/%4"), Err(PathError::BadPercentEncoding));
        assert_eq!(n("/chat/%"), Err(PathError::BadPercentEncoding));
        assert_eq!(n("/.."), Err(PathError::AboveRoot));
        assert_eq!(n("/chat/x/..;/admin"), Err(PathError::DotSegmentWithParams));
        assert_eq!(
            n("/chat/%2e%2e;jsessionid=1/a"),
            Err(PathError::DotSegmentWithParams)
        );
        assert_eq!(n("/chat/.;x/a"), Err(PathError::DotSegmentWithParams));
        assert_eq!(n("/chat/a;b/c").as_deref(), Ok("/chat/a;b/c"));
        assert_eq!(n("/chat/../../etc"), Err(PathError::AboveRoot));
        assert_eq!(n("/chat/%2e%2e/%2e%2e/etc"), Err(PathError::AboveRoot));
        assert_eq!(n("chat"), Err(PathError::NotAbsolute));
        assert_eq!(n(""), Err(PathError::NotAbsolute));
    }

    #[test]
    fn climbs_are_measured() {
        let c = normalise("/chat/x/../admin").unwrap();
        assert_eq!(c.lowest_after_climb, Some(1));
        assert!(c.climbs_above(2), "left chat/admin's subtree on the way");
        assert!(!c.climbs_above(1), "stayed inside chat");
        let c = normalise("/chat/../other").unwrap();
        assert!(c.climbs_above(1));
        let c = normalise("/chat/a/b/../../c").unwrap();
        assert_eq!(c.lowest_after_climb, Some(1));
        assert!(!c.climbs_above(1));
        assert!(!normalise("/chat/a//b/./c").unwrap().climbs_above(5));
        let c = normalise("/chat/x/../admin").unwrap();
        assert!(c.climbs_out_of("chat/admin") && !c.climbs_out_of("chat"));
        assert!(
            c.climbs_out_of("/chat/admin/"),
            "slashes around the suffix do not count"
        );
    }

    #[test]
    fn the_fast_path_agrees_with_the_full_one() {
        // Paths the shortcut takes must come out exactly as they went in.
        for p in ["/", "/chat", "/chat/", "/chat/room.1/x", "/a;b/c", "/é~x"] {
            assert_eq!(n(p).as_deref(), Ok(p), "{p}");
        }
        // One character away from it, the full normalisation runs.
        assert_eq!(n("/chat/.hidden").as_deref(), Ok("/chat/.hidden"));
        assert_eq!(n("/chat/./x").as_deref(), Ok("/chat/x"));
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for p in [
            "/chat/x/../admin",
            "/a%7e/%2e/b//c/",
            "/a%c3%a9/%41",
            "/x/%252e%252e/y",
        ] {
            let once = n(p).unwrap();
            assert_eq!(n(&once).unwrap(), once, "{p}");
        }
    }
}
