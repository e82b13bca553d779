-- Caches a clean copy read from PostgreSQL (staged like a save's) unless something newer is
-- there, it was just deleted, or (single node) another user has a claim on the id in Redis. It
-- writes no owner record: PostgreSQL, which just answered for this user, is the record for a clean
-- conversation.
--
-- Nor when the change feed has since brought the conversation past the row this copy was read from
-- (the `changed` key: a read that began before another writer's commit and lands after the feed
-- applied it would otherwise cache the older row until its TTL).
--
-- KEYS: conv, owner (a placeholder of this slot on a cluster), delete tombstone, staged, changed.
-- ARGV: user, ttl, local owner ('1' or '0'), deadline (Redis's clock, microseconds; past it the
-- read that fetched the copy has given up, and a newer write may be here: nothing is cached), the
-- copy's version (0 when unknown).
if redis.call('EXISTS', KEYS[4]) == 0 then return 0 end
local t = redis.call('TIME')
if ARGV[4] ~= '' and tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[4]) then
  redis.call('DEL', KEYS[4])
  return 0
end
local owner = false
if ARGV[3] == '1' then owner = redis.call('GET', KEYS[2]) end
local changed = redis.call('GET', KEYS[5])
if changed and tonumber(changed) > (tonumber(ARGV[5]) or 0) then
  redis.call('DEL', KEYS[4])
  return 0
end
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('EXISTS', KEYS[1]) == 1 or (owner and owner ~= ARGV[1]) then
  redis.call('DEL', KEYS[4])
  return 0
end
redis.call('RENAME', KEYS[4], KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
