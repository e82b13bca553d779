-- On a cluster, where an id's owner record lives in the id's own slot: claims the id for the
-- user before the save that stores it (see docs/design.md, "Ownership"). The record has no TTL
-- while the conversation may be dirty; a flush that wrote it gives it one.
--
-- KEYS: owner. ARGV: user, deadline (Redis's clock; past it the caller gave up: nothing changes).
-- Returns 1 (the user's now), 0 (another user's) or -4 (past the deadline).
local t = redis.call('TIME')
if ARGV[2] ~= '' and tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[2]) then
  return -4
end
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
