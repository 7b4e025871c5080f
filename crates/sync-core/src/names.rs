//! Lossless text for file names: every Unix byte string as a `String`, and back.
//!
//! Entry names and location paths are `String`s on the wire and in the
//! library, but a Unix name is any byte string. `to_string_lossy` made
//! `x\xff` and `x\xfe` one name, so a folder holding both could never be
//! indexed twice alike. [`encode_bytes`] instead maps:
//!
//! - each byte that is not part of valid UTF-8 (always 0x80..=0xFF) to the
//!   private-use character U+EF00 + byte, i.e. U+EF80..=U+EFFF;
//! - each valid character in that same range U+EF80..=U+EFFF to the three
//!   characters that stand for its three UTF-8 bytes (so the range escapes
//!   itself and needs no escape character of its own);
//! - every other character to itself.
//!
//! [`decode_bytes`] turns every character of the range back into its byte
//! and every other character into its UTF-8 bytes, so
//! `decode(encode(x)) == x` for every byte string, which makes `encode`
//! injective. Valid UTF-8 is unchanged unless it holds a character of the
//! range (private use, as in MirBSD's OPTU-8, which uses the same range).
//!
//! Why not U+FFFD followed by two hex digits: that is 5 bytes for each
//! undecodable byte, and a 255-byte name of them (a long KOI8-R or Latin-1
//! name) would become 1,275 bytes, more than a snapshot may hold
//! (`MAX_NAME_BYTES`, 1,024 bytes, set for 255 UTF-16 units). Here every
//! input byte becomes at most 3 bytes: a 255-byte name at most 765.
//!
//! ```
//! use sync_core::names::{decode_bytes, encode_bytes};
//!
//! assert_eq!(encode_bytes("café".as_bytes()), "café");
//! let latin1 = b"caf\xe9";
//! assert_eq!(encode_bytes(latin1), "caf\u{efe9}");
//! assert_eq!(decode_bytes(&encode_bytes(latin1)), latin1);
//! ```

/// The character for byte `b` is `ESCAPE_BASE + b`; bytes 0x80..=0xFF
/// (the only ones that can be undecodable) give U+EF80..=U+EFFF.
const ESCAPE_BASE: u32 = 0xEF00;

/// The characters that stand for bytes: U+EF80..=U+EFFF.
const ESCAPES: std::ops::RangeInclusive<char> = '\u{EF80}'..='\u{EFFF}';

/// The character that stands for byte `b` (0x80..=0xFF).
fn escape(b: u8) -> char {
    debug_assert!(b >= 0x80, "ASCII is always valid UTF-8");
    char::from_u32(ESCAPE_BASE + u32::from(b)).unwrap_or(char::REPLACEMENT_CHARACTER)
}

fn push_escaped(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        if b.is_ascii() {
            // Never undecodable on its own; kept as itself all the same.
            out.push(char::from(b));
        } else {
            out.push(escape(b));
        }
    }
}

/// Text for the byte string `bytes`: lossless and injective (see the
/// module doc); at most 3 bytes of UTF-8 for each input byte.
pub fn encode_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if ESCAPES.contains(&c) {
                push_escaped(&mut out, c.encode_utf8(&mut [0; 4]).as_bytes());
            } else {
                out.push(c);
            }
        }
        push_escaped(&mut out, chunk.invalid());
    }
    out
}

/// The byte string `text` stands for: the inverse of [`encode_bytes`].
/// Total: any text decodes (text `encode_bytes` never makes, such as an
/// escape for bytes that form valid UTF-8, decodes to those bytes).
pub fn decode_bytes(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        if ESCAPES.contains(&c) {
            // In range, so the difference is 0x80..=0xFF.
            out.push((u32::from(c) - ESCAPE_BASE) as u8);
        } else {
            out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
        }
    }
    out
}

/// Text for a file name or path (see [`encode_bytes`]).
#[cfg(unix)]
pub fn encode_os(name: &std::ffi::OsStr) -> String {
    use std::os::unix::ffi::OsStrExt as _;
    encode_bytes(name.as_bytes())
}

/// The file name or path `text` stands for (see [`decode_bytes`]).
#[cfg(unix)]
pub fn decode_os(text: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt as _;
    std::ffi::OsString::from_vec(decode_bytes(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Byte strings built from pieces that meet at the edges of the
    /// scheme: undecodable bytes, truncated sequences, the escape range
    /// itself, its neighbours and U+FFFD.
    fn tricky_bytes() -> impl Strategy<Value = Vec<u8>> {
        let pieces: Vec<&'static [u8]> = vec![
            b"a",
            b"\xff",
            b"\xfe",
            b"\x80",
            b"\xc3",
            b"\xc3\xa9",
            b"\xe2\x82",
            b"\xee\xbe\x80",
            b"\xee\xbf\xbf",
            b"\xee\xbe\x7f",
            "\u{ef7f}".as_bytes(),
            "\u{f000}".as_bytes(),
            "\u{fffd}".as_bytes(),
            b"\xf0\x9f\x98",
            "\u{1f600}".as_bytes(),
        ];
        proptest::collection::vec(proptest::sample::select(pieces), 0..12)
            .prop_map(|ps| ps.concat())
    }

    proptest! {
        #[test]
        fn any_bytes_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(decode_bytes(&encode_bytes(&bytes)), bytes);
        }

        #[test]
        fn tricky_bytes_round_trip_within_three_bytes_each(bytes in tricky_bytes()) {
            let text = encode_bytes(&bytes);
            prop_assert!(text.len() <= 3 * bytes.len());
            prop_assert_eq!(decode_bytes(&text), bytes);
        }

        #[test]
        fn encoding_is_injective(a in tricky_bytes(), b in tricky_bytes()) {
            prop_assume!(a != b);
            prop_assert_ne!(encode_bytes(&a), encode_bytes(&b));
        }

        #[test]
        fn valid_utf8_outside_the_range_is_unchanged(s in any::<String>()) {
            prop_assume!(!s.chars().any(|c| ESCAPES.contains(&c)));
            prop_assert_eq!(encode_bytes(s.as_bytes()), s);
        }
    }

    /// The collision of issue 13: both became `x\u{FFFD}` before.
    #[test]
    fn names_differing_in_undecodable_bytes_stay_apart() {
        assert_eq!(encode_bytes(b"x\xff"), "x\u{efff}");
        assert_eq!(encode_bytes(b"x\xfe"), "x\u{effe}");
    }

    #[test]
    fn a_valid_character_of_the_range_escapes_itself() {
        let text = encode_bytes("a\u{ef80}".as_bytes());
        assert_eq!(text, "a\u{efee}\u{efbe}\u{ef80}");
        assert_eq!(decode_bytes(&text), "a\u{ef80}".as_bytes());
        // U+FFFD is an ordinary character here.
        assert_eq!(encode_bytes("\u{fffd}".as_bytes()), "\u{fffd}");
    }

    #[test]
    fn the_longest_name_fits_a_snapshot() {
        let text = encode_bytes(&[0xff; 255]);
        assert_eq!(text.len(), 765);
        let text = encode_bytes("\u{efff}".repeat(85).as_bytes());
        assert_eq!(text.len(), 765);
    }

    #[cfg(unix)]
    #[test]
    fn os_strings_round_trip() {
        use std::os::unix::ffi::OsStrExt as _;
        let name = std::ffi::OsStr::from_bytes(b"r\xe9sum\xe9.txt");
        assert_eq!(decode_os(&encode_os(name)), name);
    }
}
