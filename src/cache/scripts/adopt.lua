-- Adopts a hash that a writer other than this product changed (a seed-design instance's HSET,
-- which keeps our fields but not our signature): gives it a version of its own, newer than any it
-- may replace, keeps it dirty and without a TTL (the seed's writer set one). Nothing happens when
-- the hash changed again since it was read.
--
-- KEYS: conv, dirty set, dirty since, user dirty.
-- ARGV: version read, last_modified, byte lengths of messages and title (as read), new sig,
-- member, id, deadline (Redis's clock; past it the flush gave up: nothing changes).
-- Returns the new version, or false.
local t = redis.call('TIME')
if ARGV[8] ~= '' and tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[8]) then
  return false
end
local h = redis.call('HMGET', KEYS[1], 'ver', 'last_modified', 'pgv')
if (h[1] or '') ~= ARGV[1] or h[2] ~= ARGV[2] or redis.call('HSTRLEN', KEYS[1], 'messages') ~= tonumber(ARGV[3])
  or redis.call('HSTRLEN', KEYS[1], 'title') ~= tonumber(ARGV[4]) then
  return false
end
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ver = math.max(now, (tonumber(h[1] or '0') or 0) + 1, (tonumber(h[3] or '0') or 0) + 1)
ver = string.format('%.0f', ver)
redis.call('HSET', KEYS[1], 'ver', ver, 'sig', ARGV[5], 'dirty', '1')
redis.call('PERSIST', KEYS[1])
redis.call('SADD', KEYS[2], ARGV[6])
redis.call('ZADD', KEYS[3], 'NX', t[1], ARGV[6])
redis.call('SADD', KEYS[4], ARGV[7])
return ver
