//! Conversations, messages and timestamps: the data every tier stores.

use std::fmt;

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, SubsecRound, Timelike, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// An instant in UTC with microsecond precision, PostgreSQL's `TIMESTAMPTZ` resolution.
///
/// Displayed in the form Python's `datetime.isoformat()` gives for a UTC-aware datetime
/// (`2025-11-26T00:35:21.123456+00:00`, no fraction when it is zero): the form the app writes, so
/// a conversation saved that way reads back `==` from every tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(DateTime<Utc>);

impl Timestamp {
    /// The current instant, truncated to microseconds.
    #[must_use]
    pub fn now() -> Self {
        Timestamp(Utc::now().trunc_subsecs(6))
    }

    /// Parses the ISO 8601 forms Python's `datetime.fromisoformat` accepts for a date-time: `T` or
    /// space between date and time, optional seconds and fraction, an offset (`Z`, `+HH:MM`,
    /// `+HHMM`, `+HH`) or none (naive, taken as UTC), or a bare date (midnight UTC).
    pub fn parse(text: &str) -> Result<Self> {
        if let Some(ts) = parse_canonical(text.as_bytes()) {
            return Ok(ts);
        }
        parse_iso8601(text.trim())
            .map(|dt| Timestamp(dt.trunc_subsecs(6)))
            .ok_or_else(|| Error::validation(format!("expected an ISO 8601 timestamp, got {text:?}")))
    }

    /// `text` in the canonical form: borrowed when it already is (the common case, checked
    /// without allocating), normalised when it is another ISO 8601 form, `None` when it is none.
    #[must_use]
    pub fn canonical_text(text: &str) -> Option<std::borrow::Cow<'_, str>> {
        if is_canonical(text.as_bytes()) {
            return Some(std::borrow::Cow::Borrowed(text));
        }
        if let Some(ts) = parse_canonical(text.as_bytes()) {
            // "Z", or a ".000000" fraction, parse on the fast path but print differently.
            let zero_fraction = text.len() == 32 && ts.0.timestamp_subsec_micros() == 0;
            if text.ends_with("+00:00") && !zero_fraction {
                return Some(std::borrow::Cow::Borrowed(text));
            }
            return Some(std::borrow::Cow::Owned(ts.to_string()));
        }
        Timestamp::parse(text).ok().map(|ts| std::borrow::Cow::Owned(ts.to_string()))
    }

    /// The instant.
    #[must_use]
    pub fn as_datetime(&self) -> DateTime<Utc> {
        self.0
    }

    /// Seconds since the Unix epoch, with the fraction: the Redis list's sorted-set score.
    #[must_use]
    #[allow(clippy::cast_precision_loss)] // f64 keeps microseconds exact until the year 2255
    pub fn unix_seconds(&self) -> f64 {
        self.0.timestamp_micros() as f64 / 1e6
    }
}

impl From<DateTime<Utc>> for Timestamp {
    fn from(dt: DateTime<Utc>) -> Self {
        Timestamp(dt.trunc_subsecs(6))
    }
}

impl Timestamp {
    /// Appends the canonical form (what `to_string` gives) without going through `fmt`.
    pub fn push_to(&self, out: &mut String) {
        self.with_text(|text| out.push_str(text));
    }

