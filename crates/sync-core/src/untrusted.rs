//! Strings a peer controls (`Error.message`, `Hello.name`, ...), made safe
//! to log or to put into events: bounded in length, cut on a character
//! boundary, with control characters escaped so that a peer cannot forge
//! log lines, move a terminal's cursor or fill a disk with one frame.

use std::borrow::Cow;
use std::fmt::Write as _;

/// The most characters [`for_log`] returns, its `… (N bytes)` mark
/// included (escapes count as the characters they print as).
pub const MAX_LOG_CHARS: usize = 256;

/// `s` as it may be logged: at most [`MAX_LOG_CHARS`] characters, cut on a
/// character boundary, control characters (newlines, escape sequences,
/// NUL, ...) escaped as `\n` or `\u{1b}`; a cut string ends with
/// `… (N bytes)` giving the original length. Borrows `s` when it is short
/// and clean, so applying it twice changes nothing more.
///
/// ```
/// use sync_core::untrusted::for_log;
/// assert_eq!(for_log("disk full"), "disk full");
/// assert_eq!(for_log("a\nb"), "a\\nb");
/// let long = "x".repeat(10_000);
/// assert!(for_log(&long).ends_with("… (10000 bytes)"));
/// assert!(for_log(&long).chars().count() <= 256);
/// ```
pub fn for_log(s: &str) -> Cow<'_, str> {
    let mut head = s.chars();
    let short_and_clean =
        head.by_ref().take(MAX_LOG_CHARS).all(|c| !c.is_control()) && head.next().is_none();
    if short_and_clean {
        return Cow::Borrowed(s);
    }
    // Escape until past the limit (never more: a 1 MiB string costs 256 steps).
    let mut out = String::with_capacity(MAX_LOG_CHARS + 8);
    // Byte offset in `out` after each character printed, to cut on one.
    let mut ends = Vec::with_capacity(MAX_LOG_CHARS + 8);
    let mut printed = 0usize;
    for c in s.chars() {
        if printed > MAX_LOG_CHARS {
            break;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
        // Escapes are ASCII: one character per byte.
        printed += if c.is_control() {
            out.len() - ends.last().copied().unwrap_or(0)
        } else {
            1
        };
        ends.push(out.len());
    }
    if printed <= MAX_LOG_CHARS {
        return Cow::Owned(out);
    }
    let mark = format!("… ({} bytes)", s.len());
    let budget = MAX_LOG_CHARS - mark.chars().count();
    // Keep whole characters (and whole escapes) within the budget.
    let mut kept = 0usize;
    let mut cut = 0usize;
    let mut prev = 0usize;
    for &end in &ends {
        let width = out[prev..end].chars().count();
        if kept + width > budget {
            break;
        }
        kept += width;
        cut = end;
        prev = end;
    }
    out.truncate(cut);
    out.push_str(&mark);
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
        let mark = format!("… ({} bytes)", long.len());
        assert!(out.ends_with(&mark), "{out}");
        assert_eq!(out.chars().count(), MAX_LOG_CHARS);
        let kept = &out[..out.len() - mark.len()];
        assert!(long.starts_with(kept));
        // One character over the limit is cut too, and the result is stable.
        let over = "a".repeat(MAX_LOG_CHARS + 1);
        let mark = format!("… ({} bytes)", MAX_LOG_CHARS + 1);
        let want = format!("{}{mark}", "a".repeat(MAX_LOG_CHARS - mark.chars().count()));
        assert_eq!(for_log(&over), want);
        assert!(matches!(for_log(&want), Cow::Borrowed(_)), "idempotent");
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
        assert!(out.chars().count() <= MAX_LOG_CHARS, "{}", out.len());
        assert!(!out.chars().any(char::is_control));
        assert!(out.starts_with("\\u{7}\\u{7}"));
        // Escapes are never cut in half.
        let kept = out.split('…').next().unwrap();
        assert!(kept.ends_with("\\u{7}"), "{out}");
        assert!(matches!(for_log(&out), Cow::Borrowed(_)), "idempotent");
        // A short string with control characters is escaped, not cut.
        assert_eq!(for_log("\u{1b}[31mred"), "\\u{1b}[31mred");
    }

    #[test]
    fn for_log_bounds_a_megabyte() {
        let mib = "y".repeat(1 << 20);
        let out = for_log(&mib);
        assert!(out.chars().count() <= MAX_LOG_CHARS, "{}", out.len());
        assert!(out.ends_with("… (1048576 bytes)"));
    }
}
