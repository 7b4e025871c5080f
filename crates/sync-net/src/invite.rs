//! `Invite`: the one string that pairs two devices. It carries everything
//! the other side must pin — library id, device id, certificate
//! fingerprint — and optionally an address to dial, in a versioned,
//! checksummed text form: `lsync-` then base32 (RFC 4648, lowercase, no
//! padding) of
//!
//! ```text
//! version (1) | kind (1: 0 invite, 1 reply) | library (16) | device (16)
//!   | fingerprint (32) | address length (1) | address (UTF-8)
//!   | checksum (4: SHA-256 of "lsync pairing" and the bytes before it)
//! ```
//!
//! A typo or a cut copy fails the checksum and is refused with a clear
//! error (odds of a random change passing: 1 in 2^32); so does a version
//! this build does not read. The checksum is not a signature: the string
//! must travel over a channel the user trusts (read it out, paste it into a
//! chat with yourself); what it pins is then authenticated by TLS.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use sync_core::{DeviceId, LibraryId};

use crate::fingerprint::CertFingerprint;

/// The text every pairing string starts with.
pub const INVITE_PREFIX: &str = "lsync-";
/// The pairing string version this build writes and reads.
pub const INVITE_VERSION: u8 = 1;
/// The longest address an invite carries, in bytes.
pub const MAX_ADDRESS: usize = 255;

const CHECKSUM_LEN: usize = 4;
const FIXED_LEN: usize = 1 + 1 + 16 + 16 + 32 + 1;
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// What one device hands another to pair: who it is and which library it
/// belongs to. `lsync invite` prints one; `lsync join` reads it, pins the
/// device, and prints the reply (an `Invite` with `reply` set) that pins
/// the joiner back on the first device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invite {
    /// `false`: an invitation (its reader should answer with a reply);
    /// `true`: the answer to one (pairing is complete once it is read).
    pub reply: bool,
    /// The library both devices share.
    pub library: LibraryId,
    /// The device that wrote the string.
    pub device: DeviceId,
    /// That device's certificate fingerprint.
    pub fingerprint: CertFingerprint,
    /// Where that device can be dialed (`host:port`, at most
    /// [`MAX_ADDRESS`] bytes), if it said. One that [`check_address`]
    /// refuses is left out of the string.
    pub address: Option<String>,
}

/// Why a string is not a usable pairing string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseInviteError {
    /// It does not start with `lsync-`.
    #[error(
        "not an lsync pairing string (those start with `{INVITE_PREFIX}`): copy the whole string `lsync invite` printed"
    )]
    NotAnInvite,
    /// A character outside the string's alphabet.
    #[error(
        "the pairing string holds {0:?}, which no pairing string contains: it was mistyped; copy it again"
    )]
    BadCharacter(char),
    /// Too short or too long to be one.
    #[error("the pairing string is too short or too long: it was cut or mistyped; copy it again")]
    Length,
    /// The checksum does not match: a typo, or a cut copy.
    #[error("the pairing string's checksum does not match: it was mistyped or cut; copy it again")]
    Checksum,
    /// A version this build does not read.
    #[error(
        "pairing string version {0}: this lsync reads version {INVITE_VERSION}; use the same lsync version on both devices"
    )]
    Version(u8),
    /// A field holds an impossible value.
    #[error("the pairing string is malformed: {0}")]
    Malformed(&'static str),
    /// The address is not `host:port` (see [`check_address`]).
    #[error(
        "bad address {address:?}: {reason}; expected HOST:PORT, HOST a DNS name, an IPv4 \
         address or a bracketed IPv6 address ([::1]), PORT a number from 1 to 65535"
    )]
    Address {
        /// The address refused (shown escaped: it may hold anything).
        address: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Checks that `addr` is exactly `host:port`, and fits an invite: `host`
/// a DNS name (dot-separated labels of `[A-Za-z0-9-]`, none empty, none
/// starting with `-`, at most 253 characters in all), an IPv4 literal, or
/// a bracketed IPv6 literal (`[::1]`); `port` a decimal number in
/// 1..=65535. Everything else is refused: an address is printed inside
/// commands the user pastes into a shell, so it never holds a character a
/// shell or a terminal would act on.
pub fn check_address(addr: &str) -> Result<(), ParseInviteError> {
    address_problem(addr).map_or(Ok(()), |reason| {
        Err(ParseInviteError::Address {
            address: addr.to_string(),
            reason,
        })
    })
}

/// Why `addr` is not a usable address, if it is not.
fn address_problem(addr: &str) -> Option<&'static str> {
    if addr.is_empty() {
        return Some("it is empty");
    }
    if addr.len() > MAX_ADDRESS {
        return Some("it is too long");
    }
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let Some((inner, port)) = rest.split_once("]:") else {
            return Some("an IPv6 address is written [ADDRESS]:PORT");
        };
        if inner.parse::<std::net::Ipv6Addr>().is_err() {
            return Some("the part in brackets is not an IPv6 address");
        }
        (None, port)
    } else {
        let Some((host, port)) = addr.split_once(':') else {
            return Some("it has no port");
        };
        (Some(host), port)
    };
    if let Some(problem) = host.and_then(host_problem) {
        return Some(problem);
    }
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Some("the port is not a decimal number");
    }
    match port.parse::<u32>() {
        Ok(1..=65535) => None,
        _ => Some("the port is not in 1..=65535"),
    }
}

