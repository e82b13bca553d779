//! The one JSON shape a cached conversation's `messages` field has: an array of objects whose
//! values are strings. [`scan`] finds each string with `memchr` (SIMD) instead of serde_json's
//! byte loop, and leaves strings without escapes in place; a message in exactly the shape [`write`]
//! produces has its keys compared in place rather than scanned for. Anything else (numbers,
//! nesting, bad escapes) returns `None` and the caller parses with serde_json instead. [`write`]
//! produces the same bytes `serde_json::to_string` would, checking 32 bytes at a time for what
//! needs an escape. Both run for every message of every cached read and save.

use std::ops::Range;

/// A string of the input: a range of it when it had no escapes, else the unescaped text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Text {
    /// `&input[range]`, verbatim.
    Span(Range<usize>),
    /// Unescaped.
    Owned(String),
}

struct Scanner<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\n' | b'\r' | b'\t') {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.b.get(self.i) == Some(&c)).then(|| self.i += 1)
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    /// A string starting at the current `"`.
    fn string(&mut self) -> Option<Text> {
        self.eat(b'"')?;
        self.rest_of_string()
    }

    /// A string whose opening `"` was just consumed. Kept small so every caller inlines it; a
    /// string with escapes goes on in [`Scanner::unescape`].
    // Left to itself the compiler calls it, and a 20-message hit scans a fifth more (callgrind).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn rest_of_string(&mut self) -> Option<Text> {
        let start = self.i;
        let end = start + memchr::memchr2(b'"', b'\\', &self.b[start..])?;
        if self.b[end] == b'"' {
            self.i = end + 1;
            return Some(Text::Span(start..end));
        }
        self.unescape(start, end)
    }

    /// The string from `start`, whose first escape is at `end`, unescaped.
    fn unescape(&mut self, start: usize, end: usize) -> Option<Text> {
        let mut out = String::with_capacity(end - start + 16);
        out.push_str(&self.s[start..end]);
        self.i = end;
        loop {
            match self.b[self.i] {
                b'"' => {
                    self.i += 1;
                    return Some(Text::Owned(out));
                }
                b'\\' => {
                    let escape = *self.b.get(self.i + 1)?;
                    self.i += 2;
                    match escape {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => out.push(self.unicode_escape()?),
                        _ => return None,
                    }
                }
                _ => {
                    let run = self.i + memchr::memchr2(b'"', b'\\', &self.b[self.i..])?;
                    out.push_str(&self.s[self.i..run]);
                    self.i = run;
                }
            }
        }
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.s.get(self.i..self.i + 4)?;
        self.i += 4;
        u32::from_str_radix(digits, 16).ok()
    }

    /// After `\u`: one code point, from a surrogate pair when it takes two escapes.
    fn unicode_escape(&mut self) -> Option<char> {
        let first = self.hex4()?;
        if (0xD800..0xDC00).contains(&first) {
            if self.b.get(self.i..self.i + 2)? != b"\\u" {
                return None;
            }
            self.i += 2;
            let second = self.hex4()?;
            if !(0xDC00..0xE000).contains(&second) {
                return None;
            }
            return char::from_u32(0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00));
        }
        char::from_u32(first)
    }

    /// `lit` at the current position, consumed.
    fn literal(&mut self, lit: &[u8]) -> Option<()> {
        self.b[self.i..].starts_with(lit).then(|| self.i += lit.len())
    }

    /// The fast path for one message: exactly `{"role":"..","content":"..","time":".."}`, which is
    /// what this library writes. Each key is compared in place instead of being scanned for as a
    /// string of its own, which was most of a read's scanning. Any other shape (spaces, another key
    /// order, extra keys) leaves the position where it was, for the general path.
    fn compact_message(&mut self) -> Option<(Text, Text, Text)> {
        let start = self.i;
        let message = (|| {
            self.literal(br#"{"role":""#)?;
            let role = self.rest_of_string()?;
            self.literal(br#","content":""#)?;
            let content = self.rest_of_string()?;
            self.literal(br#","time":""#)?;
            let time = self.rest_of_string()?;
            self.literal(b"}")?;
            Some((role, content, time))
        })();
        if message.is_none() {
            self.i = start;
        }
        message
    }

    /// The general path for one message: an object of string values, in any order and spacing,
    /// holding at least the three keys (the last of a repeated key wins, as in serde_json).
    fn message(&mut self) -> Option<(Text, Text, Text)> {
        self.eat(b'{')?;
        let (mut role, mut content, mut time) = (None, None, None);
        if self.peek()? != b'}' {
            loop {
                let key = self.string()?;
                self.eat(b':')?;
                let value = self.string()?;
                match self.text(&key) {
                    "role" => role = Some(value),
                    "content" => content = Some(value),
                    "time" => time = Some(value),
                    _ => {}
                }
                if self.peek()? == b',' {
                    self.i += 1;
                } else {
                    break;
                }
            }
        }
        self.eat(b'}')?;
        Some((role?, content?, time?))
    }

    fn text<'t>(&'t self, text: &'t Text) -> &'t str {
        match text {
            Text::Span(range) => &self.s[range.clone()],
            Text::Owned(owned) => owned,
        }
    }
}

/// The messages as (role, content, time) texts, or `None` when the input is not an array of
/// objects with string values holding those three keys (the caller then uses serde_json).
#[must_use]
pub fn scan(json: &str) -> Option<Vec<(Text, Text, Text)>> {
    let mut sc = Scanner { s: json, b: json.as_bytes(), i: 0 };
    sc.eat(b'[')?;
    let mut out = Vec::new();
    if sc.peek()? == b']' {
        sc.i += 1;
    } else {
        loop {
            sc.ws();
            let message = match sc.compact_message() {
                Some(message) => message,
                None => sc.message()?,
            };
            out.push(message);
            match sc.peek()? {
                b',' => sc.i += 1,
                b']' => {
                    sc.i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    sc.ws();
    (sc.i == sc.b.len()).then_some(out)
}

/// `[{"role":"...","content":"...","time":"..."},...]`, byte for byte what serde_json writes.
#[must_use]
pub fn write(messages: &[crate::model::Message]) -> String {
    let size: usize = messages.iter().map(|m| m.content.len() + 80).sum();
    let mut out = String::with_capacity(size + 2);
    out.push('[');
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(r#"{"role":""#);
        out.push_str(m.role.as_str());
        out.push_str(r#"","content":""#);
        escape_into(&mut out, &m.content);
        out.push_str(r#"","time":""#);
        m.time.push_to(&mut out);
        out.push_str(r#""}"#);
    }
    out.push(']');
    out
}

/// Bytes checked at once for something to escape: a fixed-size, branch-free check that the compiler
/// turns into a few vector compares (the transcript is most of what a save writes).
const CHUNK: usize = 32;

/// Whether any byte is `"`, `\` or a control character below 0x20.
fn needs_escape(chunk: &[u8; CHUNK]) -> bool {
    let found =
        chunk.iter().fold(0u8, |found, &b| found | u8::from(b < 0x20) | u8::from(b == b'"') | u8::from(b == b'\\'));
    found != 0
}

fn escape_into(out: &mut String, text: &str) {
    let bytes = text.as_bytes();
    let mut start = 0; // first byte not yet copied
    let mut i = 0;
    while i < bytes.len() {
        // A clean chunk is skipped whole; one with something to escape (or the tail) byte by byte.
        let end = match bytes.get(i..i + CHUNK) {
            Some(chunk) if !needs_escape(chunk.try_into().expect("CHUNK bytes")) => {
                i += CHUNK;
                continue;
            }
            Some(_) => i + CHUNK,
            None => bytes.len(),
        };
        for (at, &b) in bytes.iter().enumerate().take(end).skip(i) {
            let escape: Option<&str> = match b {
                b'"' => Some("\\\""),
                b'\\' => Some("\\\\"),
                b'\n' => Some("\\n"),
                b'\r' => Some("\\r"),
                b'\t' => Some("\\t"),
                0x08 => Some("\\b"),
                0x0c => Some("\\f"),
                0..=0x1f => None,
                _ => continue,
            };
            out.push_str(&text[start..at]);
            if let Some(e) = escape {
                out.push_str(e);
            } else {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
            start = at + 1;
        }
        i = end;
    }
    out.push_str(&text[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(json: &str) -> Vec<[String; 3]> {
        let resolve = |t: &Text| match t {
            Text::Span(r) => json[r.clone()].to_owned(),
            Text::Owned(s) => s.clone(),
        };
        scan(json).unwrap().iter().map(|(a, b, c)| [resolve(a), resolve(b), resolve(c)]).collect()
    }

    #[test]
    fn agrees_with_serde_json_on_what_both_write() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct M {
            role: String,
            content: String,
            time: String,
        }
        let contents =
            ["plain", "line\nbreak \"quoted\" back\\slash\ttab", "émoji 🎉 and \u{1} control", "</script> /", ""];
        let messages: Vec<M> =
            contents.iter().map(|c| M { role: "user".into(), content: (*c).into(), time: "t".into() }).collect();
        // serde_json's compact form (ours) and Python's json.dumps form (the seed's), which
        // escapes non-ASCII as \\uXXXX, surrogate pairs included.
        let compact = serde_json::to_string(&messages).unwrap();
        let python_style = compact
            .replace("\",\"", "\", \"")
            .replace("\":\"", "\": \"")
            .replace('🎉', "\\ud83c\\udf89")
            .replace('é', "\\u00e9");
        for json in [compact, python_style] {
            let got = texts(&json);
            let want: Vec<M> = serde_json::from_str(&json).unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g, &[w.role.clone(), w.content.clone(), w.time.clone()], "{json}");
            }
        }
    }

    #[test]
    fn write_matches_serde_json_byte_for_byte() {
        use crate::model::{Message, Role, Timestamp};
        let t = Timestamp::parse("2025-11-26T00:35:21.123456+00:00").unwrap();
        let mut contents: Vec<String> = [
            "",
            "plain words",
            "exactly8",
            "quote\" and \\ back",
            "tab\tnew\nline\r",
            "ctl \u{1}\u{8}\u{c}\u{1f}\u{7f}",
            "Grüße 🎉 日本語 with \"quotes\" late in a long string",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        for n in 0..80 {
            // every position of an escape relative to the chunks, and several escapes in one
            contents.push(format!("{}\"{}", "a".repeat(n), "é".repeat(n % 5)));
            contents.push(format!("{}\n\\{}\t\"", "b".repeat(n), "ü".repeat(n % 7)));
        }
        let messages: Vec<Message> = contents
            .into_iter()
            .enumerate()
            .map(|(i, content)| Message {
                role: if i % 2 == 0 { Role::User } else { Role::Assistant },
                content,
                time: t,
            })
            .collect();
        assert_eq!(write(&messages), serde_json::to_string(&messages).unwrap());
        assert_eq!(write(&[]), "[]");
    }

    #[test]
    fn key_order_and_extra_keys_do_not_matter() {
        assert_eq!(
            texts(r#"[{"time": "t", "x": "y", "content": "c", "role": "assistant"}]"#),
            vec![["assistant", "c", "t"].map(String::from)]
        );
        assert_eq!(texts(" [ ] "), Vec::<[String; 3]>::new());
    }

    #[test]
    fn the_compact_fast_path_falls_back_message_by_message() {
        // Each message in the shape this library writes, or one step away from it.
        let json = concat!(
            r#"[{"role":"user","content":"plain","time":"t1"},"#,
            r#"{"role":"assistant","content":"esc \"q\" \n done","time":"t2"},"#,
            r#"{"role":"user","content":"c","time":"t\u00e93"},"#,
            r#"{"role":"user","content":"c","time":"t4","extra":"x"},"#,
            r#"{"role":"user","content":"first","time":"t5","content":"second"},"#,
            r#"{"content":"c","role":"assistant","time":"t6"},"#,
            r#"{"role":"user", "content":"c","time":"t7"},"#,
            r#"{"role":"user","content":"last","time":"t8"}]"#,
        );
        let want: Vec<[String; 3]> = match serde_json::from_str::<serde_json::Value>(json).unwrap() {
            serde_json::Value::Array(items) => {
                items.iter().map(|m| ["role", "content", "time"].map(|k| m[k].as_str().unwrap().to_owned())).collect()
            }
            other => panic!("{other}"),
        };
        assert_eq!(want[4][1], "second", "serde_json keeps the last of a repeated key");
        assert_eq!(texts(json), want);
        for broken in [
            r#"[{"role":"user","content":"c","time":"t"]"#,
            r#"[{"role":"user","content":"\x","time":"t"}]"#,
            r#"[{"role":"user","content":"c","time":"t"}"#,
            r#"[{"role":"user","content":"c","time":"t"},]"#,
        ] {
            assert!(scan(broken).is_none(), "{broken}");
        }
    }

    #[test]
    fn other_shapes_are_left_to_serde_json() {
        for json in [
            r#"[{"role": 1, "content": "c", "time": "t"}]"#,
            r#"[{"role": "user"}]"#,
            r#"{"a": "b"}"#,
            r#"[{"role": "u", "content": "\x", "time": "t"}]"#,
            "[",
            r#"[{"role": "u", "content": "c", "time": "t"}] x"#,
        ] {
            assert!(scan(json).is_none(), "{json}");
        }
    }
}
