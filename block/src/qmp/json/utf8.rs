//! QEMU's "modified UTF-8" decoding (`util/unicode.c`: `mod_utf8_codepoint`).
//!
//! QEMU's JSON layer works on NUL-terminated C strings, so it encodes U+0000
//! as the overlong pair `C0 80` (modified UTF-8) and accepts that pair on
//! input. It also rejects what `is_valid_codepoint()` rejects: code points
//! beyond U+10FFFF, surrogates and the Unicode noncharacters (U+FDD0..U+FDEF
//! and every U+xxFFFE/U+xxFFFF).

use alloc::string::String;

/// Whether QEMU considers `cp` a valid Unicode character.
pub(crate) fn is_valid_codepoint(cp: u32) -> bool {
    if cp > 0x10FFFF {
        return false; // beyond Unicode range
    }
    if (0xFDD0..=0xFDEF).contains(&cp) || (cp & 0xFFFE) == 0xFFFE {
        return false; // noncharacter
    }
    !(0xD800..=0xDFFF).contains(&cp) // surrogate code point
}

/// Decodes the code point at the start of `s`.
///
/// Returns the code point (or `None` when the sequence is invalid) and the
/// number of bytes QEMU's decoder consumes either way: the lead byte plus
/// every continuation byte it read before giving up. `s` must not be empty.
pub(crate) fn decode(s: &[u8]) -> (Option<char>, usize) {
    const MIN_CP: [u32; 5] = [0x80, 0x800, 0x10000, 0x200000, 0x4000000];
    let Some(&lead) = s.first() else {
        return (None, 0);
    };
    if lead < 0x80 {
        return (Some(char::from(lead)), 1);
    }
    if lead >= 0xFE || lead & 0x40 == 0 {
        // impossible byte, or unexpected continuation byte
        return (None, 1);
    }
    let len = lead.leading_ones() as usize; // 2..=6
    let mut cp = u32::from(lead) & (0x7F >> len);
    for i in 1..len {
        match s.get(i) {
            Some(&b) if b & 0xC0 == 0x80 => cp = (cp << 6) | u32::from(b & 0x3F),
            _ => return (None, i), // continuation byte missing
        }
    }
    let overlong = cp < MIN_CP[len - 2] && !(cp == 0 && len == 2);
    if !is_valid_codepoint(cp) || overlong {
        return (None, len);
    }
    (char::from_u32(cp), len)
}

/// Converts bytes to a string the way QEMU's JSON writer would print them:
/// stop at the first NUL byte (C string), replace every invalid sequence by
/// U+FFFD.
pub(crate) fn lossy(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let mut rest = &bytes[..end];
    let mut out = String::with_capacity(rest.len());
    while !rest.is_empty() {
        let (cp, used) = decode(rest);
        out.push(cp.unwrap_or('\u{FFFD}'));
        rest = rest.get(used.max(1)..).unwrap_or(&[]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_like_qemu() {
        assert_eq!(decode(b"a"), (Some('a'), 1));
        assert_eq!(decode("é".as_bytes()), (Some('é'), 2));
        assert_eq!(decode("😀".as_bytes()), (Some('😀'), 4));
        assert_eq!(decode(b"\xC0\x80"), (Some('\0'), 2)); // modified UTF-8 NUL
        assert_eq!(decode(b"\xC1\x81"), (None, 2)); // overlong
        assert_eq!(decode(b"\xED\xA0\x80"), (None, 3)); // surrogate
        assert_eq!(decode(b"\xEF\xBF\xBE"), (None, 3)); // U+FFFE
        assert_eq!(decode(b"\x80"), (None, 1));
        assert_eq!(decode(b"\xC3"), (None, 1));
        assert_eq!(decode(b"\xE2\x82"), (None, 2));
        assert_eq!(decode(b"\xFF"), (None, 1));
        assert_eq!(decode(b"\xFC\x80\x80\x80\x80\x80"), (None, 6));
    }

    #[test]
    fn lossy_stops_at_nul() {
        assert_eq!(lossy(b"ab\xFFc\0de"), "ab\u{FFFD}c");
        assert_eq!(lossy(b"\xE2\x82x"), "\u{FFFD}x");
    }
}
