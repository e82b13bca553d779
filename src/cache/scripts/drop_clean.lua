-- A full resync of the change feed: drops a conversation's copy unless it is dirty (a dirty copy
-- is written back by the flush, which resolves any divergence with PostgreSQL's row).
--
-- KEYS: conv.
-- Returns 1 when dropped.
if redis.call('HGET', KEYS[1], 'dirty') == '1' then return 0 end
return redis.call('DEL', KEYS[1])
