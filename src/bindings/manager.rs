//! The manager's classes for Python: `ChatHistoryManager`, and the backends the CLI inspects.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::convert::{cached_to_py, conversation_from_py, conversation_to_py, fetched_to_py, listing_to_py, Id};
use super::{credentials, settings};
use crate::cache::{split_member, RedisCache};
use crate::config::resolve::{ProcessEnv, Resolved};
use crate::config::Mode;
use crate::error::Error;
use crate::manager::ChatHistory;
use crate::store::postgres::PostgresStore;

/// Stores LLM chat conversations as local JSON files, in PostgreSQL, or in Redis over PostgreSQL.
#[pyclass(name = "ChatHistoryManager", module = "chat_history_rs", frozen)]
pub struct PyChatHistoryManager {
    pub(super) inner: Arc<ChatHistory>,
    pub(super) redis_enabled: bool,
    postgres_backend: Option<Py<PyPostgresBackend>>,
    redis_backend: Option<Py<PyRedisBackend>>,
    pub(super) repr: String,
}

// pyo3 extracts arguments by value; `Id`s are read, not consumed.
#[allow(clippy::needless_pass_by_value)]
#[pymethods]
impl PyChatHistoryManager {
    /// Every argument is checked: a value of the wrong type is an `InvalidTypeError`, a bad value a
    /// `ConfigurationError`, each naming the argument (`settings::given`, then the core).
    #[new]
    #[pyo3(signature = (mode = None, base_dir = None, connection_string = None, history_days = None, redis_enabled = None, **kwargs))]
    fn new(
        py: Python<'_>,
        mode: Option<Bound<'_, PyAny>>,
        base_dir: Option<Bound<'_, PyAny>>,
        connection_string: Option<Bound<'_, PyAny>>,
        history_days: Option<Bound<'_, PyAny>>,
        redis_enabled: Option<Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        // Phase 1's five positional arguments join the keywords: one conversion for all of them.
        let all = kwargs.map_or_else(|| PyDict::new(py), Bound::clone);
        let positional = [
            ("mode", mode),
            ("base_dir", base_dir),
            ("connection_string", connection_string),
            ("history_days", history_days),
            ("redis_enabled", redis_enabled),
        ];
        for (name, value) in positional {
            if let Some(value) = value {
                all.set_item(name, value)?;
            }
        }
        let given = settings::given(&all, "ChatHistoryManager()", true)?;
        // Keyword arguments win over the environment (the README, "Configuration").
        let resolved = Resolved::resolve(given.keywords, &ProcessEnv)?;
        let margin = resolved.credential_refresh_margin.value;
        let redis_credentials = given
            .redis_credential_provider
            .map(|callable| credentials::provider("redis_credential_provider", &callable, margin))
            .transpose()?;
        let postgres_credentials = given
            .postgres_credential_provider
            .map(|callable| credentials::provider("postgres_credential_provider", &callable, margin))
            .transpose()?;
        let mut settings = resolved.settings()?;
        settings.inspect_only = given.inspect_only;
        let mode = settings.mode;
        if mode == Mode::Local && resolved.redis_enabled.value {
            log::warn!("REDIS_ENABLED is set but mode is 'local': Redis is not used");
        }
        if let Some(pg) = settings.postgres.as_mut() {
            pg.credentials = postgres_credentials;
        }
        if let Some(redis) = settings.redis.as_mut() {
            redis.credentials = redis_credentials;
        }
        let repr = match (&settings.postgres, &settings.redis) {
            (Some(pg), Some(r)) => {
                format!("ChatHistoryManager(mode=\"postgres\", postgres={:?}, redis={:?})", pg.redacted(), r.redacted())
            }
            (Some(pg), None) => format!("ChatHistoryManager(mode={:?}, postgres={:?})", mode.as_str(), pg.redacted()),
            _ => format!("ChatHistoryManager(mode=\"local\", base_dir={:?})", settings.base_dir.display().to_string()),
        };
        let history_days = settings.history_days;
        let inner = py.detach(|| ChatHistory::open(&settings))?;
        let postgres_backend = match mode {
            Mode::Local => None,
            _ => Some(Py::new(py, PyPostgresBackend { inner: Arc::clone(&inner), history_days })?),
        };
        let redis_backend = match mode {
            Mode::Redis => Some(Py::new(py, PyRedisBackend { inner: Arc::clone(&inner) })?),
            _ => None,
        };
        Ok(PyChatHistoryManager { inner, redis_enabled: mode == Mode::Redis, postgres_backend, redis_backend, repr })
    }

