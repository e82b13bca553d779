//! Everything PostgreSQL (or a Redis key) would refuse, refused before anything is stored, with the
//! field named (the README, "Errors").

use crate::error::{Error, Result};
use crate::model::Conversation;

/// `conversations.conversation_id VARCHAR(50)`.
pub const MAX_CONVERSATION_ID_CHARS: usize = 50;
/// `conversations.user_client_id VARCHAR(255)`.
pub const MAX_USER_ID_CHARS: usize = 255;
/// `conversations.model VARCHAR(100)`.
pub const MAX_MODEL_CHARS: usize = 100;

/// Checks an id used in keys and rows. `:` would make `conv:<user>:<id>` ambiguous and `{` `}`
/// are Redis Cluster hash-tag delimiters; control characters have no place in an id.
fn id(what: &str, value: &str, max_chars: usize) -> Result<()> {
    if value.is_empty() {
        return Err(Error::validation(format!("{what} must not be empty")));
    }
    let chars = value.chars().count();
    if chars > max_chars {
        return Err(Error::validation(format!("{what} must be at most {max_chars} characters, got {chars}")));
    }
    if let Some(bad) = value.chars().find(|c| matches!(c, ':' | '{' | '}') || c.is_control()) {
        return Err(Error::validation(format!("{what} must not contain {bad:?}, got {value:?}")));
    }
    Ok(())
}

/// A conversation id: 1 to 50 characters, none of `:` `{` `}` or control characters.
pub fn conversation_id(value: &str) -> Result<()> {
    id("conversation_id", value, MAX_CONVERSATION_ID_CHARS)
}

/// A user id: 1 to 255 characters, none of `:` `{` `}` or control characters.
pub fn user_id(value: &str) -> Result<()> {
    id("user_id", value, MAX_USER_ID_CHARS)
}

/// A conversation id that is also a safe file name in local mode: no path separators, so
/// `<id>.json` can never name a file outside the `.chat_history` folder.
pub fn local_file_id(value: &str) -> Result<()> {
    conversation_id(value)?;
    if value.contains(['/', '\\']) {
        return Err(Error::validation(format!(
            "conversation_id must not contain '/' or '\\' in local mode, got {value:?}"
        )));
    }
    Ok(())
}

fn text(conversation_id: &str, field: &str, value: &str) -> Result<()> {
    if value.contains('\0') {
        return Err(Error::validation(format!(
            "conversation {conversation_id:?}: {field} must not contain the NUL character (PostgreSQL refuses it)"
        )));
    }
    Ok(())
}

/// The values of a conversation whose types are already right (the binding layer checks types).
pub fn conversation(conversation_id: &str, conv: &Conversation) -> Result<()> {
    text(conversation_id, "title", &conv.title)?;
    text(conversation_id, "model", &conv.model)?;
    let model_chars = conv.model.chars().count();
    if model_chars > MAX_MODEL_CHARS {
        return Err(Error::validation(format!(
            "conversation {conversation_id:?}: model must be at most {MAX_MODEL_CHARS} characters, got {model_chars}"
        )));
    }
    if i32::try_from(conv.messages.len()).is_err() {
        return Err(Error::validation(format!("conversation {conversation_id:?}: too many messages")));
    }
    for (index, message) in conv.messages.iter().enumerate() {
        // The field name is built only for the error: this loop runs for every message of every save.
        if message.content.contains('\0') {
            return text(conversation_id, &format!("messages[{index}].content"), &message.content);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Message, Role, Timestamp};

    #[test]
    fn ids_refuse_what_would_collide_in_keys() {
        for bad in ["", "a:b", "a{b", "a}b", "a\nb", "a\u{7}b", "a\0b"] {
            assert!(conversation_id(bad).is_err(), "{bad:?}");
            assert!(user_id(bad).is_err(), "{bad:?}");
        }
        assert!(conversation_id("a1b2c3d4").is_ok());
        assert!(user_id("00000000-0000-0000-0000-000000000001").is_ok());
        assert!(conversation_id("'; DROP TABLE conversations; --").is_ok());
    }

    #[test]
    fn id_lengths_count_characters_not_bytes() {
        assert!(conversation_id(&"é".repeat(50)).is_ok());
        assert!(conversation_id(&"é".repeat(51)).is_err());
        assert!(user_id(&"x".repeat(255)).is_ok());
        assert!(user_id(&"x".repeat(256)).is_err());
    }

    #[test]
    fn local_ids_cannot_escape_the_folder() {
        for bad in ["../x", "a/b", "/etc/passwd", "..\\x"] {
            assert!(local_file_id(bad).is_err(), "{bad:?}");
        }
        assert!(local_file_id("..").is_ok(), "'...json' is a plain file name inside the folder");
    }

    #[test]
    fn conversation_values_name_the_field() {
        let now = Timestamp::now();
        let mut conv = Conversation {
            title: "t".into(),
            model: "m".repeat(100),
            messages: vec![Message { role: Role::User, content: "ok".into(), time: now }],
            created_at: now,
            last_modified: now,
        };
        assert!(conversation("c", &conv).is_ok());
        conv.model.push('m');
        assert!(conversation("c", &conv).unwrap_err().to_string().contains("model"));
        conv.model = "m".into();
        conv.messages.push(Message { role: Role::Assistant, content: "a\0b".into(), time: now });
        assert!(conversation("c", &conv).unwrap_err().to_string().contains("messages[1].content"));
    }
}
