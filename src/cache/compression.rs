//! The stored forms of a conversation's `messages` field (`redis_compression`; docs/design.md,
//! "Compressed transcripts"): the JSON text (the seed design's, and the default), the seed plan's
//! optional base64 of zlib of it, and the library's own, a zstd frame of it. A save writes the form
//! its setting names ([`encode`]); every reader takes all three, whatever its own setting
//! ([`decode`]), told apart by their first bytes:
//!
//! - a zstd frame starts with zstd's magic number, `28 b5 2f fd`: no JSON text or base64 does;
//! - the JSON text starts with `[` (after any whitespace);
//! - anything else is taken as base64 (zlib's header byte 0x78 makes it start with `e`, `eJ` at
//!   Python's default level), and, when it is not, as text that fails to parse as it always did.
//!
//! Only the bytes change: the byte length the Lua scripts compare (`HSTRLEN messages`) and the content
//! signature (`codec::content_sig`) are both of the stored bytes, and no script decodes them.

use std::io::Write as _;

use base64::Engine as _;

use crate::config::Compression;

/// The first four bytes of every zstd frame.
pub(crate) const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// zstd's level: its default. On chat-like text (docs/benchmarks.md, "Compressed transcripts")
/// higher levels saved under 1% at 20 messages and 2-4% at 200 for two to six times the CPU, and
/// level 1 lost 7% at 200 messages for little CPU saved.
const ZSTD_LEVEL: i32 = 3;

/// Transcripts shorter than this are stored as JSON with `"on"`: a frame's own bytes would take back
/// most of what compressing saves (an empty transcript stays `[]`). `"zlib"` compresses every
/// transcript, as the seed's reader with that option decodes every one.
const ZSTD_MIN_BYTES: usize = 128;

/// The largest transcript a zstd frame may claim to hold when it is decoded (Redis's own limit on a
/// string is 512 MB): anything larger is corrupt, and left unread rather than allocated.
const MAX_DECODED_BYTES: u64 = 512 << 20;

thread_local! {
    /// One zstd compression context per thread, reused: a fresh one per save cost a third more than
    /// the compression itself of a 20-message transcript.
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
    /// And one decompression context: a fresh one per read cost more than twice the decompression
    /// (13 µs against 5 for 20 messages).
    static UNZSTD: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// The bytes a save stores in the `messages` field for the JSON text `json`, in the form
/// `compression` names.
#[must_use]
pub(crate) fn encode(json: String, compression: Compression) -> Vec<u8> {
    match compression {
        Compression::Off => json.into_bytes(),
        Compression::Zlib => {
            // Python's `zlib.compress` default level (6), as the seed's `_compress_messages`.
            let mut encoder = flate2::write::ZlibEncoder::new(
                Vec::with_capacity(json.len() / 2 + 64),
                flate2::Compression::default(),
            );
            encoder.write_all(json.as_bytes()).expect("writing to memory cannot fail");
            let deflated = encoder.finish().expect("writing to memory cannot fail");
            base64::engine::general_purpose::STANDARD.encode(deflated).into_bytes()
        }
        Compression::Zstd => {
            if json.len() < ZSTD_MIN_BYTES {
                return json.into_bytes();
            }
            let frame = ZSTD.with(|cell| {
                let mut cell = cell.borrow_mut();
                let compressor = match cell.as_mut() {
                    Some(compressor) => compressor,
                    None => cell.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok()?),
                };
                compressor.compress(json.as_bytes()).ok()
            });
            match frame {
                Some(frame) if frame.len() < json.len() => frame,
                _ => json.into_bytes(),
            }
        }
    }
}

