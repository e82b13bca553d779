-- Brings this Redis in line with a change PostgreSQL committed that did not come through this
-- Redis's copy: any writer's, heard from the change feed (docs/design.md, "Every cache follows
-- PostgreSQL"), or this process's own write sent straight to PostgreSQL while Redis was unreachable
-- or refusing (docs/design.md, "Faults").
--
-- A copy at least as new as the row stays: this tier's own write-back, or a save newer than the
-- change. After a save elsewhere, an older clean copy is dropped (with its owner record, single
-- node), so the next read caches the row and the next save asks PostgreSQL for a version above it;
-- an older dirty copy is left for the flush, which keeps whichever copy loses aside
-- (docs/design.md, "Divergence"). A delete drops an older copy, dirty or not, and leaves the
-- tombstone that keeps reads from caching it again. Unless the copy was current, the user's cached
-- list goes too (titles and order may have changed; the next list rebuilds it), and the list epoch
-- moves, so a list being rebuilt from rows read before this change is not cached
-- (`rebuild_list.lua`).
--
-- After a save elsewhere, the `changed` key holds the row's version for a while, so a read that
-- fetched the older row before the change and caches it after is refused (`backfill.lua`).
--
-- KEYS: conv, dirty set, user dirty, dirty since, list, list meta, owner (a placeholder on a
-- cluster), delete tombstone, changed, list epoch.
-- ARGV: member, id, version (the row's, or the tombstone's), kind ('save' or 'delete'), user,
-- tombstone ttl, local owner, deadline (Redis's clock; past it the caller gave up and replays it;
-- '' for the feed: run late, this still only removes what PostgreSQL already replaced).
-- Returns 0 (the copy is at least as new), 1 (dropped), 2 (a dirty copy older than the row, left
-- for the flush), 3 (nothing was cached) or -4 (past the deadline: nothing changed).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if ARGV[8] ~= '' and now > tonumber(ARGV[8]) then
  return -4
end
local function drop_list()
  redis.call('DEL', KEYS[5], KEYS[6])
  -- Strictly increasing while the key lives, and a fresh key starts at the clock: no value repeats.
  local epoch = math.max(now, (tonumber(redis.call('GET', KEYS[10]) or '0') or 0) + 1)
  redis.call('SET', KEYS[10], string.format('%.0f', epoch), 'EX', ARGV[6])
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  local h = redis.call('HMGET', KEYS[1], 'ver', 'dirty')
  if (tonumber(h[1] or '0') or 0) >= tonumber(ARGV[3]) then return 0 end
  if ARGV[4] == 'save' and h[2] == '1' then
    drop_list()
    return 2
  end
end
local dropped = redis.call('DEL', KEYS[1])
drop_list()
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[1])
if ARGV[7] == '1' and redis.call('GET', KEYS[7]) == ARGV[5] then redis.call('DEL', KEYS[7]) end
if ARGV[4] == 'delete' then
  redis.call('SET', KEYS[8], ARGV[3], 'EX', ARGV[6])
else
  redis.call('SET', KEYS[9], ARGV[3], 'EX', ARGV[6])
end
if dropped == 1 then return 1 end
return 3
