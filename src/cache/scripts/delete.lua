-- Removes a conversation from every key of its slot and leaves a short-lived tombstone that keeps
-- a read racing the delete from caching it again. Runs after PostgreSQL deleted the row.
--
-- KEYS: conv, dirty set, list, list meta, user dirty, owner (a placeholder on a cluster), dirty
-- since, delete tombstone.
-- ARGV: member, id, user, tombstone ttl, local owner ('1' or '0'), deadline (Redis's clock; past
-- it the caller gave up and nothing changes), PostgreSQL's tombstone version.
-- Returns {-1} for another user's id (single node); {-4} past the deadline; {-5, version} when the
-- copy is newer than PostgreSQL's tombstone (a save landed between the two steps: PostgreSQL's
-- tombstone must cover it first, see docs/design.md, "Deletes"), nothing changed; else {1, version
-- removed}.
local local_owner = ARGV[5] == '1'
local t = redis.call('TIME')
if ARGV[6] ~= '' and tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[6]) then
  return {-4}
end
local owner = false
if local_owner then
  owner = redis.call('GET', KEYS[6])
  if owner and owner ~= ARGV[3] then return {-1} end
end
local ver = redis.call('HGET', KEYS[1], 'ver') or '0'
if ARGV[7] ~= '' and (tonumber(ver) or 0) > tonumber(ARGV[7]) then return {-5, ver} end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('HDEL', KEYS[4], ARGV[2])
redis.call('SREM', KEYS[5], ARGV[2])
redis.call('ZREM', KEYS[7], ARGV[1])
if owner then redis.call('DEL', KEYS[6]) end
redis.call('SET', KEYS[8], ARGV[7] ~= '' and ARGV[7] or ver, 'EX', ARGV[4])
return {1, ver}