/// Why `host` (no brackets, no port) is neither an IPv4 literal nor a DNS
/// name, if it is not.
fn host_problem(host: &str) -> Option<&'static str> {
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return None;
    }
    if host.is_empty() {
        return Some("it has no host");
    }
    if host.len() > 253 {
        return Some("the host name is longer than 253 characters");
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    {
        return Some(
            "the host holds a character other than letters, digits, `.` and `-` \
             (an IPv6 address is written in brackets: [ADDRESS]:PORT)",
        );
    }
    for label in host.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Some("a host name label is empty or longer than 63 characters");
        }
        if label.starts_with('-') {
            return Some("a host name label starts with `-`");
        }
    }
    None
}

fn checksum(bytes: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut h = Sha256::new();
    h.update(b"lsync pairing");
    h.update(bytes);
    let digest = h.finalize();
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&digest[..CHECKSUM_LEN]);
    out
}

impl Invite {
    fn to_bytes(&self) -> Vec<u8> {
        let addr = match self.address.as_deref() {
            Some(a) if check_address(a).is_ok() => a.as_bytes(),
            _ => &[],
        };
        let mut out = Vec::with_capacity(FIXED_LEN + addr.len() + CHECKSUM_LEN);
        out.push(INVITE_VERSION);
        out.push(u8::from(self.reply));
        out.extend_from_slice(&self.library.to_bytes());
        out.extend_from_slice(&self.device.to_bytes());
        out.extend_from_slice(&self.fingerprint.0);
        out.push(addr.len() as u8);
        out.extend_from_slice(addr);
        let sum = checksum(&out);
        out.extend_from_slice(&sum);
        out
    }
}

impl fmt::Display for Invite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(INVITE_PREFIX)?;
        f.write_str(&base32_encode(&self.to_bytes()))
    }
}

impl FromStr for Invite {
    type Err = ParseInviteError;

    /// Parses a pairing string; whitespace inside it (a line break from a
    /// copy) is ignored, and so is the case of its letters.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let body = s
            .get(..INVITE_PREFIX.len())
            .filter(|p| p.eq_ignore_ascii_case(INVITE_PREFIX))
            .map(|_| &s[INVITE_PREFIX.len()..])
            .ok_or(ParseInviteError::NotAnInvite)?;
        let bytes = base32_decode(body)?;
        if bytes.len() < FIXED_LEN + CHECKSUM_LEN || bytes.len() > 1024 {
            return Err(ParseInviteError::Length);
        }
        let (data, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if checksum(data) != sum {
            return Err(ParseInviteError::Checksum);
        }
        if data[0] != INVITE_VERSION {
            return Err(ParseInviteError::Version(data[0]));
        }
        let reply = match data[1] {
            0 => false,
            1 => true,
            _ => return Err(ParseInviteError::Malformed("unknown kind")),
        };
        let take16 = |at: usize| {
            let mut b = [0u8; 16];
            b.copy_from_slice(&data[at..at + 16]);
            b
        };
        let library = LibraryId::from_bytes(take16(2));
        let device = DeviceId::from_bytes(take16(18));
        let mut fp = [0u8; 32];
        fp.copy_from_slice(&data[34..66]);
        let addr_len = usize::from(data[66]);
        if data.len() != FIXED_LEN + addr_len {
            return Err(ParseInviteError::Length);
        }
        let address = if addr_len == 0 {
            None
        } else {
            let a = std::str::from_utf8(&data[FIXED_LEN..])
                .map_err(|_| ParseInviteError::Malformed("address is not UTF-8"))?;
            check_address(a)?;
            Some(a.to_string())
        };
        if device == DeviceId::default() || library == LibraryId::default() {
            return Err(ParseInviteError::Malformed("nil id"));
        }
        Ok(Invite {
            reply,
            library,
            device,
            fingerprint: CertFingerprint(fp),
            address,
        })
    }
}