    /// `"local"`, `"postgres"` or `"redis"`.
    #[getter]
    pub(super) fn mode(&self) -> &'static str {
        match self.inner.mode() {
            Mode::Redis => "postgres",
            other => other.as_str(),
        }
    }

    /// Whether the Redis tier is in use.
    #[getter]
    fn redis_enabled(&self) -> bool {
        self.redis_enabled
    }

    /// The PostgreSQL store with the seed's method names, or None in local mode.
    #[getter]
    pub(super) fn postgres_backend(&self, py: Python<'_>) -> Option<Py<PyPostgresBackend>> {
        self.postgres_backend.as_ref().map(|b| b.clone_ref(py))
    }

    /// The Redis cache with the seed's method names, or None without Redis.
    #[getter]
    pub(super) fn redis_backend(&self, py: Python<'_>) -> Option<Py<PyRedisBackend>> {
        self.redis_backend.as_ref().map(|b| b.clone_ref(py))
    }

    #[pyo3(signature = (user_id = None))]
    fn list_conversations<'py>(&self, py: Python<'py>, user_id: Option<Id>) -> PyResult<Bound<'py, PyAny>> {
        let user_id = user_id.as_deref();
        let items = py.detach(|| self.inner.list(user_id))?;
        Ok(listing_to_py(py, &items)?.into_any())
    }

    #[pyo3(signature = (conversation_id, user_id = None))]
    fn get_conversation<'py>(
        &self,
        py: Python<'py>,
        conversation_id: Id,
        user_id: Option<Id>,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let conversation_id: &str = &conversation_id;
        let user_id = user_id.as_deref();
        // A near-cache hit is answered with the GIL held: no thread hop, no wait on I/O.
        let fetched = match self.inner.get_near(conversation_id, user_id)? {
            Some(found) => Some(found),
            None => py.detach(|| self.inner.get(conversation_id, user_id))?,
        };
        fetched.map(|f| fetched_to_py(py, &f)).transpose()
    }

    #[pyo3(signature = (conversation_id, conversation, user_id = None))]
    fn save_conversation(
        &self,
        py: Python<'_>,
        conversation_id: Id,
        conversation: &Bound<'_, PyAny>,
        user_id: Option<Id>,
    ) -> PyResult<()> {
        let conversation_id: &str = &conversation_id;
        let user_id = user_id.as_deref();
        let conv = conversation_from_py(conversation_id, conversation)?;
        py.detach(|| self.inner.save(conversation_id, user_id, &conv))?;
        Ok(())
    }

    #[pyo3(signature = (conversation_id, user_id = None))]
    fn delete_conversation(&self, py: Python<'_>, conversation_id: Id, user_id: Option<Id>) -> PyResult<()> {
        let conversation_id: &str = &conversation_id;
        let user_id = user_id.as_deref();
        py.detach(|| self.inner.delete(conversation_id, user_id))?;
        Ok(())
    }

    fn flush_dirty_conversations(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(py.detach(|| self.inner.flush())?)
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        Ok(py.detach(|| self.inner.close())?)
    }

    /// Copies kept aside in `conversation_conflicts` after Redis and PostgreSQL diverged, newest
    /// first: all users', one user's, or the one with `conflict_id`.
    #[pyo3(signature = (user_id = None, *, conflict_id = None, limit = 100))]
    fn list_conflicts<'py>(
        &self,
        py: Python<'py>,
        user_id: Option<Id>,
        conflict_id: Option<i64>,
        limit: i64,
    ) -> PyResult<Bound<'py, PyList>> {
        let user_id = user_id.as_deref();
        let conflicts = py.detach(|| self.inner.conflicts(user_id, conflict_id, limit))?;
        let list = PyList::empty(py);
        for c in conflicts {
            let dict = PyDict::new(py);
            dict.set_item("conflict_id", c.conflict_id)?;
            dict.set_item("conversation_id", c.conversation_id)?;
            dict.set_item("user_id", c.user_id)?;
            dict.set_item("conversation", conversation_to_py(py, &c.conversation)?)?;
            dict.set_item("version", c.version)?;
            dict.set_item("reason", c.reason)?;
            dict.set_item("kept_at", c.kept_at.to_string())?;
            dict.set_item("restored_at", c.restored_at.map(|t| t.to_string()))?;
            list.append(dict)?;
        }
        Ok(list)
    }

    /// Makes a kept copy the conversation again; the copy it replaces is kept aside in turn unless
    /// the restored one holds all its messages. Returns (conversation_id, user_id).
    fn restore_conflict(&self, py: Python<'_>, conflict_id: i64) -> PyResult<(String, String)> {
        Ok(py.detach(|| self.inner.restore_conflict(conflict_id))?)
    }

    pub(super) fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = py.detach(|| self.inner.stats());
        let dict = PyDict::new(py);
        dict.set_item("mode", s.mode)?;
        dict.set_item("reads", s.reads)?;
        dict.set_item("lists", s.lists)?;
        dict.set_item("saves", s.saves)?;
        dict.set_item("deletes", s.deletes)?;
        dict.set_item("errors", s.errors)?;
        dict.set_item("closed", s.closed)?;
        dict.set_item("redis_enabled", s.cache.is_some())?;
        if let Some(c) = s.cache {
            let total = c.hits + c.misses;
            #[allow(clippy::cast_precision_loss)] // a ratio of counters
            let hit_rate = if total == 0 { None } else { Some(c.hits as f64 / total as f64) };
            dict.set_item("cache_hits", c.hits)?;
            dict.set_item("cache_misses", c.misses)?;
            dict.set_item("hit_rate", hit_rate)?;
            dict.set_item("dirty_count", c.dirty_count)?;
            dict.set_item("oldest_dirty_age_seconds", c.oldest_dirty_age_seconds)?;
            dict.set_item("flushes", c.flushes)?;
            dict.set_item("conversations_flushed", c.conversations_flushed)?;
            dict.set_item("flush_failures", c.flush_failures)?;
            dict.set_item("stuck_conversations", c.stuck)?;
            dict.set_item("conflicts_kept", c.conflicts_kept)?;
            dict.set_item("postgres_fallbacks", c.fallbacks)?;
            dict.set_item("redis_available", c.redis_available)?;
            dict.set_item("redis_error", c.redis_error)?;
            dict.set_item("redis_read_round_trips", c.read_round_trips)?;
            dict.set_item("redis_reads_shared", c.reads_shared)?;
            dict.set_item("redis_used_memory", c.memory.used)?;
            dict.set_item("redis_maxmemory", c.memory.max)?;
            dict.set_item("redis_maxmemory_policy", c.memory.policy)?;
            dict.set_item("redis_url", c.redis_url)?;
            dict.set_item("redis_layout", c.layout)?;
            let near = c.near.unwrap_or_default();
            dict.set_item("near_cache_enabled", c.near.is_some())?;
            dict.set_item("near_cache_tracking", near.tracking)?;
            dict.set_item("near_cache_hits", near.hits)?;
            dict.set_item("near_cache_misses", near.misses)?;
            dict.set_item("near_cache_invalidations", near.invalidations)?;
            dict.set_item("near_cache_evictions", near.evictions)?;
            dict.set_item("near_cache_resets", near.resets)?;
            dict.set_item("near_cache_entries", near.entries)?;
            dict.set_item("near_cache_bytes", near.bytes)?;
            dict.set_item("near_cache_limit_bytes", near.limit)?;
            dict.set_item("feed_following", c.feed.following)?;
            dict.set_item("feed_changes_applied", c.feed.changes_applied)?;
            dict.set_item("feed_copies_dropped", c.feed.copies_dropped)?;
            dict.set_item("feed_divergences", c.feed.divergences)?;
            dict.set_item("feed_resyncs", c.feed.resyncs)?;
            dict.set_item("feed_lag_seconds", c.feed.lag_seconds)?;
            let nodes = PyList::empty(py);
            for node in c.nodes {
                let entry = PyDict::new(py);
                entry.set_item("address", node.address)?;
                entry.set_item("slots", node.slots)?;
                entry.set_item("replicas", node.replicas)?;
                entry.set_item("used_memory", node.memory.used)?;
                entry.set_item("maxmemory", node.memory.max)?;
                entry.set_item("maxmemory_policy", node.memory.policy)?;
                nodes.append(entry)?;
            }
            dict.set_item("redis_nodes", nodes)?;
        }
        Ok(dict)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        self.repr.clone()
    }
}

