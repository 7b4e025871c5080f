//! Strings a peer controls (`Error.message`, `Hello.name`, ...), made safe
//! to log or to put into events: bounded in length, cut on a character
//! boundary, with control characters escaped so that a peer cannot forge
//! log lines, move a terminal's cursor or fill a disk with one frame.

use std::borrow::Cow;
use std::fmt::Write as _;

/// The most characters of a peer's string that [`for_log`] keeps (escapes
/// count as the characters they print as).
pub const MAX_LOG_CHARS: usize = 256;

/// `s` as it may be logged: at most [`MAX_LOG_CHARS`] characters, cut on a
/// character boundary, control characters (newlines, escape sequences,
/// NUL, ...) escaped as `\n` or `\u{1b}`; a cut string ends with
/// `… (N bytes)` giving the original length. Borrows `s` when it is short
/// and clean.
///
/// ```
/// use sync_core::untrusted::for_log;
/// assert_eq!(for_log("disk full"), "disk full");
/// assert_eq!(for_log("a\nb"), "a\\nb");
/// let long = "x".repeat(10_000);
/// assert!(for_log(&long).ends_with("… (10000 bytes)"));
/// ```
pub fn for_log(s: &str) -> Cow<'_, str> {
    let clean = s.chars().take(MAX_LOG_CHARS + 1).all(|c| !c.is_control());
    if clean && s.chars().nth(MAX_LOG_CHARS).is_none() {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(MAX_LOG_CHARS + 32);
    let mut printed = 0usize;
    let mut cut = false;
    for c in s.chars() {
        let before = out.len();
        if c.is_control() {
            match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                _ => {
                    let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
                }
            }
        } else {
            out.push(c);
        }
        // Escapes are ASCII, so their bytes are the characters they print as.
        let width = if c.is_control() { out.len() - before } else { 1 };
        if printed + width > MAX_LOG_CHARS {
            out.truncate(before);
            cut = true;
            break;
        }
        printed += width;
    }
    if cut {
        let _ = write!(out, "… ({} bytes)", s.len());
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_log_borrows_short_clean_strings() {
        assert!(matches!(for_log("disk full"), Cow::Borrowed("disk full")));
        let exact = "é".repeat(MAX_LOG_CHARS);
        assert!(matches!(for_log(&exact), Cow::Borrowed(_)));
        assert!(matches!(for_log(""), Cow::Borrowed("")));
    }

    #[test]
    fn for_log_truncates_on_a_char_boundary() {
        // Multi-byte characters: a byte-based cut would split one and panic.
        let long = "ü€😀".repeat(1000);
        let out = for_log(&long);
        let kept: String = out.chars().take_while(|c| *c != '…').collect();
        assert_eq!(kept.chars().count(), MAX_LOG_CHARS);
        assert!(long.starts_with(&kept));
        assert!(out.ends_with(&format!("… ({} bytes)", long.len())), "{out}");
        // One character over the limit is cut too.
        let over = "a".repeat(MAX_LOG_CHARS + 1);
        assert_eq!(
            for_log(&over),
            format!("{}… ({} bytes)", "a".repeat(MAX_LOG_CHARS), MAX_LOG_CHARS + 1)
        );
    }

    #[test]
    fn for_log_escapes_control_characters() {
        assert_eq!(
            for_log("ok\nFAKE LOG LINE\r\t\u{1b}[2J\0end"),
            "ok\\nFAKE LOG LINE\\r\\t\\u{1b}[2J\\u{0}end"
        );
        assert_eq!(for_log("\u{7f}\u{85}"), "\\u{7f}\\u{85}");
        // Escapes count against the limit: the output stays bounded.
        let bell = "\u{7}".repeat(100_000);
        let out = for_log(&bell);
        assert!(out.len() <= MAX_LOG_CHARS + 32, "{}", out.len());
        assert!(!out.chars().any(char::is_control));
        assert!(out.starts_with("\\u{7}\\u{7}"));
    }

    #[test]
    fn for_log_bounds_a_megabyte() {
        let mib = "y".repeat(1 << 20);
        let out = for_log(&mib);
        assert!(out.len() < 300, "{}", out.len());
        assert!(out.ends_with("… (1048576 bytes)"));
    }
}