fn base32_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for &b in data {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn base32_decode(text: &str) -> Result<Vec<u8>, ParseInviteError> {
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for c in text.chars().filter(|c| !c.is_whitespace()) {
        let v = match c.to_ascii_lowercase() {
            l @ 'a'..='z' => l as u32 - 'a' as u32,
            d @ '2'..='7' => d as u32 - '2' as u32 + 26,
            _ => return Err(ParseInviteError::BadCharacter(c)),
        };
        acc = (acc << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
        if out.len() > 4096 {
            return Err(ParseInviteError::Length);
        }
    }
    // The last character's unused bits are zero in a string we wrote.
    if bits >= 5 || acc != 0 {
        return Err(ParseInviteError::Checksum);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(address: Option<&str>) -> Invite {
        Invite {
            reply: false,
            library: LibraryId::new_v7(),
            device: DeviceId::new_v7(),
            fingerprint: CertFingerprint::of_der(b"cert"),
            address: address.map(str::to_string),
        }
    }

    #[test]
    fn base32_matches_rfc4648_vectors() {
        for (plain, coded) in [
            ("", ""),
            ("f", "my"),
            ("fo", "mzxq"),
            ("foo", "mzxw6"),
            ("foob", "mzxw6yq"),
            ("fooba", "mzxw6ytb"),
            ("foobar", "mzxw6ytboi"),
        ] {
            assert_eq!(base32_encode(plain.as_bytes()), coded);
            assert_eq!(base32_decode(coded).unwrap(), plain.as_bytes());
        }
    }

    #[test]
    fn invite_round_trips_with_and_without_an_address() {
        for addr in [
            None,
            Some("192.168.1.20:7700"),
            Some("[::1]:7700"),
            Some("laptop.local:1"),
        ] {
            let inv = sample(addr);
            let text = inv.to_string();
            assert!(text.starts_with(INVITE_PREFIX), "{text}");
            assert!(text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
            assert_eq!(text.parse::<Invite>().unwrap(), inv);
            // Case and line breaks from a copy do not matter.
            let messy = format!("  {}\n{} ", &text[..40].to_uppercase(), &text[40..]);
            assert_eq!(messy.parse::<Invite>().unwrap(), inv);
        }
        // An address that is not HOST:PORT is left out, never cut.
        let mut long = sample(Some("x:1"));
        long.address = Some(format!("{}:1", "h".repeat(MAX_ADDRESS)));
        let back: Invite = long.to_string().parse().unwrap();
        assert_eq!(back.address, None);
        assert_eq!(back.device, long.device);
        let mut reply = sample(None);
        reply.reply = true;
        assert_eq!(reply.to_string().parse::<Invite>().unwrap(), reply);
        assert_ne!(
            reply.to_string(),
            Invite {
                reply: false,
                ..reply.clone()
            }
            .to_string()
        );
    }

    #[test]
    fn a_typo_in_an_invite_is_refused() {
        let text = sample(Some("10.0.0.2:7700")).to_string();
        let body = INVITE_PREFIX.len();
        // Every single-character substitution anywhere in the body is caught.
        for i in body..text.len() {
            let orig = text.as_bytes()[i];
            for &c in ALPHABET.iter().filter(|c| **c != orig) {
                let mut typo = text.clone().into_bytes();
                typo[i] = c;
                let typo = String::from_utf8(typo).unwrap();
                let e = typo.parse::<Invite>().unwrap_err();
                assert!(
                    matches!(e, ParseInviteError::Checksum | ParseInviteError::Length),
                    "{typo}: {e:?}"
                );
            }
        }
        // A cut copy, a dropped or doubled character.
        for bad in [
            text[..text.len() - 1].to_string(),
            text[..60].to_string(),
            format!("{}{}", &text[..20], &text[21..]),
            format!("{}a{}", &text[..20], &text[20..]),
        ] {
            assert!(bad.parse::<Invite>().is_err(), "{bad}");
        }
        let e = format!("{text}1").parse::<Invite>().unwrap_err();
        assert_eq!(e, ParseInviteError::BadCharacter('1'));
        assert!(e.to_string().contains("mistyped"));
        assert_eq!(
            "abc".parse::<Invite>().unwrap_err(),
            ParseInviteError::NotAnInvite
        );
        assert!(
            ParseInviteError::Checksum.to_string().contains("mistyped"),
            "the message says what happened"
        );
    }

    #[test]
    fn unknown_invite_version_is_refused() {
        let inv = sample(None);
        let mut bytes = inv.to_bytes();
        bytes.truncate(bytes.len() - CHECKSUM_LEN);
        bytes[0] = 2;
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum);
        let text = format!("{INVITE_PREFIX}{}", base32_encode(&bytes));
        let e = text.parse::<Invite>().unwrap_err();
        assert_eq!(e, ParseInviteError::Version(2));
        assert!(e.to_string().contains("version 2"), "{e}");
    }

    #[test]
    fn addresses_are_checked() {
        for ok in ["1.2.3.4:7700", "host:1", "[fe80::1]:65535"] {
            check_address(ok).unwrap();
        }
        for bad in [
            "",
            "host",
            ":7700",
            "host:",
            "host:0",
            "host:99999",
            "a b:1",
            "h/x:1",
        ] {
            assert!(check_address(bad).is_err(), "{bad:?}");
        }
    }

    /// F1: an address is printed inside shell commands (`lsync --data DIR
    /// connect ADDRESS`); one carrying shell metacharacters or invisible
    /// Unicode format characters is refused when making an invite and when
    /// reading one.
    #[test]
    fn f1_address_with_shell_metacharacters_or_format_characters_is_refused() {
        let hostile = [
            "x;touch${IFS}pwned;:1",
            "$(id>pwned)x:1",
            "a`id`|sh&:1",
            "192.168.1.20\u{202e}0077:7700",
            "10.0.0.1\u{200b}:7700",
            "127.0.0.1:7700:1",
            "host:+1",
            "host: 1",
            "-rf:1",
            "a..b:1",
            "[::1]x:1",
            "[::1]",
            "[nope]:1",
            "[::1%eth0]:1",
            "::1:7700",
            "\u{feff}host:1",
            "host\n:1",
            "'a':1",
            "\"a\":1",
            "a\\b:1",
            "a*:1",
            "~:1",
        ];
        for bad in hostile {
            let e = check_address(bad).expect_err(bad);
            let msg = e.to_string();
            assert!(msg.contains("HOST:PORT"), "{msg}");
            // The refusal shows the address escaped: nothing invisible reaches the terminal.
            assert!(
                msg.chars().all(|c| !c.is_control() && c.is_ascii()),
                "{msg:?}"
            );
        }
        // Reading: a pairing string carrying one (with a valid checksum,
        // as a forger would write it) is refused, not printed.
        for bad in hostile {
            if bad.len() > MAX_ADDRESS {
                continue;
            }
            let inv = sample(None);
            let mut bytes = inv.to_bytes();
            bytes.truncate(FIXED_LEN - 1);
            bytes.push(bad.len() as u8);
            bytes.extend_from_slice(bad.as_bytes());
            let sum = checksum(&bytes);
            bytes.extend_from_slice(&sum);
            let text = format!("{INVITE_PREFIX}{}", base32_encode(&bytes));
            let e = text.parse::<Invite>().expect_err(bad);
            assert!(
                matches!(&e, ParseInviteError::Address { address, .. } if address == bad),
                "{bad:?}: {e:?}"
            );
        }
        // Writing: one is never put into a string.
        for bad in hostile {
            let back: Invite = sample(Some(bad)).to_string().parse().unwrap();
            assert_eq!(back.address, None, "{bad:?}");
        }
        // Normal addresses round-trip.
        for ok in [
            "192.168.1.20:7700",
            "laptop.local:7700",
            "[::1]:7700",
            "[fe80::1:2]:65535",
            "a-b.example.com:1",
            "localhost:7700",
        ] {
            check_address(ok).expect(ok);
            let inv = sample(Some(ok));
            let back: Invite = inv.to_string().parse().unwrap();
            assert_eq!(back.address.as_deref(), Some(ok));
        }
        let long_label = format!("{}:1", "a".repeat(64));
        assert!(check_address(&long_label).is_err());
        let long_name = format!("{}:1", vec!["a".repeat(63); 4].join("."));
        assert!(check_address(&long_name).is_err(), "255 characters > 253");
    }
}