impl Drop for PyChatHistoryManager {
    /// A manager dropped without `close()` still writes back what is dirty (docs/design.md, "The contract": nothing
    /// saved is lost), with the GIL released so other threads run meanwhile.
    fn drop(&mut self) {
        if !self.inner.is_closed() {
            Python::attach(|py| py.detach(|| self.inner.close()).ok());
        }
    }
}

/// PostgreSQL with the seed's `PostgreSQLBackend` method names and argument orders.
#[pyclass(name = "PostgresBackend", module = "chat_history_rs", frozen)]
pub struct PyPostgresBackend {
    inner: Arc<ChatHistory>,
    history_days: i32,
}

impl PyPostgresBackend {
    fn store(&self) -> Result<Arc<PostgresStore>, Error> {
        self.inner.postgres()?.ok_or_else(|| Error::config("this manager has no PostgreSQL store"))
    }
}

// pyo3 extracts arguments by value; `Id`s are read, not consumed.
#[allow(clippy::needless_pass_by_value)]
#[pymethods]
impl PyPostgresBackend {
    fn get_conversation<'py>(
        &self,
        py: Python<'py>,
        conversation_id: Id,
        user_id: &str,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let conversation_id: &str = &conversation_id;
        crate::validate::conversation_id(conversation_id)?;
        crate::validate::user_id(user_id)?;
        let conv = py.detach(|| self.store()?.get(conversation_id, user_id))?;
        conv.map(|c| conversation_to_py(py, &c)).transpose()
    }

    fn save_conversation(
        &self,
        py: Python<'_>,
        conversation_id: Id,
        user_id: &str,
        conversation: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let conversation_id: &str = &conversation_id;
        crate::validate::conversation_id(conversation_id)?;
        crate::validate::user_id(user_id)?;
        let conv = conversation_from_py(conversation_id, conversation)?;
        crate::validate::conversation(conversation_id, &conv)?;
        py.detach(|| self.store()?.save_keeping(conversation_id, user_id, &conv, crate::writeback::REASON_SAVED_OVER))?;
        Ok(())
    }

    #[pyo3(signature = (user_id, days = None))]
    fn list_conversations<'py>(
        &self,
        py: Python<'py>,
        user_id: &str,
        days: Option<i32>,
    ) -> PyResult<Bound<'py, PyAny>> {
        crate::validate::user_id(user_id)?;
        let days = days.unwrap_or(self.history_days);
        let items = py.detach(|| self.store()?.list(user_id, days))?;
        Ok(listing_to_py(py, &items)?.into_any())
    }

    fn delete_conversation(&self, py: Python<'_>, conversation_id: Id, user_id: Id) -> PyResult<()> {
        let conversation_id: &str = &conversation_id;
        let user_id: &str = &user_id;
        crate::validate::conversation_id(conversation_id)?;
        crate::validate::user_id(user_id)?;
        py.detach(|| self.store()?.delete(conversation_id, user_id))?;
        Ok(())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        // Detached: in a forked child `store()` opens the pool (see `PyRedisBackend::cache`).
        Ok(format!("PostgresBackend({:?})", py.detach(|| self.store())?.redacted_url()))
    }
}