    /// Lends the canonical form from a stack buffer, for callers that only read it.
    pub fn with_text<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        let mut buf = [0u8; 32];
        let len = self.write_canonical(&mut buf);
        // Only ASCII digits and separators were written.
        f(std::str::from_utf8(&buf[..len]).unwrap_or_default())
    }

    /// The canonical form into a stack buffer; returns the used length. Hand-written because
    /// every message of every read and save goes through it, and chrono's formatter interprets a
    /// format string each time.
    fn write_canonical(&self, out: &mut [u8; 32]) -> usize {
        fn put(out: &mut [u8], at: usize, value: u32, digits: usize) {
            let mut v = value;
            for i in (0..digits).rev() {
                out[at + i] = b'0' + u8::try_from(v % 10).unwrap_or(0);
                v /= 10;
            }
        }
        let dt = self.0.naive_utc();
        let (date, time) = (dt.date(), dt.time());
        put(out, 0, u32::try_from(date.year()).unwrap_or(0), 4);
        out[4] = b'-';
        put(out, 5, date.month(), 2);
        out[7] = b'-';
        put(out, 8, date.day(), 2);
        out[10] = b'T';
        put(out, 11, time.hour(), 2);
        out[13] = b':';
        put(out, 14, time.minute(), 2);
        out[16] = b':';
        put(out, 17, time.second(), 2);
        let mut len = 19;
        let micros = time.nanosecond() / 1000;
        if micros != 0 {
            out[19] = b'.';
            put(out, 20, micros, 6);
            len = 26;
        }
        out[len..len + 6].copy_from_slice(b"+00:00");
        len + 6
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with_text(|text| f.write_str(text))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Timestamp::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Whether `b` is exactly how a timestamp prints: `YYYY-MM-DDTHH:MM:SS.ffffff+00:00` (the fraction
/// not zero) or `YYYY-MM-DDTHH:MM:SS+00:00`, a real date and time. Checked digit by digit, without
/// building a date: every message of every cache hit goes through here.
fn is_canonical(b: &[u8]) -> bool {
    const SEPARATORS: [(usize, u8); 5] = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    const DIGITS: [usize; 14] = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18];
    if !matches!(b.len(), 25 | 32)
        || !b.ends_with(b"+00:00")
        || SEPARATORS.iter().any(|&(i, c)| b[i] != c)
        || DIGITS.iter().any(|&i| !b[i].is_ascii_digit())
    {
        return false;
    }
    // A zero fraction prints as none.
    let fraction =
        b.len() == 25 || (b[19] == b'.' && b[20..26].iter().all(u8::is_ascii_digit) && b[20..26] != *b"000000");
    let two = |i: usize| u32::from(b[i] - b'0') * 10 + u32::from(b[i + 1] - b'0');
    let (year, month, day) = (two(0) * 100 + two(2), two(5), two(8));
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    fraction && (1..=days).contains(&day) && two(11) < 24 && two(14) < 60 && two(17) < 60
}

/// The fast path: `YYYY-MM-DDTHH:MM:SS[.ffffff](+00:00|Z)`, the form this library and the app write.
fn parse_canonical(b: &[u8]) -> Option<Timestamp> {
    fn num(b: &[u8]) -> Option<u32> {
        b.iter().try_fold(0u32, |acc, &c| c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0')))
    }
    let (body, ()) = match b.len() {
        25 | 32 if b.ends_with(b"+00:00") => (&b[..b.len() - 6], ()),
        20 | 27 if b.ends_with(b"Z") => (&b[..b.len() - 1], ()),
        _ => return None,
    };
    if body[4] != b'-' || body[7] != b'-' || body[10] != b'T' || body[13] != b':' || body[16] != b':' {
        return None;
    }
    let micros = match body.len() {
        19 => 0,
        26 if body[19] == b'.' => num(&body[20..26])?,
        _ => return None,
    };
    let year = i32::try_from(num(&body[0..4])?).ok()?;
    let date = NaiveDate::from_ymd_opt(year, num(&body[5..7])?, num(&body[8..10])?)?;
    let time =
        chrono::NaiveTime::from_hms_micro_opt(num(&body[11..13])?, num(&body[14..16])?, num(&body[17..19])?, micros)?;
    Some(Timestamp(date.and_time(time).and_utc()))
}

fn parse_iso8601(text: &str) -> Option<DateTime<Utc>> {
    if text.len() == 10 {
        let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
        return Some(date.and_hms_opt(0, 0, 0)?.and_utc());
    }
    let bytes = text.as_bytes();
    if bytes.len() < 16 || !matches!(bytes[10], b'T' | b't' | b' ') {
        return None;
    }
    // Split off the offset: the first '+', '-' or 'Z' after the time of day starts it.
    let time_start = 11;
    let offset_at = text[time_start..].find(['+', '-', 'Z', 'z']).map(|i| i + time_start);
    let (local, offset) = match offset_at {
        Some(i) => (&text[..i], &text[i..]),
        None => (text, ""),
    };
    let local = local.replacen([' ', 't'], "T", 1);
    let naive = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(&local, format).ok())?;
    let offset_seconds = parse_offset(offset)?;
    Some(naive.and_utc() - chrono::Duration::seconds(i64::from(offset_seconds)))
}

/// `""` and `Z` are UTC; otherwise `+HH`, `+HHMM`, `+HH:MM` or `+HH:MM:SS` (Python accepts seconds).
fn parse_offset(offset: &str) -> Option<i32> {
    if offset.is_empty() || offset.eq_ignore_ascii_case("z") {
        return Some(0);
    }
    let sign = match offset.as_bytes()[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let digits: String = offset[1..].chars().filter(|c| *c != ':').collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) || !matches!(digits.len(), 2 | 4 | 6) {
        return None;
    }
    let field = |range: std::ops::Range<usize>| digits.get(range).map_or(Some(0), |s| s.parse::<i32>().ok());
    let (hours, minutes, seconds) = (field(0..2)?, field(2..4)?, field(4..6)?);
    if hours > 23 || minutes > 59 || seconds > 59 {
        return None;
    }
    Some(sign * (hours * 3600 + minutes * 60 + seconds))
}

/// Who wrote a message; PostgreSQL's `CHECK (role IN ('user', 'assistant'))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The person chatting.
    User,
    /// The model's reply.
    Assistant,
}

