-- After a write went straight to PostgreSQL (Redis unreachable or refusing), brings Redis in line
-- with it. A copy at least as new stays. A delete drops the copy, dirty or not (the delete is newer
-- than anything it held), and leaves the tombstone that keeps reads from caching it again. After a
-- save, a clean older copy is dropped, with its owner record (single node), so the next save asks
-- PostgreSQL and gets a version above the row's; a dirty older copy is left to the flush, which
-- keeps whichever copy loses aside (docs/design.md, "Divergence").
--
-- KEYS: conv, dirty set, user dirty, dirty since, list, list meta, owner (a placeholder on a
-- cluster), delete tombstone.
-- ARGV: member, id, version, kind ('save' or 'delete'), user, tombstone ttl, local owner, deadline
-- (Redis's clock; past it the caller gave up: nothing changes).
-- Returns 0 (newer copy kept, or nothing cached), 1 (dropped), 2 (dirty copy left for the flush)
-- or -4 (past the deadline: the caller replays it again).
local t = redis.call('TIME')
if ARGV[8] ~= '' and tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[8]) then
  return -4
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  local h = redis.call('HMGET', KEYS[1], 'ver', 'dirty')
  if (tonumber(h[1] or '0') or 0) >= tonumber(ARGV[3]) then return 0 end
  if ARGV[4] == 'save' and h[2] == '1' then return 2 end
end
local dropped = redis.call('DEL', KEYS[1])
-- The whole list, not the entry: after a save the conversation is still the user's (PostgreSQL holds
-- it), and a list without its entry would be served without it. The next list rebuilds it.
redis.call('DEL', KEYS[5], KEYS[6])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[1])
if ARGV[7] == '1' and redis.call('GET', KEYS[7]) == ARGV[5] then redis.call('DEL', KEYS[7]) end
if ARGV[4] == 'delete' then redis.call('SET', KEYS[8], ARGV[3], 'EX', ARGV[6]) end
return dropped
