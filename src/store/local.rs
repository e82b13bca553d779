//! Local mode: one JSON file per conversation in `<base_dir>/.chat_history/`, byte-compatible with
//! Phase 1's `json.dump(conversation, f, ensure_ascii=False, indent=2)`.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, ErrorKind, Result};
use crate::model::Conversation;
use crate::validate;

/// The folder of conversation files. Single-user by design, as in Phase 1: user ids are ignored.
#[derive(Debug)]
pub struct LocalStore {
    dir: PathBuf,
}

/// Distinguishes temp files of concurrent saves in one process (the pid covers other processes).
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl LocalStore {
    /// Uses `<base_dir>/.chat_history`, creating it when missing.
    pub fn open(base_dir: &Path) -> Result<Self> {
        let dir = base_dir.join(".chat_history");
        fs::create_dir_all(&dir)
            .map_err(|e| Error::new(ErrorKind::Io, format!("cannot create {}", dir.display())).with_source(e))?;
        Ok(LocalStore { dir })
    }

    /// The folder holding the files.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, conversation_id: &str) -> Result<PathBuf> {
        validate::local_file_id(conversation_id)?;
        Ok(self.dir.join(format!("{conversation_id}.json")))
    }

    /// The conversation, or `None` when the file is missing, unreadable or not a conversation
    /// (Phase 1 skipped such files too).
    pub fn get(&self, conversation_id: &str) -> Result<Option<Conversation>> {
        let path = self.path(conversation_id)?;
        Ok(read_conversation(&path))
    }

    /// Every readable conversation, sorted by file name.
    pub fn list(&self) -> Result<Vec<(String, Conversation)>> {
        let entries = fs::read_dir(&self.dir)
            .map_err(|e| Error::new(ErrorKind::Io, format!("cannot list {}", self.dir.display())).with_source(e))?;
        #[allow(clippy::case_sensitive_file_extension_comparisons)]
        // Phase 1 listed exactly `*.json`
        let mut names: Vec<String> = entries
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.ends_with(".json") && name.len() > ".json".len())
            .collect();
        names.sort();
        Ok(names
            .into_iter()
            .filter_map(|name| {
                let conv = read_conversation(&self.dir.join(&name))?;
                Some((name[..name.len() - ".json".len()].to_owned(), conv))
            })
            .collect())
    }

    /// Writes the file atomically: a temp file in the same folder, flushed, then renamed over.
    pub fn save(&self, conversation_id: &str, conv: &Conversation) -> Result<()> {
        let path = self.path(conversation_id)?;
        let text = to_phase1_json(conv);
        let temp = self.dir.join(format!(
            ".{conversation_id}.json.{}.{}.tmp",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> io::Result<()> {
            let mut file = fs::File::create(&temp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            fs::rename(&temp, &path)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&temp);
            Error::new(ErrorKind::Io, format!("cannot write {}", path.display())).with_source(e)
        })
    }

    /// Removes the file; a missing one is not an error.
    pub fn delete(&self, conversation_id: &str) -> Result<()> {
        let path = self.path(conversation_id)?;
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(Error::new(ErrorKind::Io, format!("cannot delete {}", path.display())).with_source(e))
            }
            _ => Ok(()),
        }
    }
}

fn read_conversation(path: &Path) -> Option<Conversation> {
    let bytes = fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(conv) => Some(conv),
        Err(e) => {
            log::warn!("skipping {}: not a readable conversation ({e})", path.display());
            None
        }
    }
}

/// Python's `json.dumps(obj, ensure_ascii=False, indent=2)`: two-space indent, `", "`-free
/// item separators at line ends, `": "` after keys, non-ASCII written as is.
#[must_use]
pub fn to_phase1_json(conv: &Conversation) -> String {
    let mut out = Vec::with_capacity(256 + conv.messages.iter().map(|m| m.content.len() + 96).sum::<usize>());
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"  ");
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    serde::Serialize::serialize(conv, &mut serializer).expect("serialising to a Vec cannot fail");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Message, Role, Timestamp};

    fn sample() -> Conversation {
        let t = Timestamp::parse("2025-11-26T00:35:21.123456+00:00").unwrap();
        Conversation {
            title: "Café ☕".into(),
            model: "gpt-4o".into(),
            messages: vec![Message { role: Role::User, content: "line\n\"quoted\"".into(), time: t }],
            created_at: t,
            last_modified: t,
        }
    }

    #[test]
    fn json_matches_python_indent_2_ensure_ascii_false() {
        let expected = r#"{
  "title": "Café ☕",
  "model": "gpt-4o",
  "messages": [
    {
      "role": "user",
      "content": "line\n\"quoted\"",
      "time": "2025-11-26T00:35:21.123456+00:00"
    }
  ],
  "created_at": "2025-11-26T00:35:21.123456+00:00",
  "last_modified": "2025-11-26T00:35:21.123456+00:00"
}"#;
        assert_eq!(to_phase1_json(&sample()), expected);
        let mut empty = sample();
        empty.messages.clear();
        assert!(to_phase1_json(&empty).contains("\"messages\": [],"));
    }

    #[test]
    fn save_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        store.save("b", &sample()).unwrap();
        store.save("a", &sample()).unwrap();
        fs::write(store.dir().join("corrupt.json"), "{not json").unwrap();
        assert_eq!(store.get("a").unwrap(), Some(sample()));
        assert_eq!(store.get("corrupt").unwrap(), None);
        let ids: Vec<String> = store.list().unwrap().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["a", "b"]);
        store.delete("a").unwrap();
        store.delete("a").unwrap();
        assert_eq!(store.get("a").unwrap(), None);
        let leftovers = fs::read_dir(store.dir())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".tmp"));
        assert_eq!(leftovers.count(), 0);
    }
}
