-- Caches a clean copy read from PostgreSQL (staged like a save's, with the clean copy's TTL
-- already, which the rename keeps) unless something newer is there, it was just deleted, or
-- (single node) another user has a claim on the id in Redis. It writes no owner record:
-- PostgreSQL, which just answered for this user, is the record for a clean conversation.
--
-- Nor when the change feed has since brought the conversation past the row this copy was read from
-- (the `changed` key: a read that began before another writer's commit and lands after the feed
-- applied it would otherwise cache the older row until its TTL).
--
-- Four commands on the way in (a miss waits for none of them, but on a busy CPU Redis runs them
-- inside the caller's time): the two reads in one MGET, the two existence checks in one EXISTS,
-- and no check of the staged hash of its own (the rename fails when it is gone).
--
-- KEYS: conv, owner (a placeholder of this slot on a cluster, read and ignored), delete tombstone,
-- staged, changed.
-- ARGV: user, local owner ('1' or '0'), deadline (Redis's clock, microseconds; past it the read
-- that fetched the copy has given up, and a newer write may be here: nothing is cached), the copy's
-- version (0 when unknown).
local t = redis.call('TIME')
if ARGV[3] ~= '' and tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[4])
  return 0
end
local read = redis.call('MGET', KEYS[5], KEYS[2])
local changed, owner = read[1], ARGV[2] == '1' and read[2]
if (changed and tonumber(changed) > (tonumber(ARGV[4]) or 0)) or (owner and owner ~= ARGV[1])
  or redis.call('EXISTS', KEYS[3], KEYS[1]) > 0 then
  redis.call('DEL', KEYS[4])
  return 0
end
-- The staged hash is gone only when it was evicted between the two commands: nothing to cache.
local moved = redis.pcall('RENAME', KEYS[4], KEYS[1])
if type(moved) == 'table' and moved.err then return 0 end
return 1
