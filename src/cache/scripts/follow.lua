-- Brings this Redis in line with a change PostgreSQL committed, whoever made it (the change feed,
-- docs/design.md, "Every cache follows PostgreSQL"). A copy at least as new as the row stays:
-- this tier's own write-back, or a save newer than the change. After a save elsewhere, an older
-- clean copy is dropped (with its owner record, single node), and an older dirty copy is left for
-- the flush, which keeps whichever copy loses aside (docs/design.md, "Divergence"). A delete
-- drops an older copy, dirty or not, and leaves the tombstone that keeps reads from caching it
-- again. Unless the copy was current, the user's cached list goes too: titles and order may have
-- changed, and the next list rebuilds it.
--
-- No deadline: run late, this still only removes what PostgreSQL already replaced, and leaves a
-- copy newer than the change alone.
--
-- After a save elsewhere, the `changed` key holds the row's version for a while, so a read that
-- fetched the older row before the change and caches it after is refused (`backfill.lua`).
--
-- KEYS: conv, dirty set, user dirty, dirty since, list, list meta, owner (a placeholder on a
-- cluster), delete tombstone, changed.
-- ARGV: member, id, version (the row's, or the tombstone's), kind ('save' or 'delete'), user,
-- tombstone ttl, local owner.
-- Returns 0 (the copy is at least as new), 1 (dropped, or nothing cached) or 2 (a dirty copy older
-- than the row, left for the flush).
if redis.call('EXISTS', KEYS[1]) == 1 then
  local h = redis.call('HMGET', KEYS[1], 'ver', 'dirty')
  if (tonumber(h[1] or '0') or 0) >= tonumber(ARGV[3]) then return 0 end
  if ARGV[4] == 'save' and h[2] == '1' then
    redis.call('DEL', KEYS[5], KEYS[6])
    return 2
  end
end
redis.call('DEL', KEYS[1], KEYS[5], KEYS[6])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[1])
if ARGV[7] == '1' and redis.call('GET', KEYS[7]) == ARGV[5] then redis.call('DEL', KEYS[7]) end
if ARGV[4] == 'delete' then
  redis.call('SET', KEYS[8], ARGV[3], 'EX', ARGV[6])
else
  redis.call('SET', KEYS[9], ARGV[3], 'EX', ARGV[6])
end
return 1