impl Role {
    /// The stored form.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    /// `"user"` or `"assistant"`; anything else is `None`.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
}

/// One message of a transcript.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// The text, verbatim.
    pub content: String,
    /// When it was written.
    pub time: Timestamp,
}

/// A whole conversation, as the app's dict holds it keys in the app's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// Shown in the sidebar.
    pub title: String,
    /// The model the chat uses; at most 100 characters.
    pub model: String,
    /// The transcript in order. Empty in list results (metadata only).
    #[serde(default)]
    pub messages: Vec<Message>,
    /// Kept from the first save on every later save.
    pub created_at: Timestamp,
    /// The list's sort key, newest first.
    pub last_modified: Timestamp,
}

/// A fingerprint of a run of messages (role, content, time of each, in order), so a flush can tell
/// whether the messages PostgreSQL already holds are still the first ones of the conversation.
/// XXH3, a published algorithm, so every build and every process computes the same value (the
/// fingerprint is stored in Redis); each content is length-prefixed, so no two runs of messages
/// feed it the same bytes.
#[must_use]
pub fn messages_fingerprint(messages: &[Message]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
    for m in messages {
        feed_message(&mut hasher, m);
    }
    hasher.digest()
}

/// The fingerprint of every prefix of `messages`, as 16 hexadecimal digits each: characters
/// `16(i-1)..16i` are [`messages_fingerprint`] of the first `i` messages. Stored beside the
/// transcript in Redis so that a save script tells whether one copy starts with another by
/// comparing 16 characters, without reading either transcript (which may be compressed, and costs a
/// copy into Lua per read). Text, not bytes: a seed-design reader decodes every field as UTF-8.
#[must_use]
pub fn prefix_fingerprints(messages: &[Message]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(16 * messages.len());
    for digest in prefix_digests(messages) {
        write!(out, "{digest:016x}").expect("writing to a String cannot fail");
    }
    out
}

/// The same fingerprints as [`prefix_fingerprints`], as 8 bytes each (big-endian, so that the
/// bytes read in hexadecimal are its digits): half the size, for a hash that a seed-design reader
/// cannot decode anyway (a compressed one).
#[must_use]
pub fn prefix_fingerprint_bytes(messages: &[Message]) -> Vec<u8> {
    prefix_digests(messages).flat_map(u64::to_be_bytes).collect()
}

fn prefix_digests(messages: &[Message]) -> impl Iterator<Item = u64> + '_ {
    let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
    messages.iter().map(move |m| {
        feed_message(&mut hasher, m);
        hasher.digest()
    })
}

fn feed_message(hasher: &mut xxhash_rust::xxh3::Xxh3Default, m: &Message) {
    hasher.update(m.role.as_str().as_bytes());
    hasher.update(&(m.content.len() as u64).to_le_bytes());
    hasher.update(m.content.as_bytes());
    hasher.update(&m.time.as_datetime().timestamp_micros().to_le_bytes());
}

impl Conversation {
    /// The same conversation without its messages: what `list_conversations` returns.
    #[must_use]
    pub fn metadata(&self) -> Conversation {
        Conversation {
            title: self.title.clone(),
            model: self.model.clone(),
            messages: Vec::new(),
            created_at: self.created_at,
            last_modified: self.last_modified,
        }
    }
}

