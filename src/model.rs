//! Conversations, messages and timestamps: the data every tier stores.

use std::fmt;

use chrono::{DateTime, NaiveDate, NaiveDateTime, SubsecRound, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// An instant in UTC with microsecond precision, PostgreSQL's `TIMESTAMPTZ` resolution.
///
/// Displayed in the form Python's `datetime.isoformat()` gives for a UTC-aware datetime
/// (`2025-11-26T00:35:21.123456+00:00`, no fraction when it is zero): the form the app writes, so
/// a conversation saved that way reads back `==` from every tier (SPEC section 2).
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
        parse_iso8601(text.trim())
            .map(|dt| Timestamp(dt.trunc_subsecs(6)))
            .ok_or_else(|| Error::validation(format!("expected an ISO 8601 timestamp, got {text:?}")))
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

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let micros = self.0.timestamp_subsec_micros();
        if micros == 0 {
            write!(f, "{}+00:00", self.0.format("%Y-%m-%dT%H:%M:%S"))
        } else {
            write!(f, "{}.{micros:06}+00:00", self.0.format("%Y-%m-%dT%H:%M:%S"))
        }
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

/// A whole conversation, as the app's dict holds it (SPEC section 2), keys in the app's order.
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