/// The JSON text of a stored `messages` field, whichever of the three forms it is in; `None` when
/// it is none of them (a corrupt frame, base64 that is not zlib, text that is not UTF-8).
#[must_use]
pub(crate) fn decode(stored: Vec<u8>) -> Option<String> {
    if stored.starts_with(&ZSTD_MAGIC) {
        let size = zstd::zstd_safe::get_frame_content_size(&stored).ok()?;
        let text = match size {
            Some(size) if size <= MAX_DECODED_BYTES => {
                let size = usize::try_from(size).ok()?;
                UNZSTD.with(|cell| {
                    let mut cell = cell.borrow_mut();
                    let decompressor = match cell.as_mut() {
                        Some(decompressor) => decompressor,
                        None => cell.insert(zstd::bulk::Decompressor::new().ok()?),
                    };
                    decompressor.decompress(&stored, size).ok()
                })
            }
            Some(_) => return None,
            None => zstd::stream::decode_all(stored.as_slice()).ok(),
        };
        return String::from_utf8(text?).ok();
    }
    let first = stored.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_none_or(|&b| b == b'[') {
        return String::from_utf8(stored).ok();
    }
    let Ok(deflated) = base64::engine::general_purpose::STANDARD.decode(&stored) else {
        // Not base64: text as it is, which the caller fails to parse as before.
        return String::from_utf8(stored).ok();
    };
    let mut text = Vec::with_capacity(deflated.len() * 4);
    let mut decoder = flate2::write::ZlibDecoder::new(&mut text);
    decoder.write_all(&deflated).ok()?;
    decoder.finish().ok()?;
    String::from_utf8(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transcript long enough to compress, with non-ASCII text and escapes in it.
    fn transcript(messages: usize) -> String {
        let list: Vec<String> = (0..messages)
            .map(|i| {
                format!(
                    r#"{{"role":"{}","content":"message {i}: Grüße 🎉 \"quoted\" and a line\nbreak, then words","time":"2025-11-26T00:35:21.{i:06}+00:00"}}"#,
                    if i % 2 == 0 { "user" } else { "assistant" }
                )
            })
            .collect();
        format!("[{}]", list.join(","))
    }

    #[test]
    fn every_form_round_trips_and_is_told_apart_by_its_first_bytes() {
        for n in [0, 1, 3, 40] {
            let json = transcript(n);
            for compression in [Compression::Off, Compression::Zlib, Compression::Zstd] {
                let stored = encode(json.clone(), compression);
                assert_eq!(decode(stored.clone()).as_deref(), Some(json.as_str()), "{compression:?}, {n} messages");
                match compression {
                    Compression::Off => assert_eq!(stored, json.as_bytes()),
                    Compression::Zlib => assert!(stored.starts_with(b"eJ"), "{:?}", &stored[..4]),
                    // A frame when it is smaller; the JSON as it is when not (one short message).
                    Compression::Zstd if n <= 1 => assert_eq!(stored, json.as_bytes()),
                    Compression::Zstd => assert!(stored.starts_with(&ZSTD_MAGIC)),
                }
                if n == 40 && compression != Compression::Off {
                    assert!(stored.len() < json.len() / 2, "{compression:?}: {} of {}", stored.len(), json.len());
                }
            }
        }
    }

    #[test]
    fn the_seeds_own_bytes_are_read() {
        // Python: base64.b64encode(zlib.compress(json.dumps(messages).encode())).decode(), the seed's
        // `_compress_messages`, of its json.dumps spacing.
        let seed = "eJyLrlYqys9JVbJSUCotTi1S0lFQSs7PK0nNKwEJZWSCBEoyc8EKjAyMTHUNDIEoxMDACoy0waRSbSwA7D8SzQ==";
        let json = r#"[{"role": "user", "content": "hi", "time": "2025-01-01T00:00:00+00:00"}]"#;
        assert_eq!(decode(seed.as_bytes().to_vec()).as_deref(), Some(json));
        // Python's zlib and zlib-rs agree on the stream's header at the default level (`eJ`).
        assert_eq!(&encode(json.to_owned(), Compression::Zlib)[..3], &seed.as_bytes()[..3]);
    }

    #[test]
    fn plain_text_stays_as_it_is_and_corrupt_forms_are_unreadable() {
        assert_eq!(decode(b" [ ] ".to_vec()).as_deref(), Some(" [ ] "));
        assert_eq!(decode(Vec::new()).as_deref(), Some(""));
        // Not base64: the text, which the JSON parser then refuses as before.
        assert_eq!(decode(b"{\"a\": 1}".to_vec()).as_deref(), Some("{\"a\": 1}"));
        // Base64 that is not zlib, a truncated frame, a frame claiming an absurd size.
        assert_eq!(decode(b"aGVsbG8=".to_vec()), None);
        let frame = encode(transcript(40), Compression::Zstd);
        assert_eq!(decode(frame[..frame.len() / 2].to_vec()), None);
        let mut huge = ZSTD_MAGIC.to_vec();
        huge.extend([0xa0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert_eq!(decode(huge), None);
        assert_eq!(decode(vec![0xff, 0xfe]), None);
    }
}