/// Whether `prefix`'s messages are the first messages of `messages` (role, content and time).
#[must_use]
pub fn is_prefix(prefix: &[Message], messages: &[Message]) -> bool {
    prefix.len() <= messages.len() && prefix.iter().zip(messages).all(|(a, b)| a == b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_canonical_says_yes_exactly_when_parsing_and_printing_gives_the_same_text() {
        let mut texts = Vec::new();
        for year in ["0000", "0001", "1900", "1999", "2000", "2023", "2024", "2100", "9999", "20x4"] {
            for month in ["00", "01", "02", "04", "09", "10", "12", "13", "1a"] {
                for day in ["00", "01", "28", "29", "30", "31", "32"] {
                    texts.push(format!("{year}-{month}-{day}T12:34:56.789012+00:00"));
                }
            }
        }
        for time in [
            "00:00:00.000001",
            "23:59:59.999999",
            "24:00:00.100000",
            "12:60:00.100000",
            "12:00:60.100000",
            "12:00:59.000000",
            "12:00:59.0000001",
            "12:00:59.00000",
            "12:00:59,000001",
            "12:00:59.00000x",
        ] {
            texts.push(format!("2024-02-29T{time}+00:00"));
        }
        for other in [
            "2024-02-29T12:00:59.000001Z",
            "2024-02-29T12:00:59.000001+01:00",
            "2024-02-29T12:00:59+00:00",
            "2023-02-29T12:00:59+00:00",
            "2024-02-29T12:00:60+00:00",
            "2024-02-29T12:00:59.+00:00",
            "2024-02-29 12:00:59.000001+00:00",
            "2024/02/29T12:00:59.000001+00:00",
            "2024-02-29T12:00:59.000001+00:00 ",
            "",
        ] {
            texts.push(other.to_owned());
        }
        let mut accepted = 0;
        for text in &texts {
            let round_trip = parse_canonical(text.as_bytes()).is_some_and(|ts| ts.to_string() == *text);
            assert_eq!(is_canonical(text.as_bytes()), round_trip, "{text}");
            accepted += usize::from(round_trip);
        }
        // Both answers occur: leap days, month lengths and every field's range are exercised.
        assert!(accepted > 100 && accepted < texts.len() - 100, "{accepted} of {}", texts.len());
    }

    fn canonical(text: &str) -> String {
        Timestamp::parse(text).unwrap().to_string()
    }

    #[test]
    fn canonical_form_matches_python_isoformat() {
        assert_eq!(canonical("2025-11-26T00:35:21.123456+00:00"), "2025-11-26T00:35:21.123456+00:00");
        assert_eq!(canonical("2025-11-26T00:35:21+00:00"), "2025-11-26T00:35:21+00:00");
        assert_eq!(canonical("2025-11-26T00:35:21.000000+00:00"), "2025-11-26T00:35:21+00:00");
        assert_eq!(canonical("2025-11-26T00:35:21.5+00:00"), "2025-11-26T00:35:21.500000+00:00");
    }

    #[test]
    fn other_forms_are_normalised_to_utc() {
        assert_eq!(canonical("2025-11-26T00:35:21Z"), "2025-11-26T00:35:21+00:00");
        assert_eq!(canonical("2025-11-26T02:35:21+02:00"), "2025-11-26T00:35:21+00:00");
        assert_eq!(canonical("2025-11-25T19:35:21-0500"), "2025-11-26T00:35:21+00:00");
        assert_eq!(canonical("2025-11-26T05:35:21+05"), "2025-11-26T00:35:21+00:00");
        assert_eq!(canonical("2025-11-26 00:35:21.123"), "2025-11-26T00:35:21.123000+00:00");
        assert_eq!(canonical("2025-11-26T00:35"), "2025-11-26T00:35:00+00:00");
        assert_eq!(canonical("2025-11-26"), "2025-11-26T00:00:00+00:00");
        // Nanoseconds are truncated to PostgreSQL's microseconds.
        assert_eq!(canonical("2025-11-26T00:35:21.123456789Z"), "2025-11-26T00:35:21.123456+00:00");
    }

    #[test]
    fn fast_path_agrees_with_the_general_parser() {
        for text in [
            "2025-11-26T00:35:21.123456+00:00",
            "2025-11-26T00:35:21+00:00",
            "2025-11-26T00:35:21Z",
            "2025-11-26T00:35:21.000001Z",
            "0001-01-01T00:00:00+00:00",
            "9999-12-31T23:59:59.999999+00:00",
        ] {
            let fast = parse_canonical(text.as_bytes()).unwrap();
            assert_eq!(Timestamp(parse_iso8601(text).unwrap()), fast, "{text}");
            assert_eq!(fast.to_string(), canonical(text));
        }
        for text in ["2025-02-30T00:00:00+00:00", "2025-11-26T24:00:00+00:00", "2025-11-26T00:35:2x+00:00"] {
            assert!(parse_canonical(text.as_bytes()).is_none(), "{text}");
        }
    }

    #[test]
    fn canonical_text_borrows_only_the_canonical_form() {
        use std::borrow::Cow;
        let same = "2025-11-26T00:35:21.123456+00:00";
        assert!(matches!(Timestamp::canonical_text(same), Some(Cow::Borrowed(t)) if t == same));
        assert!(matches!(Timestamp::canonical_text("2025-11-26T00:35:21+00:00"), Some(Cow::Borrowed(_))));
        for (input, expected) in [
            ("2025-11-26T00:35:21Z", "2025-11-26T00:35:21+00:00"),
            ("2025-11-26T00:35:21.000000+00:00", "2025-11-26T00:35:21+00:00"),
            ("2025-11-26T02:35:21+02:00", "2025-11-26T00:35:21+00:00"),
        ] {
            assert!(matches!(Timestamp::canonical_text(input), Some(Cow::Owned(t)) if t == expected), "{input}");
        }
        assert!(Timestamp::canonical_text("yesterday").is_none());
    }

    #[test]
    fn garbage_is_refused() {
        for bad in ["", "yesterday", "12345", "2025-13-01T00:00:00", "2025-11-26T25:00:00", "2025-11-26T00:00:00+99:00"]
        {
            assert!(Timestamp::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn unix_seconds_keeps_microseconds() {
        let ts = Timestamp::parse("2025-11-26T00:35:21.123456+00:00").unwrap();
        assert!((ts.unix_seconds() - 1_764_117_321.123_456).abs() < 1e-6);
    }

    #[test]
    fn conversation_json_round_trips() {
        let conv = Conversation {
            title: "Grüße".into(),
            model: "gpt-4o".into(),
            messages: vec![Message { role: Role::User, content: "hi".into(), time: Timestamp::now() }],
            created_at: Timestamp::now(),
            last_modified: Timestamp::now(),
        };
        let text = serde_json::to_string(&conv).unwrap();
        assert!(text.starts_with(r#"{"title":"Grüße","model":"gpt-4o","messages":[{"role":"user""#));
        assert_eq!(serde_json::from_str::<Conversation>(&text).unwrap(), conv);
    }

    /// Messages "a", "b", "c" from the user, at one fixed time.
    fn three_messages() -> Vec<Message> {
        let t = Timestamp::parse("2025-01-01T00:00:00+00:00").unwrap();
        ["a", "b", "c"].iter().map(|c| Message { role: Role::User, content: (*c).into(), time: t }).collect()
    }

    #[test]
    fn each_prefix_fingerprint_is_the_fingerprint_of_that_prefix() {
        let messages = three_messages();
        let prints = prefix_fingerprints(&messages);
        assert_eq!(prints.len(), 48);
        for i in 1..=3 {
            let entry = u64::from_str_radix(&prints[16 * (i - 1)..16 * i], 16).unwrap();
            assert_eq!(entry, messages_fingerprint(&messages[..i]));
        }
        assert!(prefix_fingerprints(&[]).is_empty());
        let mut edited = messages.clone();
        edited[1].content = "B".into();
        assert_eq!(prefix_fingerprints(&edited)[..16], prints[..16]);
        assert_ne!(prefix_fingerprints(&edited)[16..32], prints[16..32]);
    }

    #[test]
    fn the_fingerprint_bytes_are_the_hexadecimal_fingerprints_decoded() {
        let messages = three_messages();
        let bytes = prefix_fingerprint_bytes(&messages);
        assert_eq!(bytes.len(), 24);
        let hex: String = bytes.iter().fold(String::new(), |hex, b| hex + &format!("{b:02x}"));
        assert_eq!(hex, prefix_fingerprints(&messages));
        assert!(prefix_fingerprint_bytes(&[]).is_empty());
    }
}
