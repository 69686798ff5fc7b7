//! Text from outside (names in an object, messages that quote them) shown
//! to people: control characters are escaped, so a crafted name cannot
//! move the cursor, retitle the terminal or forge log lines.

use std::borrow::Cow;

/// `s` with every control character (C0, DEL, C1) written as `\xNN` or
/// `\u{NNNN}`; borrowed when there is none.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if (c as u32) < 0x80 && c.is_control() => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control() => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A log writer's bytes: control characters escaped, but for the newline
/// that ends the line.
pub fn escape_log_line(buf: &[u8]) -> Vec<u8> {
    let (body, newline) = match buf.strip_suffix(b"\n") {
        Some(b) => (b, true),
        None => (buf, false),
    };
    let text = String::from_utf8_lossy(body);
    let mut out = escape_controls(&text).into_owned().into_bytes();
    if newline {
        out.push(b'\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_the_rest_kept() {
        assert_eq!(escape_controls("plain/é.txt"), "plain/é.txt");
        assert_eq!(
            escape_controls("\x1b]0;PWNED\x07\x1b[2J"),
            "\\x1b]0;PWNED\\x07\\x1b[2J"
        );
        assert_eq!(escape_controls("a\nb\u{9b}c"), "a\\x0ab\\u{009b}c");
        assert_eq!(escape_log_line(b"name \x1b[2J\n"), b"name \\x1b[2J\n");
        assert_eq!(escape_log_line(b"two\nlines\n"), b"two\\x0alines\n");
    }
}