/// Redis with the seed's `RedisBackend` method names and argument orders.
#[pyclass(name = "RedisBackend", module = "chat_history_rs", frozen)]
pub struct PyRedisBackend {
    inner: Arc<ChatHistory>,
}

impl PyRedisBackend {
    fn cache(&self) -> Result<Arc<RedisCache>, Error> {
        // In a forked child this opens the pools, whose connections may call a credential provider
        // from another thread: the GIL must be free meanwhile.
        let cache = Python::attach(|py| py.detach(|| self.inner.redis()))?;
        cache.ok_or_else(|| Error::config("this manager has no Redis cache"))
    }
}

fn cache_error(e: crate::cache::CacheError) -> PyErr {
    e.into_error().into()
}

// pyo3 extracts arguments by value; `Id`s are read, not consumed.
#[allow(clippy::needless_pass_by_value)]
#[pymethods]
impl PyRedisBackend {
    fn get_conversation<'py>(
        &self,
        py: Python<'py>,
        user_id: &str,
        conversation_id: Id,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let conversation_id: &str = &conversation_id;
        crate::validate::user_id(user_id)?;
        crate::validate::conversation_id(conversation_id)?;
        let cache = self.cache()?;
        let cached = py.detach(|| cache.get(user_id, conversation_id)).map_err(cache_error)?;
        cached.map(|c| cached_to_py(py, &c)).transpose()
    }

    /// Stores the conversation. `dirty=True` (the seed's default) marks it for write-back, exactly
    /// as `ChatHistoryManager.save_conversation` does; `dirty=False` caches it clean with a TTL.
    #[pyo3(signature = (user_id, conversation_id, conversation, dirty = true))]
    fn set_conversation(
        &self,
        py: Python<'_>,
        user_id: &str,
        conversation_id: Id,
        conversation: &Bound<'_, PyAny>,
        dirty: bool,
    ) -> PyResult<()> {
        let conversation_id: &str = &conversation_id;
        crate::validate::user_id(user_id)?;
        crate::validate::conversation_id(conversation_id)?;
        let conv = conversation_from_py(conversation_id, conversation)?;
        crate::validate::conversation(conversation_id, &conv)?;
        if dirty {
            py.detach(|| self.inner.save(conversation_id, Some(user_id), &conv))?;
        } else {
            let cache = self.cache()?;
            py.detach(|| cache.backfill(user_id, conversation_id, &conv, None)).map_err(cache_error)?;
        }
        Ok(())
    }

    fn get_dirty_conversations(&self, py: Python<'_>) -> PyResult<Vec<(String, String)>> {
        let cache = self.cache()?;
        let members = py.detach(|| cache.all_dirty()).map_err(cache_error)?;
        Ok(members.iter().filter_map(|m| split_member(m)).map(|(u, c)| (u.to_owned(), c.to_owned())).collect())
    }

    /// Marks the conversation clean, but only when PostgreSQL holds exactly what the hash holds and
    /// nothing changed the hash since: a seed-design flusher calls it after its own save, and a
    /// write that raced that save stays dirty for the next flush.
    fn clear_dirty_flag(&self, py: Python<'_>, user_id: Id, conversation_id: Id) -> PyResult<()> {
        let conversation_id: &str = &conversation_id;
        let user_id: &str = &user_id;
        let cache = self.cache()?;
        let postgres = self.inner.postgres()?.ok_or_else(|| Error::config("this manager has no PostgreSQL"))?;
        py.detach(|| {
            let in_postgres = |conv: &crate::model::Conversation| {
                matches!(postgres.get(conversation_id, user_id), Ok(Some(stored)) if stored == *conv)
            };
            cache.clear_dirty(user_id, conversation_id, in_postgres)
        })
        .map_err(cache_error)?;
        Ok(())
    }

    fn __repr__(&self) -> PyResult<String> {
        Ok(format!("RedisBackend({:?})", self.cache()?.redacted_url()))
    }
}
